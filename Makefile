# kimi-syncd — the two commands that matter: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run demo test lint typecheck unit bench chaos system-test install-service install-user-service clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@ $(STAMP)

run: $(STAMP)
	$(BIN)/kimi-syncd $(ARGS)

demo: $(STAMP)
	$(BIN)/python -m kimi_syncd.demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check kimi_syncd tests $(wildcard bench)
	$(BIN)/ruff format --check kimi_syncd tests $(wildcard bench)

typecheck: $(TEST_STAMP)
	$(BIN)/mypy --strict kimi_syncd

unit: $(TEST_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(TEST_STAMP)
	$(BIN)/python -m bench $(ARGS)

chaos: $(TEST_STAMP)
	$(BIN)/python -m tests.chaos $(ARGS)

system-test: $(TEST_STAMP)
	bash tests/system/run.sh

install-service:
	bash scripts/install-service.sh

install-user-service:
	bash scripts/install-service.sh --user

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
