# convpipe: `make run` trains and evaluates on the embedded digits data, `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.convpipe-installed
# Stages call `python`/`dvc`/`mlflow`: make them the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test test-fast ui bench lint tune

setup: $(STAMP)

# torch first, from the pinned release (a plain dependency resolve would pull a CUDA build).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	dvc repro

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

ui: setup
	convpipe ui

tune: setup
	convpipe tune

# Every benchmark in one run (< 30 min on 2 cores): rewrites benchmarks/RESULTS.md at the end.
# bench_tuning.py (two 12-trial tuning campaigns, too long for that budget) runs on its own:
#   $(PY) benchmarks/bench_tuning.py
bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check src pipelines tests benchmarks docs
	$(VENV)/bin/ruff format --check src pipelines tests benchmarks docs
	$(VENV)/bin/mypy
