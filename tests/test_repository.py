"""Checks over the repository itself: wording, sizes, import direction, packaging.

Files are those git tracks plus new ones it does not ignore, so a check fails before a bad file
is committed.
"""

import ast
import pathlib
import re
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
THIS_FILE = pathlib.Path(__file__).resolve().relative_to(ROOT).as_posix()

# Words about how the work was organised rather than about the software. Each pattern is
# matched case-insensitively per line; "carry" alone is left alone (a scan loop's carry).
HYGIENE_PATTERNS = {
    "work period": (r"\bsessions?\b|\bwork periods?\b|\b(?:fourth|fifth|sixth|seventh|eighth|ninth"
                    r"|tenth|eleventh|twelfth) (?:run|round|attempt|period)\b"),
    "numbered machine call": r"\bcalls? [0-9]+\b|\bcall(?:s)? [0-9]+\s*[-–]\s*[0-9]+",
    "machine call": (r"\b(?:device|gpu|h200) calls?\b|\bdevice time\b|\bdevice machine\b"
                     r"|\bone call\b"),
    "rented machine": r"\brent(?:ed|al|ing)?\b|\bnvidia-h200(?:-x[0-9]+)?\b|\bdevice image\b",
    "files carried to a machine": (
        r"\bcarr(?:y|ied|ies)\s*`?\[|\bcarr(?:y|ied|ies)\b[^.\n]{0,40}\b(?:machines?|wheels?)\b"
        r"|\bcarried (?:files|paths|folders)\b"),
    "machine output folder": r"\$OUT\b|\bfiles_at\b|\bfiles_fetch\b|\bgpu_session",
    "notebook note": (r"prepared, not yet measured|for the record\b|not yet re-?measured"
                      r"|\bkept opt-in\b"),
}
# References to documents outside the repository (matched case-sensitively).
OUTSIDE_PATTERNS = {
    "outside document": r"\bSPEC\b|SPEC\.md|\.\./shared\b|/work/shared",
}
DATED_NAME = re.compile(r"(?:19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]")


def repository_files():
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = sorted({p for p in out.decode().split("\0") if p})
    return [p for p in paths if (ROOT / p).is_file()]


def text_lines(path):
    data = (ROOT / path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


def find_phrases(files, patterns, flags):
    compiled = {name: re.compile(pattern, flags) for name, pattern in patterns.items()}
    hits = []
    for path in files:
        if path == THIS_FILE:
            continue
        lines = text_lines(path)
        for number, line in enumerate(lines or [], 1):
            for name, pattern in compiled.items():
                match = pattern.search(line)
                if match:
                    hits.append(f"{path}:{number}: {name}: {match.group(0)!r} in {line.strip()!r}")
    return hits


def test_hygiene_patterns_catch_what_they_should():
    """The patterns match the phrases they are for and leave software words alone."""
    bad = ["in the fourth session", "Call 2 measured it", "calls 2-3", "one GPU call",
           "device time left", "carry [\"runs/s5\"]", "carried it to the machine", "$OUT/dual",
           "files_at", "bash benchmarks/gpu_session.sh", "a rented GPU", "kept opt-in for the record",
           "GPU 0 of an nvidia-h200-x2", "an H200 call", "in one call", "the tenth run",
           "kept opt-in"]
    good = ["def step(carry, x):", "the state is carried in float32", "carries the M²RNN state",
            "recall 9 of them", "each call is waited for", "current device", "a call to jit"]
    compiled = [re.compile(p, re.I) for p in HYGIENE_PATTERNS.values()]
    for text in bad:
        assert any(p.search(text) for p in compiled), text
    for text in good:
        assert not any(p.search(text) for p in compiled), text
    outside = re.compile(OUTSIDE_PATTERNS["outside document"])
    assert outside.search("see SPEC §1") and not outside.search("pl.BlockSpec(")


def test_no_words_about_how_the_work_was_organised():
    hits = find_phrases(repository_files(), HYGIENE_PATTERNS, re.I)
    assert not hits, "wording about work periods or rented machines:\n" + "\n".join(hits)


def test_no_references_outside_the_repository():
    hits = find_phrases(repository_files(), OUTSIDE_PATTERNS, 0)
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)


def test_no_dated_files():
    dated = [p for p in repository_files() if DATED_NAME.search(p)]
    assert not dated, f"dated dumps (history belongs in git log): {dated}"


def test_sizes():
    files = repository_files()
    benchmarks = [p for p in files if p.startswith("benchmarks/")]
    assert len(benchmarks) <= 15, f"benchmarks/ has {len(benchmarks)} files: {benchmarks}"
    total = sum((ROOT / p).stat().st_size for p in files)
    assert total <= 3 * 2 ** 20, f"{total / 2 ** 20:.1f} MiB in the repository (limit 3 MiB)"
    long_docs = {p: n for p in files if p.endswith(".md")
                 if (n := len(text_lines(p) or [])) > 400}
    assert not long_docs, f"markdown files over 400 lines: {long_docs}"
    readme = len(text_lines("README.md"))
    assert readme <= 180, f"README.md has {readme} lines (limit 180)"


def imported_modules(path):
    """Top-level names of every module ``path`` imports, at any depth of its code."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# Imports point down: experiments -> train -> m2rnn_jax -> pallas_kernels.
FORBIDDEN_IMPORTS = {
    "pallas_kernels/": {"m2rnn_jax", "train", "m2rnn_experiments", "experiments", "benchmarks"},
    "m2rnn_jax/": {"train", "m2rnn_experiments", "experiments", "benchmarks"},
    "train/": {"m2rnn_experiments", "experiments", "benchmarks"},
}


def test_imports_point_down():
    files = [p for p in repository_files() if p.endswith(".py")]
    wrong = []
    for folder, forbidden in FORBIDDEN_IMPORTS.items():
        for path in (p for p in files if p.startswith(folder)):
            bad = imported_modules(path) & forbidden
            if bad:
                wrong.append(f"{path} imports {sorted(bad)}")
    assert files and not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_every_package_is_listed_in_pyproject():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(settings["packages"])
    folders = {package: folder for package, folder in settings.get("package-dir", {}).items()}
    assert folders.get("m2rnn_experiments") == "experiments"
    names = {"experiments": "m2rnn_experiments"}
    found = set()
    for path in repository_files():
        if path.endswith("/__init__.py") and path.split("/")[0] in (
                "m2rnn_jax", "pallas_kernels", "train", "experiments"):
            parts = path.split("/")[:-1]
            parts[0] = names.get(parts[0], parts[0])
            found.add(".".join(parts))
    assert {"m2rnn_jax", "pallas_kernels", "train", "m2rnn_experiments"} <= found
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed <= found, f"pyproject.toml lists packages with no folder: {sorted(listed - found)}"


REPOSITORY_PATH = re.compile(
    r"(?<![\w/.])((?:m2rnn_jax|pallas_kernels|train|experiments|configs|benchmarks|docs|tests|"
    r"scripts)/[\w./-]*[\w/])")


def test_paths_named_in_the_documents_exist():
    """A path into the repository named in a markdown file points at a file or folder."""
    missing = []
    for path in (p for p in repository_files() if p.endswith(".md")):
        for number, line in enumerate(text_lines(path) or [], 1):
            for name in REPOSITORY_PATH.findall(line):
                if not (ROOT / name).exists():
                    missing.append(f"{path}:{number}: {name}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
