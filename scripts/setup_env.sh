#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs the project (editable, with dev extras).
# Finds 3.12 by itself: python3.12 on PATH, pyenv, or the pyenv default root.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for cand in python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$cand"; return
    fi
  done
  for root in "${PYENV_ROOT:-}" "$HOME/.pyenv"; do
    [ -n "$root" ] || continue
    for p in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  done
  echo "error: Python >= 3.12 not found (install it, e.g. 'pyenv install 3.12')" >&2; exit 1
}
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  py=$(find_python)
  echo "setting up .venv with $($py --version)" >&2
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
