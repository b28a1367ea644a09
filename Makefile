# Quick start: `make demo` (set up, then run the main job) and `make test` (set up, then test).
.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lowbit demo

test: setup
	.venv/bin/python -m pytest -q -rs

lint: setup
	.venv/bin/ruff check .
