# Set-up and everyday commands. `make repro` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stage commands run `python`: put the project's environment first on PATH for DVC.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro server server-stop test test-fast ui bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: setup server  ## run the pipeline on the embedded default data
	$(BIN)/dvc repro

# The stage server imports torch, timm, MLflow... once; every stage then runs in a fork of it instead of
# paying ~6 s of imports (README, "Speed"). It exits after 30 min unused. Never required: without it
# stages start cold, with identical results. A failure to start it does not stop `make repro`.
server: setup  ## start the stage server (fast head-only iterations)
	-$(BIN)/python -m transfer.pipeline.stage_server start

server-stop:  ## stop the stage server
	-$(BIN)/python -m transfer.pipeline.stage_server stop

test: setup  ## the whole test suite, the end-to-end DVC/MLflow tests included
	$(BIN)/python -m pytest

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

ui: setup  ## the MLflow UI over every run of this repository (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts

bench: setup  ## speed figures of the pipeline (bench/README.md)
	$(BIN)/python bench/pipeline_speed.py

clean:
	rm -rf data reports/*.json mlruns
