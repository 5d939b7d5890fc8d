# galaxysae: `make demo` runs the whole atlas on generated data; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps demo test lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -c requirements.lock
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

# ----------------------------------------------------------------------------- launchers
# Each launcher runs the same `galaxysae <job> --config FILE.toml [--key value ...]`, after
# checking that config here (`galaxysae <job> ... --check`): a missing key fails before sbatch.
#   make submit-embed CONFIG=configs/embed.toml PARTITION=gpu NODES=2 GPUS=4 CPUS=16 MEM=128G TIME=04:00:00 \
#        EXTRA="--output s3://bucket/embeddings" SBATCH_FLAGS="--account=myproj"
#   make ray-submit-embed CONFIG=configs/embed.toml EXTRA="..."   (against $$RAY_ADDRESS)
#   make image [IMAGE=galaxysae:latest]
# In pipeline order: embed, train (and sweep), pca, compare, render (select = "aligned" reads
# compare's answers), atlas.
LAUNCH_JOBS := embed train sweep pca compare render atlas
# jobs that run on CPUs only: a GPU asked for them would sit idle
CPU_JOBS := pca compare render atlas
CONFIG ?=
PARTITION ?=
NODES ?= 1
# GPUs per node: 1 for embed, train and sweep; 0 for the CPU jobs (pca, compare, render, atlas)
GPUS ?=
CPUS ?= 8
MEM ?=
TIME ?=
EXTRA ?=
SBATCH_FLAGS ?=
SLURM_LOG_DIR ?= logs/slurm
# the `ray` CLI: the venv's after `make setup`, else the one on PATH
RAY ?= $(firstword $(wildcard $(VENV)/bin/ray) ray)
# the Python that checks a config before it is submitted: the venv's after `make setup`, else
# GALAXYSAE_PYTHON, else python3 (one without galaxysae and Ray: the check is skipped, said so)
CHECK_PYTHON ?= $(firstword $(wildcard $(VENV)/bin/python) $(GALAXYSAE_PYTHON) python3)
IMAGE ?= galaxysae:latest
RAY_RUNTIME_ENV ?=

.PHONY: image $(addprefix submit-,$(LAUNCH_JOBS)) $(addprefix ray-submit-,$(LAUNCH_JOBS))

# the config a launcher uses: CONFIG, else configs/<job>.toml
_config = $(or $(CONFIG),configs/$(1).toml)
_gpus = $(or $(GPUS),$(if $(filter $(CPU_JOBS),$(1)),0,1))
# preflight: `galaxysae <job> --config CONFIG EXTRA --check` parses and validates the config as the
# job will, so a missing or misspelt key stops here, not after the job queued and Ray started
_check = if "$(CHECK_PYTHON)" -c 'import importlib.util, galaxysae.cli; raise SystemExit(not importlib.util.find_spec("ray"))' >/dev/null 2>&1; then \
	  "$(CHECK_PYTHON)" -m galaxysae $(1) --config "$(call _config,$(1))" $(EXTRA) --check \
	  || { rc=$$?; echo "make: $(1) not submitted: its config does not pass (EXTRA=\"--key value ...\" sets keys)" >&2; exit $$rc; }; \
	else echo "make: $(1)'s config not checked before submitting: no Python with galaxysae and Ray here ($(CHECK_PYTHON); make setup)" >&2; fi

## submit-<job>: sbatch slurm/<job>.sbatch (Ray started inside the allocation); prints job id and log
$(addprefix submit-,$(LAUNCH_JOBS)): submit-%:
	@test -f "$(call _config,$*)" || { echo "make: config $(call _config,$*) not found (set CONFIG=FILE.toml)" >&2; exit 2; }
	@$(call _check,$*)
	@mkdir -p "$(SLURM_LOG_DIR)"
	@out=$$(sbatch --parsable --job-name=gs-$* --output="$(abspath $(SLURM_LOG_DIR))/%x-%j.out" \
	  --nodes=$(NODES) --cpus-per-task=$(CPUS) $(if $(TIME),--time=$(TIME)) $(if $(MEM),--mem=$(MEM)) \
	  $(if $(PARTITION),--partition=$(PARTITION)) $(if $(filter-out 0,$(call _gpus,$*)),--gres=gpu:$(call _gpus,$*)) \
	  $(SBATCH_FLAGS) slurm/$*.sbatch --config "$(call _config,$*)" $(EXTRA)) || exit $$?; \
	  id=$${out%%;*}; \
	  echo "job $$id"; \
	  echo "log $(abspath $(SLURM_LOG_DIR))/gs-$*-$$id.out"

## ray-submit-<job>: ray job submit jobs/<job>.py to the cluster at RAY_ADDRESS (the dashboard, http://HOST:8265)
$(addprefix ray-submit-,$(LAUNCH_JOBS)): ray-submit-%:
	@test -n "$$RAY_ADDRESS" || { echo "make: set RAY_ADDRESS to the cluster's dashboard, e.g. http://head:8265 (or the GCS address head:6379)" >&2; exit 2; }
	@test -f "$(call _config,$*)" || { echo "make: config $(call _config,$*) not found (set CONFIG=FILE.toml)" >&2; exit 2; }
	@# the config's path inside the checkout, found by the shell: make's abspath splits at spaces
	@cfg="$(call _config,$*)"; here=$$(pwd -P); \
	  abs="$$(cd "$$(dirname -- "$$cfg")" && pwd -P)/$$(basename -- "$$cfg")"; \
	  case "$$abs" in "$$here"/*) ;; *) echo "make: config $$cfg is outside this checkout: --working-dir . uploads only the checkout, so the cluster would not find it (copy it under configs/)" >&2; exit 2;; esac; \
	  $(call _check,$*); \
	  set -x; $(RAY) job submit --working-dir . $(if $(RAY_RUNTIME_ENV),--runtime-env-json '$(RAY_RUNTIME_ENV)') \
	  -- python jobs/$*.py --config "$${abs#"$$here"/}" $(EXTRA)

## image: build the Docker image (one image for every job; CPU fallback, GPU when present)
image:
	docker build -t $(IMAGE) .
