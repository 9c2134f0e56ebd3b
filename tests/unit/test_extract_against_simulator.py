"""extract_orders over real HTTP: the client against the X-Series simulator, into a real store."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync.extract import extract_orders
from include.tier_sync.lightspeed import LightspeedClient
from include.tier_sync.money import sale_amount_cents
from include.tier_sync.store import OrderStore

sim_pkg = pytest.importorskip("tools.lightspeed_sim")
sim_testing = pytest.importorskip("tools.lightspeed_sim.testing")
running_simulator, clock_after = sim_testing.running_simulator, sim_testing.clock_after

pytestmark = pytest.mark.unit

TOKEN = "t0ken-for-tests"
NOW = datetime(2026, 11, 25, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def demo_store_json() -> str:
    return str(sim_pkg.generate_demo_store(seed=42, customers=120, now=NOW).dumps())


def make_client(sim: Any, **kwargs: Any) -> LightspeedClient:
    kwargs.setdefault("backoff_base", 0.01)
    kwargs.setdefault("timeout", 5.0)
    return LightspeedClient(sim.base_url, sim.token, **{**sim.CLIENT_OPTIONS, **kwargs})


def newest(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("version").drop_duplicates("id", keep="last").set_index("id").sort_index()


def ts(value: str | None) -> pd.Timestamp | None:
    return None if value is None else pd.Timestamp(value).tz_convert("UTC")


def assert_store_mirrors_sim(store: OrderStore, sim_store: Any) -> None:
    """The newest stored version of every record is exactly what the simulator holds now."""
    sales = newest(store.read("sales"))
    assert set(sales.index) == set(sim_store.sales)
    for sid, sale in sim_store.sales.items():
        row = sales.loc[sid]
        assert row["version"] == sale["version"]
        assert row["amount_cents"] == sale_amount_cents(sale)
        assert row["status"] == sale["status"]
        assert (pd.isna(row["customer_id"]) and sale["customer_id"] is None) or row["customer_id"] == sale[
            "customer_id"
        ]
        assert row["sale_date"] == ts(sale["sale_date"])
        assert (pd.isna(row["deleted_at"]) and sale["deleted_at"] is None) or row["deleted_at"] == ts(
            sale["deleted_at"]
        )
    customers = newest(store.read("customers"))
    assert set(customers.index) == set(sim_store.customers)  # deleted customers included
    for cid, customer in sim_store.customers.items():
        row = customers.loc[cid]
        assert row["version"] == customer["version"]
        assert row["customer_group_id"] == customer["customer_group_id"]
        assert bool(row["enable_loyalty"]) == bool(customer["enable_loyalty"])
        assert pd.isna(row["deleted_at"]) == (customer["deleted_at"] is None)


def edit_sale(sim_store: Any, sale_id: str, **changes: Any) -> None:
    with sim_store.lock:
        sim_store.sales[sale_id].update(changes)
        sim_store.stamp(sim_store.sales[sale_id])


def add_sale(sim_store: Any, template_id: str, **changes: Any) -> str:
    with sim_store.lock:
        sale = copy.deepcopy(sim_store.sales[template_id])
        sale["id"] = sim_store.new_id()
        sale.update(changes)
        sim_store.sales[sale["id"]] = sale
        sim_store.stamp(sale)
        return str(sale["id"])


def test_full_then_incremental_extraction_mirrors_the_simulator(demo_store_json: str, tmp_path: Path) -> None:
    sim_store = sim_pkg.SimStore.loads(demo_store_json)
    store = OrderStore(tmp_path / "store")
    with running_simulator(store=sim_store, clock=clock_after(NOW), token=TOKEN, page_cap=50) as sim:
        first = extract_orders(make_client(sim), store, commit_every_pages=3)

        assert first["records"] == {"sales": len(sim_store.sales), "customers": len(sim_store.customers)}
        assert first["api"]["requests"] == len(sim.requests)
        assert first["pages"] == len(sim.requests) - 2  # one empty page ends each feed
        assert_store_mirrors_sim(store, sim_store)
        versions_before = len(store.read("sales"))

        closed = sorted(sid for sid, s in sim_store.sales.items() if s["status"] == "CLOSED")
        edit_sale(sim_store, closed[0], status="VOIDED")
        edit_sale(
            sim_store, closed[1], deleted_at=(NOW + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        )
        new_id = add_sale(sim_store, closed[2], total_price_incl=Decimal("1499.995"))
        live = sorted(cid for cid, c in sim_store.customers.items() if c["deleted_at"] is None)
        sim_store.delete_customer(live[0])
        sim_store.update_customer(
            live[1], {"enable_loyalty": not sim_store.customers[live[1]]["enable_loyalty"]}
        )
        sim.requests.clear()

        second = extract_orders(make_client(sim), store, commit_every_pages=3)
        second_requests = len(sim.requests)
        manifest = store.manifest()
        third = extract_orders(make_client(sim), store)

    assert second["records"] == {"sales": 3, "customers": 2}
    assert second["started_from"] == first["cursors"]
    assert second["api"]["requests"] == second_requests == 4
    assert_store_mirrors_sim(store, sim_store)
    sales = store.read("sales")
    assert len(sales) == versions_before + 3  # the edited sales keep their earlier versions
    assert sales.loc[sales["id"] == closed[0], "status"].tolist() == ["CLOSED", "VOIDED"]
    assert sales.loc[sales["id"] == new_id, "amount_cents"].tolist() == [150000]
    # A rerun with nothing new reads nothing and does not even rewrite the manifest.
    assert third["records"] == {"sales": 0, "customers": 0}
    assert third["cursors"] == second["cursors"]
    assert store.manifest() == manifest


def test_server_errors_are_retried_and_counted(demo_store_json: str, tmp_path: Path) -> None:
    sim_store = sim_pkg.SimStore.loads(demo_store_json)
    store = OrderStore(tmp_path / "store")
    with running_simulator(store=sim_store, clock=clock_after(NOW), token=TOKEN, page_cap=100) as sim:
        sim.faults.add("status", method="GET", path="^/sales$", times=2, status=503)
        result = extract_orders(make_client(sim), store)
        statuses = [r.status for r in sim.requests]
    assert result["api"]["retries"] >= 2
    assert result["api"]["requests"] == len(statuses)
    assert statuses.count(503) == 2
    assert_store_mirrors_sim(store, sim_store)


def test_rate_limited_extraction_reports_429s(demo_store_json: str, tmp_path: Path) -> None:
    sim_store = sim_pkg.SimStore.loads(demo_store_json)
    store = OrderStore(tmp_path / "store")
    with running_simulator(store=sim_store, clock=clock_after(NOW), token=TOKEN, page_cap=200, rate_limit=2, window_seconds=3) as sim:
        # 2 requests per 3 s: the third page request follows the first two within milliseconds, so
        # the limit is hit however slow the machine is (1 request per 1/3 s was not, under load).
        client = make_client(sim, low_remaining_fraction=0)
        result = extract_orders(client, store)
        limited = sum(1 for r in sim.requests if r.status == 429)
    assert limited > 0
    assert result["api"]["rate_limited"] == limited
    assert_store_mirrors_sim(store, sim_store)
