# Two commands matter on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-floors lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Live demo on loopback: ZEO server + primary + secondary + workload + verify.
demo: $(STAMP)
	$(BIN)/python demo/demo.py

## The whole test suite (unit, integration, system), then lint.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory lint

## The unit and integration tests against the oldest release of each dependency
## that pyproject.toml accepts (pinned in .ci/floors.txt), in a virtualenv of their own.
FLOORS := .venv-floors
test-floors: $(FLOORS)/.installed-stamp
	$(FLOORS)/bin/python -m pytest $(PYTEST_ARGS) tests/unit tests/integration

$(FLOORS)/.installed-stamp: pyproject.toml .ci/floors.txt
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS)/bin/python -m pip install --quiet -e '.[test]' -c .ci/floors.txt
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check replicator tests demo bench
	$(BIN)/mypy replicator bench

## Benchmarks against this machine's own limits (~20 min; BENCH_QUICK=1 for a small run).
## Not part of `make test`.  Results in bench-run/results.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf demo-run bench-run $(FLOORS) .pytest_cache .mypy_cache .ruff_cache
