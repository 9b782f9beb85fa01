# Lepton pipelines. Read top to bottom: setup, the two main commands, then the tools.
#   make run    set everything up and run the whole pipeline once (Airflow → DVC → MLflow)
#   make test   set everything up and run the tests (what CI runs)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)
MLFLOW_PORT ?= 5000
# pytest-xdist workers for `make test`: two overlap one test's waits (Flower's polls, DVC and
# process start-ups) with another's work on a 2-core runner. Each worker takes the next test
# when it is free (--dist load --maxschedchunk 1) and tests/conftest.py puts the slow ones
# first, so the workers end on quick tests at about the same time
TEST_WORKERS ?= 2
# Flower (federate.runtime: flower) pins protobuf, typer and rich below the main environment's,
# so its SuperLink, SuperNodes and apps get their own venv.
FLOWER_VENV := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed-$(shell cat requirements-flower.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup flower-setup run test test-fast lint format mlflow-ui airflow dvc-push bench bench-quantum bench-nightly bench-federated bench-privacy render clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP)  ## create .venv from the pinned lock file (once; again when the lock changes)

# pip installs without compiling (one core); compileall then compiles on every core. Like pip,
# it skips the few files that do not compile on this Python (torch's Python 3.12 test files).

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@rm -f $(VENV)/.installed-*
	@touch $@

flower-setup: $(FLOWER_STAMP)  ## create .venv-flower for the Flower runtime (once; again when its lock changes)

$(FLOWER_STAMP): requirements-flower.lock pyproject.toml
	@test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/pip install --quiet --disable-pip-version-check --no-compile -r requirements-flower.lock
	$(FLOWER_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(FLOWER_VENV)/bin/python -m compileall -q -j 0 $(FLOWER_VENV)/lib > /dev/null || true
	@rm -f $(FLOWER_VENV)/.installed-*
	@touch $@

run: setup  ## run the pipeline once through Airflow (`airflow dags test`) and print a summary
	$(BIN)/lepton run

test:  ## lint, registry/dvc.yaml sync, then every test (unit, data, model, DAG, end-to-end, Flower loopback)
	@$(MAKE) --no-print-directory -j 2 setup flower-setup
	$(BIN)/ruff check .
	$(BIN)/lepton dvc render --check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1 --durations=30; code=$$?; if [ $$code -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$code

test-fast: setup  ## unit tests only (no whole-pipeline runs)
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

render: setup  ## regenerate dvc.yaml from pipelines/registry.py
	$(BIN)/lepton dvc render

mlflow-ui: setup  ## MLflow UI on the workspace store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

airflow: setup  ## Airflow scheduler + UI (airflow standalone) with this DAG on its schedule
	$(BIN)/lepton airflow standalone

dvc-push: setup  ## store data and models in the DVC remote configured in .dvc/config
	$(BIN)/dvc push

bench: setup  ## time each stage on the default params; JSON in benchmarks/results/
	$(BIN)/python benchmarks/stages.py

bench-quantum: setup  ## the hybrid head's circuit on every quantum backend (minutes)
	$(BIN)/python benchmarks/quantum.py

bench-nightly: setup  ## time `lepton run` with nothing changed (the unchanged nightly run)
	$(BIN)/python benchmarks/nightly.py

bench-federated: setup  ## FedAvg / FedProx / FedAdam per label split, centralized, DP (minutes)
	$(BIN)/python benchmarks/federated.py

bench-privacy: setup  ## record-level DP accuracy at epsilon 1, 3, 8 over seeds, with the canary audit (minutes)
	$(BIN)/python benchmarks/privacy.py

clean:  ## remove pipeline outputs and local stores (keeps .venv)
	rm -rf data/raw data/compressed data/partitions models reports .lepton .airflow mlflow.db mlartifacts dvc.lock
