# Two entry points: `make run` (server on embedded defaults) and `make test` (whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck clean bench fuzz

PIP    := $(BIN)/pip --quiet --quiet --disable-pip-version-check

# The server alone (what `make run` needs), then the test tools on top (`make test`).
$(BIN)/courier: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: $(BIN)/courier pyproject.toml clients/python/pyproject.toml
	$(PIP) install -e '.[dev]' -e './clients/python[redis]'
	touch $@

run: $(BIN)/courier
	$(BIN)/courier migrate
	$(BIN)/courier serve

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

test: $(VENV)/.dev lint typecheck
	$(BIN)/pytest -q

fuzz: $(VENV)/.dev
	COURIER_FUZZ_EXAMPLES=$${COURIER_FUZZ_EXAMPLES:-100000} $(BIN)/pytest -q tests/test_fuzz.py --timeout 0

# `make bench`: Courier against Socket.IO 4.8 (needs node and npm; bench/compare.py).
# `make bench BENCH=fanout|ingest|latency|storm|soak|record`: the Courier-only benchmarks.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--connections 2000 --repeat 1".
BENCH      ?= compare
BENCH_ARGS ?=

$(VENV)/.bench: $(VENV)/.dev
	$(PIP) install -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python bench/$(BENCH).py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) courier.db courier.db-* .courier-dev.json .pytest_cache .mypy_cache .ruff_cache
