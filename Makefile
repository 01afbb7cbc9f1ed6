# convpipe: `make run` trains and evaluates on the embedded digits data, `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.convpipe-installed
# Stages call `python`/`dvc`/`mlflow`: make them the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup lock run test test-fast ui tune-ui bench bench-cifar bench-photos bench-samplers bench-streaming lint tune gpu-check gpu-bundle docs docs-serve

LOCK := requirements.lock

setup: $(STAMP)

# Exactly the locked versions, each checked against its sha256 (torch is the CPU build, found
# in pip's find-links); then convpipe itself, built with the locked setuptools.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml after editing it: pins that still satisfy it are kept;
# `make lock UPGRADE=1` moves every pin to the newest allowed release.
# --unsafe-package torchvision: left out of the lock (pip and setuptools stay in). litdata lists
# it, but PyPI's build does not import with the CPU torch wheel and, installed, breaks
# `import torchmetrics`; setup installs with --no-deps, so nothing asks for it.
lock: setup
	$(VENV)/bin/pip-compile --quiet --generate-hashes --unsafe-package torchvision --strip-extras \
		--extra dev --extra onnx --extra postgres --no-emit-find-links --no-emit-index-url \
		$(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml

run: setup
	dvc repro

# --durations: the slowest tests in every run's log, to keep `make test` within its ~25 min;
# -n auto: one pytest-xdist worker per core, each taking whole test files (module fixtures
# are built once), the end-to-end files first (tests/conftest.py)
test: setup
	$(PY) -m pytest -n auto --dist loadfile --durations=25

# The edit loop (< 2 min): unit tests, no end-to-end runs and no subprocess-heavy CLI tests,
# on every core as make test.
test-fast: setup
	$(PY) -m pytest -n auto --dist loadfile -m "not slow and not subprocess"

ui: setup
	$(VENV)/bin/convpipe ui

# optuna-dashboard over the campaign of params.yaml's tune: (http://127.0.0.1:8080/dashboard)
tune-ui: setup
	$(VENV)/bin/convpipe tune-ui

# The documentation site (site/): the params reference regenerated from the schema and
# params.yaml's comments, then MkDocs with --strict (broken links fail the build).
docs: export NO_MKDOCS_2_WARNING=1
docs: setup
	$(PY) -m convpipe.config.reference docs/params.md
	$(VENV)/bin/mkdocs build --strict --quiet

docs-serve: docs
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

tune: setup
	$(VENV)/bin/convpipe tune

# Every benchmark in one run (< 30 min on 2 cores): rewrites benchmarks/RESULTS.md at the end.
# bench_tuning.py (two 12-trial tuning campaigns, too long for that budget) runs on its own:
#   $(PY) benchmarks/bench_tuning.py
bench: setup
	$(PY) benchmarks/run_all.py

# The CIFAR-10 recipes, trained for real (15-40 min on 2 cores): benchmarks/RESULTS_CIFAR.md.
bench-cifar: setup
	$(PY) benchmarks/run_all.py --only bench_cifar --output benchmarks/RESULTS_CIFAR.md

# Few photos a class (params/photos.yaml against the other recipes) and fine-tuning, 3 seeds
# each (~1 h on 2 cores): benchmarks/RESULTS_PHOTOS.md.
bench-photos: setup
	$(PY) benchmarks/run_all.py --only bench_photos --output benchmarks/RESULTS_PHOTOS.md

# data.format litdata against npy on 200,000 generated 64-px JPEGs: prepare, disk, training reads
# in 1 and 2 processes, and an end-to-end dvc repro (~10 min on 2 cores): its own block of
# benchmarks/RESULTS.md, which make bench keeps.
bench-streaming: setup
	$(PY) benchmarks/bench_streaming.py --results

# The six Optuna samplers on one space and budget (3 seeds of 20 trials, ~30 min on 2 cores)
# and an accuracy/latency front: benchmarks/RESULTS_SAMPLERS.md.
bench-samplers: setup
	$(PY) benchmarks/run_all.py --only bench_samplers --output benchmarks/RESULTS_SAMPLERS.md

# One table of what convpipe does on a CUDA GPU (<= 8 min), or one "skipped" line without one.
# A GPU machine brings its own python and torch (no .venv there): the bundle supplies the rest.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

# The wheels gpu-check installs on a GPU machine that reaches no package registry (~50 MiB).
gpu-bundle: setup
	$(PY) benchmarks/gpu_bundle.py

lint: setup
	$(VENV)/bin/ruff check src pipelines tests benchmarks docs
	$(VENV)/bin/ruff format --check src pipelines tests benchmarks docs
	$(VENV)/bin/mypy
