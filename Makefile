# Two set-up commands for a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install postgres run test test-unit lint lock bench chaos clean

install: $(VENV)/.installed postgres

# constraints.txt: the versions the suite last passed on (pyproject.toml says what the code accepts).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# constraints.txt afresh: pyproject.toml resolved anew in a scratch venv (then make test, and commit both).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ grep '^#' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable \
		| sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv

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
	rm -rf $(VENV) .lock-venv palette.egg-info .palette .pytest_cache .hypothesis photo.jpg job.json rerun.json analytics
