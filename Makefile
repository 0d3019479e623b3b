# One command surface for README, CI and developers.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo bench-transport bench-producer bench-engine bench-learner bench-learner-memory bench-learner-trl bench-async bench-staleness bench-staleness-study bench-e2e bench-fsdp clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch (a range that admits newer releases would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## the whole test suite (unit, integration on a private redis-server, e2e)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## ruff lint and format check (CI runs this before the tests)
lint: $(STAMP)
	$(BIN)/ruff check common modeling producer learner gspo ops tests bench
	$(BIN)/ruff format --check common modeling producer learner gspo ops tests bench

## the main job on the embedded default: Redis, learner and a producer on this machine
demo: $(STAMP)
	$(BIN)/gspo up --run-dir runs/demo --minutes 10

bench-transport: $(STAMP)
	$(BIN)/python -m bench.transport

bench-producer: $(STAMP)
	$(BIN)/python -m bench.producer_overhead

bench-engine: $(STAMP)
	$(BIN)/python -m bench.engine_decode

bench-learner: $(STAMP)
	$(BIN)/python -m bench.learner_overhead

bench-learner-memory: $(STAMP)
	$(BIN)/python -m bench.learner_memory

## the sharded learner: per-rank bytes with 1, 2, 4 ranks; step time of 2 ranks vs 1 (torchrun, gloo)
bench-fsdp: $(STAMP)
	$(BIN)/python -m bench.fsdp

## TRL runs in its own venv (bench/.trl-venv), created here on first use
bench/.trl-venv/bin/python:
	bash bench/setup_trl_venv.sh

bench-learner-trl: $(STAMP) bench/.trl-venv/bin/python
	$(BIN)/python -m bench.learner_vs_trl

bench-e2e: $(STAMP) bench/.trl-venv/bin/python
	$(BIN)/python -m bench.e2e_vs_trl

bench-async: $(STAMP)
	$(BIN)/python -m bench.async_vs_sync

bench-staleness: $(STAMP)
	$(BIN)/python -m bench.staleness_ablation

bench-staleness-study: $(STAMP)
	$(BIN)/python -m bench.staleness_study --workers 2

clean:
	rm -rf $(VENV) runs .pytest_cache
