# The two commands a fresh machine needs: `make run` and `make test`.
# Each creates .venv and installs the project into it if missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# The package and what the default pipeline needs; then the test tools and
# every extra (dask, ray, team: pyproject.toml), which only the tests need.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
UI_PORT ?= 5000
PREFECT_PORT ?= 4200
FLOWS_PORT ?= 4280
# The project whose MLflow store `make ui` serves.
STORE ?= $(CURDIR)

# The stages run `python -m ...` through dvc: make that the venv's python.
export PATH := $(BIN):$(PATH)
# Prefect keeps its state (and its temporary server's database) in the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Offline: no telemetry from Prefect, MLflow or DVC.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: run test test-fast lint ui servers stop pipeline bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing xfer and its pinned dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable . 2> >(grep -v "is neither a file nor a directory" >&2)
	@touch $@

$(TEST_STAMP): $(STAMP)
	@echo "installing the test tools and the dask, ray and team extras into $(VENV)"
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[test,dask,ray,team]' 2> >(grep -v "is neither a file nor a directory" >&2)
	@touch $@

## run: the whole pipeline on params.yaml with DVC (only stale stages run)
run: $(STAMP)
	$(BIN)/python -m flows.stages --check
	$(BIN)/python -m servers.temporary_prefect $(BIN)/dvc repro
	@echo; $(BIN)/xfer summary

## pipeline: the same chain as one Prefect flow in one process
pipeline: $(STAMP)
	$(BIN)/python -m flows.pipeline

## test: the test suite (offline, tiny generated data), in $(TEST_WORKERS) test processes
# One OpenMP thread here too, children included: the suite trains on tiny tensors. The default
# run's reproduction check (tests/test_readme.py) gives its own run the CPU's threads back.
# Run one after another, the suite kept one of 2 cores busy on average (README: Tests come in
# tiers): two test processes fill both. Each takes whole test files (--dist loadfile), so a
# file's module fixtures (a DVC repo, a trained pipeline) are built once.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

## test-fast: the core package's unit tests only (no stage, pipeline or server): the inner loop
# One OpenMP thread: these tests train on tiny tensors, where a second thread only spins
# (on 2 cores it took 2.1x the CPU and 1.4x the wall time, README: Tests come in tiers).
# Two test processes as for `make test`: 1 min 24 s instead of 2 min 3 s on a fresh clone.
test-fast: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m core -n $(TEST_WORKERS) --dist loadfile

## lint: ruff's checks and its formatting, as CI runs them
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## ui: the MLflow UI on http://127.0.0.1:$(UI_PORT) over this project's runs
ui: $(STAMP)
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath $(STORE))/mlflow.db --default-artifact-root $(abspath $(STORE))/mlartifacts --host 127.0.0.1 --port $(UI_PORT) --workers 1

## servers: a Prefect server, an MLflow server over $(STORE) and prefect.yaml's deployments, in the background (logs, pids: .servers/)
servers: $(STAMP)
	@$(BIN)/python -m servers.supervisor start --root $(abspath $(STORE)) --prefect-port $(PREFECT_PORT) --mlflow-port $(UI_PORT) --flows-port $(FLOWS_PORT)

## stop: stop what `make servers` started
stop:
	@$(BIN)/python -m servers.supervisor stop --root $(abspath $(STORE))

## bench: each stage's startup before and after the stage contract, then per-stage wall time and orchestration overhead with and without one shared Prefect server (benchmarks/results/startup.md, e2e.md)
bench: $(STAMP)
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/e2e.py --compare

clean-venv:
	rm -rf $(VENV)
