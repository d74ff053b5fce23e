# ftune: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# torch stays out of requirements.lock: here it is the CPU wheel on this machine's disk (pip's
# find-links), in the worker image a CUDA build; the lock holds torch's own dependencies.
TORCH_VERSION := 2.13.0
TORCH_WHEELS ?= /opt/wheels

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps torch==$(TORCH_VERSION)
	# Exactly the locked versions, hashes checked; the lock is complete, so no resolver runs.
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check || { echo "requirements.lock is stale: run make lock"; exit 1; }
	touch $(STAMP)

install: $(STAMP) ## create .venv from requirements.lock: API, worker (CPU torch), dev tools

lock: ## regenerate requirements.lock after a dependency changed in pyproject.toml
	@# With a stale lock, install fails at pip check, but uv is in by then.
	@test -x $(VENV)/bin/uv || $(MAKE) install || test -x $(VENV)/bin/uv
	echo "torch==$(TORCH_VERSION)+cpu" | $(VENV)/bin/uv pip compile pyproject.toml - \
		--extra worker --extra dev --generate-hashes --no-emit-package torch --find-links $(TORCH_WHEELS) \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--custom-compile-command "make lock" --quiet -o requirements.lock

demo: $(STAMP) ## run the whole service locally and fine-tune SmolLM2-135M on a sample dataset
	$(VENV)/bin/ftune demo

dev: $(STAMP) ## start Redis, the API and one worker on this machine (Ctrl-C stops them)
	$(VENV)/bin/ftune dev

test: $(STAMP) ## run the test suite (unit, integration with real Redis/S3/Hub servers, end to end)
	$(VENV)/bin/pytest -q --durations=25

test-fast: $(STAMP) ## the tests not marked slow (no training, no whole jobs): the inner loop
	$(VENV)/bin/pytest -q -m "not slow"

fuzz: $(STAMP) ## the API under schemathesis with 500 cases an operation (CI runs 25): a few minutes
	FTUNE_FUZZ_EXAMPLES=500 $(VENV)/bin/pytest -q tests/integration/test_api_contract.py -k fuzzed

lint: $(STAMP) ## ruff, ruff format --check, mypy and the import layers (lint-imports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

chart-readme: $(STAMP) ## regenerate helm/ftune/README.md from the chart's values.yaml
	$(PY) tools/chart_readme.py

openapi: $(STAMP) ## export openapi/openapi.json from the app
	$(PY) -m service.api.openapi > openapi/openapi.json

screenshot: $(STAMP) ## regenerate the README's console screenshot (runs the console's browser test)
	FTUNE_SCREENSHOTS=test-artifacts/console $(VENV)/bin/pytest -q tests/e2e/test_console.py -k end_to_end
	cp test-artifacts/console/job.png docs/images/console-job.png

bench: $(STAMP) ## benchmarks, quick mode (BENCH=full for the full run)
	$(PY) -m bench $(if $(BENCH),--$(BENCH),--quick)

soak: $(STAMP) ## several tenants against one API and two workers for 60 s, then a consistency check
	$(PY) -m bench.soak

.PHONY: help install lock demo dev test test-fast fuzz lint fmt openapi screenshot bench soak
