# customer-tier-sync: every target installs what it needs first (`make install` is idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9

.PHONY: install demo test test-calendar lint typecheck bench lock clean up down chromium faketime

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

# The suite must pass on any calendar day (README: "How tests choose their dates"): run it with the
# clock a year ahead, then on the day after the fixed test dates (the latest fixed as_of is
# 2026-11-27T02:00Z). faketime starts each clock there and lets it tick. The PostgreSQL-cluster
# tests are left out: they lay everything out from the wall clock by design (the scheduler's), and
# the machine's PostgreSQL server keeps real time, so a faked scheduler would see its own runs in
# the database's future.
CALENDAR_AHEAD ?= +365d
CALENDAR_FIXED ?= 2026-11-27 03:00:00
CALENDAR_PYTEST = $(BIN)/python -m pytest -p no:cacheprovider \
	--ignore=tests/integration/test_scheduler.py --ignore=tests/integration/test_celery.py
test-calendar: install chromium faketime
	faketime -f "$(CALENDAR_AHEAD)" $(CALENDAR_PYTEST)
	TZ=UTC faketime "$(CALENDAR_FIXED)" $(CALENDAR_PYTEST)

# Debian's libfaketime wrapper, for test-calendar (no-op when already installed).
faketime:
	@command -v faketime >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime; }

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
