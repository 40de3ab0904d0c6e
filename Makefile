# The two entry points the README documents. Both set up .venv first (idempotent).
.PHONY: setup train test
setup:
	@bash scripts/setup_env.sh

train: setup
	.venv/bin/m2rnn-train --config configs/tiny.yaml --out runs/tiny

test: setup
	.venv/bin/python -m pytest -q -n 2 -m "not slow" tests
