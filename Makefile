# Two set-up commands for a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install postgres run test test-unit lint bench chaos clean

install: $(VENV)/.installed postgres

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

postgres:
	@bash infra/ensure-postgres.sh

run: install
	$(BIN)/palette up

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The long reliability runs (not part of `make test`, which runs their short slices). The
# model-based runs take about ten minutes by design: no stack dump after 5 (faulthandler_timeout).
chaos: install
	$(BIN)/python -m tests.chaos --minutes $(or $(MINUTES),10)
	PALETTE_LONG=1 $(BIN)/pytest -q -o faulthandler_timeout=0 tests/unit/test_model_based.py \
		tests/integration/test_model_based_postgres.py

bench: install
	@bash infra/ensure-wrk.sh
	$(BIN)/palette bench --json docs/bench.json --plot docs/bench.png

clean:
	rm -rf $(VENV) palette.egg-info .palette .pytest_cache .hypothesis photo.jpg job.json rerun.json analytics
