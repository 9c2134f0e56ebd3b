"""Fixtures for the simulator contract tests: a demo store served on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import requests

from tools.lightspeed_sim import SimServer, SimStore, generate_demo_store
from tools.lightspeed_sim.jsonutil import loads
from tools.lightspeed_sim.testing import clock_after, running_simulator

NOW = datetime(2026, 11, 25, 2, tzinfo=UTC)
TOKEN = "t0ken-for-tests"


@pytest.fixture
def store() -> SimStore:
    store = generate_demo_store(seed=7, customers=80, now=NOW)
    store.clock = clock_after(NOW)  # every write is stamped just after NOW, on any calendar day
    return store


@pytest.fixture
def sim(store: SimStore) -> Iterator[SimServer]:
    with running_simulator(store=store, token=TOKEN) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield session


def body(resp: requests.Response) -> Any:
    """Response JSON with exact decimals (as the pipeline parses it)."""
    return loads(resp.content)


def page_all(http: requests.Session, url: str, **params: Any) -> list[dict[str, Any]]:
    """Follow the version cursor until an empty page."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        resp = http.get(url, params={"after": after, **params}, timeout=10)
        assert resp.status_code == 200, resp.text
        payload = body(resp)
        if not payload["data"]:
            return out
        out.extend(payload["data"])
        after = payload["version"]["max"]


def amount(sale: dict[str, Any]) -> Decimal:
    incl = sale.get("total_price_incl")
    if incl is not None:
        return Decimal(incl)
    return Decimal(sale.get("total_price") or 0) + Decimal(sale.get("total_tax") or 0)
