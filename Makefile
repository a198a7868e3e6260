# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: install install-test demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

install-test: install
	$(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/medreg demo -o demo-output --overwrite

test: install-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q tests

lint: install-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# Benchmarks against peer tools (not part of the tests): `make bench-env` once, then the
# commands in docs/benchmarks.md.
BENCH := .venv-bench
bench-env:
	$(PY) -m venv $(BENCH)
	$(BENCH)/bin/pip install -q --upgrade pip
	$(BENCH)/bin/pip install -q $(TORCH)
	$(BENCH)/bin/pip install -q -c benchmarks/constraints.txt -e . -r benchmarks/requirements-peers.txt
	$(BENCH)/bin/pip install -q --no-deps diffdrr
	$(BENCH)/bin/pip install -q -c benchmarks/constraints.txt $$($(BENCH)/bin/python benchmarks/diffdrr_deps.py)
