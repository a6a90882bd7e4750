# Two commands: `make test` and `make pipeline`. Both set up the venv first (fast when already done).
#
#   make setup                      .venv with python3.11 + `pip install -c constraints.txt -e '.[dev]'`
#   make test                       ruff check + format, mypy (strict: engine, models, losses), every pytest tier
#   make test-fast                  ruff, then the unit tier (no servers, stage runs or multi-process training)
#   make pipeline                   Prefect flow lafs-pipeline: a task per dvc.yaml stage, params.yaml as it is
#   make pipeline DATA=../shared/data/lfw MODELS=../shared/models     (offline: full LFW, View 1 from ../shared/data/lfw_views)
#   make pipeline DATA=s3://bucket/faces SET='pretrain.epochs=1'            (AWS env / ingest.s3_endpoint_url)
#   make pipeline DATA=../shared/data/lfw MODELS=../shared/models PROFILE=quality     (<= 60 min budget)
#   make compare                    after a pipeline run: scratch vs DINO-face vs LAFS x full / few-shot data
#   make clean                      caches and build files (keeps .venv, DVC cache, outputs)
#
# `make pipeline` runs flows/pipeline.py on embedded defaults (no servers: Prefect's temporary server, a local
# sqlite MLflow store, DVC's local cache): one task per dvc.yaml stage in DVC's dependency order, each
# `dvc repro --single-item <stage>`, so DVC decides what reruns; then `dvc metrics show`. Export
# PREFECT_API_URL / MLFLOW_TRACKING_URI to use real servers (infra/local/services.py, infra/compose.yaml).
# Overrides are values in params.yaml, as `dvc exp run --set-param` sets them: DATA, MODELS, PROFILE and SET are
# written there (comments kept, only when given, validated first) by lafs.params_edit, so `git diff params.yaml`,
# `dvc params diff` and `dvc exp show` show what a run used, and a later plain `dvc repro` or
# `dvc exp run -S key=value` starts from the same values. `git checkout params.yaml` returns to the defaults.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

# The setup stamp is named after a hash of the install inputs, so editing pyproject.toml or constraints.txt
# (or a checkout that changes them) reinstalls, and touching them without a change does not.
SETUP_HASH := $(shell cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.setup-$(SETUP_HASH)

# Pipeline inputs, set in params.yaml only when given. DATA (ingest.source): a folder of <identity>/<image>
# subfolders, s3://bucket/prefix, or lfw (downloaded by scikit-learn into $SCIKIT_LEARN_DATA, default
# ~/scikit_learn_data). MODELS (landmarks.models_root): insightface model root for the landmarks stage (null =
# insightface's default ~/.insightface; a missing pack fails with instructions, e.g.
# `insightface-cli model.download buffalo_s` and landmarks.detector=buffalo_s).
# Plain `=`, not `?=`: a DATA variable lying around in the environment must not redirect the pipeline.
DATA =
MODELS =
# With DATA: split.protocol_dir = <DATA>_views when that folder holds LFW's protocol files (the shared layout:
# data/lfw + data/lfw_views), else null (the lfw source's own download).
VIEWS = $(if $(wildcard $(DATA)_views/pairsDevTest.txt),$(DATA)_views,)
# SET: space-separated dotted params set in params.yaml (kept there until changed; an empty value sets null).
SET =
# PROFILE: a named budget, i.e. SET values applied before SET. Default (empty): params.yaml, the <= 20 min CPU run.
# quality (<= 60 min on 2 cores): the landmark net trains with the recogniser (the method's own setting), longer
# landmark net / SSL / finetune, 4 tuning trials, the dlib ceiling with flip TTA like the model.
PROFILE =
PROFILE_quality = finetune.train_landmark_net=true finetune.epochs=10 landmark_net.epochs=3 pretrain.epochs=3 \
	tune.n_trials=4 evaluate.ceiling_flip=true
ifneq ($(PROFILE),)
ifeq ($(PROFILE_$(PROFILE)),)
$(error unknown PROFILE=$(PROFILE): the Makefile defines quality)
endif
endif

# No telemetry anywhere; the venv's tools (lafs, dvc, pytest, moto_server) first on PATH.
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1
# Embedded defaults for a one-machine pipeline run: local MLflow file store, Prefect's ephemeral server with
# its state in the project, DVC's local cache (.dvc/cache, no remote needed). Only the pipeline gets them
# (tests pick their own tmp stores); override any of them from the environment.
pipeline compare bench-serve: export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
pipeline: export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: help setup test test-fast pipeline compare bench-serve clean

help:
	@sed -n '1,11p' $(firstword $(MAKEFILE_LIST))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(BIN)/python
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.setup-*
	touch $@

setup: $(STAMP)

test: setup
	ruff check .
	ruff format --check .
	mypy
	pytest -q --timeout=1200 --durations=15

# The unit tier: no server process, no pipeline stage run, no multi-process training (tests/conftest.py).
test-fast: setup
	ruff check .
	ruff format --check .
	mypy
	pytest -q --timeout=300 -m 'not slow and not integration'

pipeline: setup
	python -m flows.pipeline $(if $(DATA),--data '$(DATA)' --set 'split.protocol_dir=$(VIEWS)') \
		$(if $(MODELS),--models '$(MODELS)') $(foreach s,$(PROFILE_$(PROFILE)) $(SET),--set '$(s)')
	dvc metrics show

# Not a dvc.yaml stage (it must not lengthen `dvc repro`): resumable, finished cells are skipped; the
# budgets are params.yaml's compare section (override with e.g. `lafs compare --set finetune_epochs=5`).
compare: setup
	lafs compare --out reports/comparison

# Served champion vs the face_recognition library on 1,000 shared photos (benchmarks/serve.py; RESULTS.md).
# face_recognition is installed here, not with the project: --no-deps, as its dlib requirement is dlib-bin's module.
# SERVE_ARGS: e.g. '--workers 2 --concurrency 2' (server processes, requests in flight; RESULTS.md).
SERVE_MODEL = models:/lafs-face@champion
SERVE_ARGS =
bench-serve: setup
	python -m pip install --no-deps 'face-recognition==1.3.0'
	python benchmarks/serve.py --model '$(SERVE_MODEL)' --data '$(or $(DATA),../shared/data/lfw)' \
		--out reports/serve_benchmark.json $(SERVE_ARGS)

clean:
	find . \( -path ./$(VENV) -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build data/.raw.partial
