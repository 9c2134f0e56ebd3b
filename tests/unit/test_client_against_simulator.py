"""The client over real HTTP against the X-Series simulator: paging, 429, faults, auth."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync.lightspeed import (
    LightspeedAuthError,
    LightspeedClient,
    LightspeedNotFound,
    LightspeedUnavailable,
)
from include.tier_sync.rate_budget import RateBudget

sim_pkg = pytest.importorskip("tools.lightspeed_sim")
sim_testing = pytest.importorskip("tools.lightspeed_sim.testing")
clock_after = sim_testing.clock_after
running_simulator = sim_testing.running_simulator

pytestmark = pytest.mark.unit

TOKEN = "t0ken-for-tests"
NOW = datetime(2026, 11, 25, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def demo_store_json() -> str:
    """One generated store, copied per test (tests mutate it)."""
    return str(sim_pkg.generate_demo_store(seed=42, customers=120, now=NOW).dumps())


def fresh_store(text: str) -> Any:
    return sim_pkg.SimStore.loads(text)


def make_client(sim: Any, **kwargs: Any) -> LightspeedClient:
    kwargs.setdefault("backoff_base", 0.01)  # real sleeps, kept tiny
    kwargs.setdefault("timeout", 5.0)
    return LightspeedClient(sim.base_url, sim.token, **{**sim.CLIENT_OPTIONS, **kwargs})


def test_pagination_with_page_cap_reads_every_record(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=25) as sim:
        client = make_client(sim)
        pages = list(client.iter_customers())  # asks 1000, gets 25 a page: short pages go on
        ids = [c["id"] for p in pages for c in p.data]
        live = {cid for cid, c in store.customers.items() if not c.get("deleted_at")}
        assert set(ids) == live
        assert all(len(p.data) <= 25 for p in pages)
        assert len(pages) >= 3
        assert [p.version_max for p in pages] == sorted(p.version_max for p in pages)
        # one GET per page plus the final empty page
        assert client.stats.requests == len(pages) + 1
        sales = [s for p in client.iter_sales() for s in p.data]
        assert len(sales) == len(store.sales)
        money = [s["total_price"] for s in sales if "total_price" in s]
        assert money and all(isinstance(m, Decimal | int) for m in money)


def test_resume_from_cursor_sees_only_newer_changes(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=50) as sim:
        client = make_client(sim)
        cursor = max(p.version_max or 0 for p in client.iter_customers())
        groups = {g["name"]: g["id"] for g in client.list_customer_groups()}
        someone = next(cid for cid, c in store.customers.items() if not c.get("deleted_at"))
        sim.store.move_customer_to_group(someone, groups["Staff"])
        newer = [c for p in client.iter_customers(after=cursor) for c in p.data]
        assert [c["id"] for c in newer] == [someone]
        assert newer[0]["customer_group_id"] == groups["Staff"]


def test_group_calls_round_trip(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=30) as sim:
        client = make_client(sim)
        group = client.create_customer_group("GreenHaus Crew - Seed")
        live = [cid for cid, c in store.customers.items() if not c.get("deleted_at")]
        client.add_customers_to_group(group["id"], live[:100])
        client.add_customers_to_group(group["id"], live[:100])  # idempotent
        members = client.list_group_members(group["id"])
        assert {m["id"] for m in members} == set(live[:100])
        client.remove_customers_from_group(group["id"], live[:10])
        assert len(client.list_group_members(group["id"])) == 90
        customer = client.get_customer(live[50])
        customer["customer_group_id"] = next(
            g["id"] for g in client.list_customer_groups() if g["name"] == "All Customers"
        )
        assert client.put_customer(live[50], customer)["customer_group_id"] == customer["customer_group_id"]
        assert len(client.list_group_members(group["id"])) == 89
        with pytest.raises(LightspeedNotFound):
            client.get_customer("00000000-0000-0000-0000-000000000000")


def test_429_with_tight_limit_is_waited_out(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=10, rate_limit=4, window_seconds=1) as sim:
        client = make_client(sim, low_remaining_fraction=0)  # no header pacing: meet the 429s
        started = time.monotonic()
        customers = [c for p in client.iter_customers() for c in p.data]
        elapsed = time.monotonic() - started
        assert len(customers) == sum(1 for c in store.customers.values() if not c.get("deleted_at"))
        assert client.stats.rate_limited > 0
        assert client.stats.rate_limited == sum(1 for r in sim.requests if r.status == 429)
        assert client.stats.requests == len(sim.requests)
        assert elapsed < 10


def test_header_pacing_avoids_429(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=10, rate_limit=12, window_seconds=1) as sim:
        # pace from half the window left, spreading the rest over the simulator's 1 s window
        client = make_client(sim, rate_window_seconds=1.0, low_remaining_fraction=0.5)
        customers = [c for p in client.iter_customers() for c in p.data]
        assert customers
        assert client._pacer.pauses  # it slowed down before the server had to refuse
        assert client.stats.requests == len(sim.requests)


def test_429_with_seconds_retry_after(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(
        store=store, clock=clock_after(NOW), token=TOKEN, page_cap=40, rate_limit=2, window_seconds=1, retry_after="seconds"
    ) as sim:
        client = make_client(sim, low_remaining_fraction=0)
        customers = [c for p in client.iter_customers() for c in p.data]
        assert customers
        assert client.stats.rate_limited > 0


def test_shared_budget_keeps_under_the_server_limit(demo_store_json: str, tmp_path: Path) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=10, rate_limit=5, window_seconds=1) as sim:
        budget = RateBudget(sim.base_url, limit=4, window_seconds=1.0, directory=tmp_path)
        client = make_client(sim, budget=budget)
        customers = [c for p in client.iter_customers() for c in p.data]
        assert customers
        assert client.stats.rate_limited == 0  # the budget paced us instead


def test_faults_are_retried(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN, page_cap=50) as sim:
        client = make_client(sim, timeout=0.3)
        sim.faults.add("status", method="GET", path="^/customers$", times=2, status=503)
        sim.faults.add("reset", method="GET", path="^/sales$", times=1)
        sim.faults.add("latency", method="GET", path="^/customer_groups$", times=1, seconds=1.0)
        live = [cid for cid, c in store.customers.items() if not c.get("deleted_at")]
        sim.faults.add("apply_then_500", method="POST", path="/customers$", times=1)
        assert [c for p in client.iter_customers() for c in p.data]
        assert [s for p in client.iter_sales() for s in p.data]
        groups = client.list_customer_groups()
        bloom = next(g for g in groups if g["name"] == "GreenHaus Crew - Bloom")
        client.add_customers_to_group(bloom["id"], live[:3])  # applied, answered 500, re-sent
        assert all(store.customers[c]["customer_group_id"] == bloom["id"] for c in live[:3])
        assert client.stats.retries >= 5


def test_bounded_retries_then_unavailable(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN) as sim:
        client = make_client(sim, max_retries=2)
        sim.faults.add("status", path="^/sales$", status=500)
        with pytest.raises(LightspeedUnavailable):
            list(client.iter_sales())
        assert client.stats.requests == 3


def test_expired_token_fails_fast_and_names_the_connection(demo_store_json: str) -> None:
    store = fresh_store(demo_store_json)
    with running_simulator(store=store, clock=clock_after(NOW), token=TOKEN) as sim:
        client = make_client(sim)
        sim.expire_token()
        with pytest.raises(LightspeedAuthError) as info:
            client.list_customer_groups()
        assert "'lightspeed_default'" in str(info.value)
        assert TOKEN not in str(info.value)
        assert client.stats.requests == 1
