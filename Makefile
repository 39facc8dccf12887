# Set-up and everyday commands. `make repro` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stage commands run `python`: put the project's environment first on PATH for DVC.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro server server-stop lint format test test-fast ui server-mlflow server-url report compare bench clean

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

lint: setup  ## ruff's checks and the formatter's verdict (configured in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## sort imports and format the whole tree with ruff
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .

# One pytest-xdist worker per core (a test module stays on one worker: module fixtures are built once and the
# team workflow's tests share state), each running torch on one thread: the suite keeps only ~1.2 of 2 cores
# busy run serially, and two workers whose torch each spins two OpenMP threads fight over the cores.
test: setup  ## the whole test suite: tests/unit, tests/integration and tests/e2e (README, "Tests")
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadscope

test-fast: setup  ## tests/unit only (in-process, under a minute), with its slowest tests
	$(BIN)/python -m pytest tests/unit --durations=15

ui: setup  ## the MLflow UI over every run of this repository (http://127.0.0.1:5000)
	@echo "runs view: $$(MLFLOW_TRACKING_URI= $(BIN)/python -m transfer.tracking url)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts

# A tracking server for a team (README, "Team workflow"): runs in a SQLite database, artifacts uploaded
# through the server into MLFLOW_SERVER_DIR. Clients set MLFLOW_TRACKING_URI=http://HOST:PORT. For other
# machines, bind a reachable address (MLFLOW_HOST=0.0.0.0) behind a proxy with authentication, and a
# Postgres/MySQL URI in MLFLOW_BACKEND for many concurrent writers.
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5001
MLFLOW_WORKERS ?= 2
MLFLOW_SERVER_DIR ?= mlruns/server
MLFLOW_BACKEND ?= sqlite:///$(MLFLOW_SERVER_DIR)/mlflow.db
# MLflow 3's server also starts a job runner and seven huey consumers (about 275 MB each) for its GenAI jobs,
# which this project never submits: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false leaves them out.
server-mlflow: setup  ## start an MLflow tracking server (foreground; Ctrl-C stops it)
	mkdir -p $(MLFLOW_SERVER_DIR)
	@echo "clients: export MLFLOW_TRACKING_URI=http://$(MLFLOW_HOST):$(MLFLOW_PORT); runs view: make server-url"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
		--backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_SERVER_DIR)/artifacts

server-url:  ## the runs view of the experiment on the server in MLFLOW_TRACKING_URI
	@$(BIN)/python -m transfer.tracking url

# BASE reaches the command through the environment, never pasted into the recipe's shell text: a value such as
# BASE='x; touch owned #' is then one argument (a git ref that does not exist), not shell code.
export BASE ?= main
report: setup  ## markdown report of the workspace against BASE (reports/pr/report.md; CI posts it on PRs)
	$(BIN)/transfer report --base="$$BASE"

compare: setup  ## experiments side by side: changed params and key metrics
	$(BIN)/transfer compare

bench: setup  ## speed figures of the everyday loop (bench/README.md lists every benchmark)
	$(BIN)/python bench/pipeline_speed.py

clean:
	rm -rf data reports/*.json mlruns
