# customer-tier-sync: every target installs what it needs first (`make install` is idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9

.PHONY: help install demo test test-unit test-calendar lint typecheck bench lock clean up down browser chromium faketime erase-customer

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

install: $(STAMP)  ## .venv with every pinned dependency (idempotent)

$(STAMP): requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements-dev.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

demo: install  ## the real job end to end: Airflow 3 (SQLite) against the Lightspeed simulator
	$(BIN)/python -m tools.demo

up: install  ## local Airflow UI + simulator (make down stops it)
	$(BIN)/python -m tools.up

down: install  ## stop what make up started
	$(BIN)/python -m tools.up --down

# Erase one customer from the data dir (README: Privacy).
erase-customer: install  ## erase one customer from the data dir: ID=<id> [DATA_DIR=...] [DRY_RUN=1]
	@test -n "$(ID)" || { echo "usage: make erase-customer ID=<customer id> [DATA_DIR=<data dir>] [DRY_RUN=1]"; exit 2; }
	$(BIN)/python -m tools.erase_customer $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") $(if $(DRY_RUN),--dry-run) -- "$(ID)"

# No root needed: the browser tests install Chromium themselves where they can (root + apt, as on
# CI) and otherwise skip saying so; `make browser` installs it up front.
test: install  ## the whole suite: ruff, deptry, mypy, pytest (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/deptry .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-unit: install  ## the fast loop: unit, simulator and DAG-file tests only (no Airflow servers)
	$(BIN)/python -m pytest -q -m "not integration" tests/unit tests/sim tests/dags

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
test-calendar: install faketime  ## the suite a year ahead and on the day after the fixed test dates
	faketime -f "$(CALENDAR_AHEAD)" $(CALENDAR_PYTEST)
	TZ=UTC faketime "$(CALENDAR_FIXED)" $(CALENDAR_PYTEST)

# Debian's libfaketime wrapper, for test-calendar (no-op when already installed).
faketime:
	@command -v faketime >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime; }

# Debian's Chromium + chromedriver for the UI end-to-end test (no-op when already installed).
browser:  ## Chromium for the UI tests (Debian/Ubuntu: apt, needs root or sudo)
	bash tools/install_chromium.sh

chromium: browser

lint: install  ## ruff, and deptry: declared dependencies == imported ones
	$(BIN)/ruff check .
	$(BIN)/deptry .

typecheck: install  ## mypy
	$(BIN)/mypy

bench: install  ## the speed figures (bench/)
	$(BIN)/python bench/parse_time.py
	$(BIN)/python bench/transform.py
	$(BIN)/python bench/sync_requests.py

# Two locks, one set of versions: development (runtime + tools) first, then the runtime set that the
# image installs, constrained to the development lock's versions. deptry (make lint) keeps what is
# declared and what is imported equal.
lock: install  ## re-resolve requirements*.in into requirements-dev.txt and requirements.txt
	$(BIN)/uv pip compile -q --python-version 3.11 requirements.in requirements-dev.in -o requirements-dev.txt --no-header
	$(BIN)/uv pip compile -q --python-version 3.11 requirements.in -c requirements-dev.txt -o requirements.txt --no-header

clean:  ## stop make up, remove the venv, caches and .demo
	-test -x $(BIN)/python && $(BIN)/python -m tools.up --down
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache build *.egg-info
