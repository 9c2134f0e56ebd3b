# customer-tier-sync: every target installs what it needs first (`make install` is idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9

.PHONY: install demo test lint typecheck bench lock clean up down chromium

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

demo: install
	$(BIN)/python -m tools.demo

up: install
	$(BIN)/python -m tools.up

down: install
	$(BIN)/python -m tools.up --down

test: install chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Debian's Chromium + chromedriver for the UI end-to-end test (no-op when already installed).
chromium:
	bash tools/install_chromium.sh

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/parse_time.py
	$(BIN)/python bench/transform.py
	$(BIN)/python bench/sync_requests.py

lock:
	uv pip compile --python-version 3.11 requirements.in -o requirements.txt --no-header

clean:
	-test -x $(BIN)/python && $(BIN)/python -m tools.up --down
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache build *.egg-info
