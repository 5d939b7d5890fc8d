# galaxysae: `make demo` runs the whole atlas on generated data; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps demo test lint clean

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -c requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

## setup: create .venv with every pinned dependency (idempotent: a second run does nothing)
setup: $(VENV)/.installed

## system-deps: Debian packages the tests drive for real (Chromium, Slurm, munge); needs root
system-deps:
	@bash tests/services/system_deps.sh

## demo: generate the small demo data set and run the pipeline end to end on it
demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

## test: set up, then run the whole suite (it starts its own Ray, S3 and Slurm services)
test: setup system-deps
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
