# Set-up and everyday commands. `make repro` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stage commands run `python`: put the project's environment first on PATH for DVC.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-fast ui bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: setup  ## run the pipeline on the embedded default data
	$(BIN)/dvc repro

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
