# One target per job, shared by people and CI (.ci/run calls `make test`).
PYTHON ?= python3

.PHONY: install test test-rust test-python lint conformance bench

install:
	$(PYTHON) -m pip install --quiet . -r requirements-dev.txt

test: install test-rust test-python

test-rust:
	cargo test --quiet -p ferroloop-core

test-python:
	$(PYTHON) -m pytest

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	$(PYTHON) -m pip install --quiet -r requirements-lint.txt
	$(PYTHON) -m ruff check python tests bench examples
	$(PYTHON) -m mypy.stubtest ferroloop._ferroloop
	$(PYTHON) -m mypy --strict tests/typing_usage.py

conformance: install
	$(PYTHON) -m tests.conformance.run

bench: install
	$(PYTHON) bench/run.py
