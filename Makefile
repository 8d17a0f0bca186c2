# Two entry points: `make run` (server on embedded defaults) and `make test` (whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck clean bench fuzz

$(BIN)/courier: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/courier
	$(BIN)/courier migrate
	$(BIN)/courier serve

lint: $(BIN)/courier
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/courier
	$(BIN)/mypy

test: $(BIN)/courier lint typecheck
	$(BIN)/pytest -q

fuzz: $(BIN)/courier
	COURIER_FUZZ_EXAMPLES=$${COURIER_FUZZ_EXAMPLES:-100000} $(BIN)/pytest -q tests/test_fuzz.py --timeout 0

# `make bench`: Courier against Socket.IO 4.8 (needs node and npm; bench/compare.py).
# `make bench BENCH=fanout|ingest|latency|storm`: the Courier-only benchmarks.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--connections 2000 --repeat 1".
BENCH      ?= compare
BENCH_ARGS ?=

bench: $(BIN)/courier
	$(BIN)/python bench/$(BENCH).py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) courier.db courier.db-* .courier-dev.json .pytest_cache .mypy_cache .ruff_cache
