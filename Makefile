# ftune: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch on this machine's disk; the worker image installs a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[worker,dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the API, the worker (CPU torch) and the dev tools

demo: $(STAMP) ## run the whole service locally and fine-tune SmolLM2-135M on a sample dataset
	$(VENV)/bin/ftune demo

dev: $(STAMP) ## start Redis, the API and one worker on this machine (Ctrl-C stops them)
	$(VENV)/bin/ftune dev

test: $(STAMP) ## run the test suite (unit, integration with real Redis/S3/Hub servers, end to end)
	$(VENV)/bin/pytest -q

lint: $(STAMP) ## ruff, ruff format --check, mypy and the import layers (lint-imports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

openapi: $(STAMP) ## export openapi/openapi.json from the app
	$(PY) -m service.api.openapi > openapi/openapi.json

bench: $(STAMP) ## benchmarks, quick mode (BENCH=full for the full run)
	$(PY) -m bench $(if $(BENCH),--$(BENCH),--quick)

.PHONY: help install demo dev test lint fmt openapi bench
