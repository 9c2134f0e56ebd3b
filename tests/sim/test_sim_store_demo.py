"""The store file round-trip and the demo generator: deterministic, and every required scenario present."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tests.sim.conftest import NOW, amount
from tools.lightspeed_sim import SimStore, generate_demo_store
from tools.lightspeed_sim.jsonutil import dumps, loads, parse_ts

pytestmark = pytest.mark.unit

TIER_GROUP = oracle.GROUPS
SALE_FIELDS = {
    "id", "outlet_id", "register_id", "user_id", "customer_id", "invoice_number", "invoice_sequence",
    "receipt_number", "source", "source_id", "status", "note", "short_code", "return_for", "return_ids",
    "attributes", "total_price", "total_tax", "total_loyalty", "total_surcharge", "sale_date",
    "created_at", "updated_at", "deleted_at", "version", "line_items", "payments", "taxes", "adjustments",
    "external_applications", "ecom_custom_charges", "complete_open_sequence_id", "accounts_transaction_id",
    "has_unsynced_on_account_payments",
}  # fmt: skip


@pytest.fixture(scope="module")
def demo() -> SimStore:
    return generate_demo_store(seed=42, customers=300, now=NOW)


def reference_tiers(store: SimStore, as_of: datetime) -> dict[str, tuple[str, int]]:
    """Customer id -> (tier, lifetime cents), from the shared independent oracle (tests/oracle.py)."""
    expected = oracle.expected_tiers(store.customers, store.sales, as_of)
    return {cid: (e.tier, e.ltv_cents) for cid, e in expected.items()}


def group_name(store: SimStore, customer: dict[str, Any]) -> str:
    return str(store.groups[customer["customer_group_id"]]["name"])


# -- persistence --------------------------------------------------------------------------------


def test_dump_load_round_trip_keeps_exact_decimals(demo: SimStore, tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    demo.dump(path)
    text = path.read_text(encoding="utf-8")
    assert '"total_price_incl":1499.995' in text
    loaded = SimStore.load(path)
    assert loaded.dumps() == demo.dumps()
    sale = loaded.sales[demo.labels["sale_1499_995"]]
    assert isinstance(sale["total_price_incl"], Decimal) and str(sale["total_price_incl"]) == "1499.995"
    assert loaded.labels == demo.labels
    top = max(r["version"] for rs in (loaded.sales, loaded.customers, loaded.groups) for r in rs.values())
    assert loaded.new_version() > top


def test_exact_json_encoder() -> None:
    text = dumps({"a": Decimal("1499.995"), "b": Decimal("1E+2"), "c": [Decimal("-0.10"), 3, None, "é\n"]})
    assert text == '{"a":1499.995,"b":100,"c":[-0.10,3,null,"\\u00e9\\n"]}'
    assert loads(text)["a"] == Decimal("1499.995")


def test_writes_are_stamped_after_the_demo_now(demo: SimStore) -> None:
    store = SimStore.loads(demo.dumps())
    cid = store.labels["seed_249_99"]
    staff = next(g["id"] for g in store.groups.values() if g["name"] == "Staff")
    store.clock = lambda: NOW - timedelta(days=400)  # a clock behind the data must not go backwards
    record = store.move_customer_to_group(cid, staff)
    assert parse_ts(record["updated_at"]) > NOW
    assert record["version"] == max(c["version"] for c in store.customers.values())


# -- the demo store -----------------------------------------------------------------------------


def test_demo_is_deterministic_for_seed_and_now() -> None:
    a = generate_demo_store(seed=5, customers=60, now=NOW)
    b = generate_demo_store(seed=5, customers=60, now=NOW)
    assert a.dumps() == b.dumps()
    assert generate_demo_store(seed=6, customers=60, now=NOW).dumps() != a.dumps()
    assert generate_demo_store(seed=5, customers=60, now=NOW + timedelta(days=1)).dumps() != a.dumps()


def test_demo_groups(demo: SimStore) -> None:
    names = Counter(g["name"] for g in demo.groups.values())
    assert set(names) == {
        "All Customers",
        "GreenHaus Crew - Evergreen",
        "GreenHaus Crew - Bloom",
        "GreenHaus Crew - Sprout",
        "First Time Buyer",
        "Staff",
        "Wholesale",
    }, "one tier group (Seed) is missing so the pipeline must create it"
    assert all(n == 1 for n in names.values())
    default = demo.groups[demo.default_group_id() or ""]
    assert default["name"] == "All Customers" and default["group_id"] == "1111111111"


def test_demo_customers(demo: SimStore) -> None:
    customers = list(demo.customers.values())
    assert len(customers) == 300
    by_group = Counter(group_name(demo, c) for c in customers if not c["deleted_at"])
    assert by_group["All Customers"] > len(customers) / 2
    assert by_group["Staff"] >= 2 and by_group["Wholesale"] >= 2
    assert sum(by_group[g] for g in TIER_GROUP.values()) >= 10
    assert {c["enable_loyalty"] for c in customers} == {True, False}
    assert sum(1 for c in customers if c["deleted_at"]) >= 3
    names = [c["name"] or "" for c in customers]
    assert any("," in n and '"' in n for n in names)
    assert any("\n" in n for n in names)
    assert any(not n.isascii() for n in names)
    assert Counter(c["email"] for c in customers)["noemail@example.com"] >= 2
    for c in customers:
        assert c["name"] == " ".join(p for p in (c["first_name"], c["last_name"]) if p)
        assert c["customer_code"] and c["customer_group_id"] in demo.groups


def test_demo_every_tier_occurs_and_scenarios_hold(demo: SimStore) -> None:
    tiers = reference_tiers(demo, NOW)
    assert set(t for t, _ in tiers.values()) == {*TIER_GROUP, "None"}
    expect = {
        "evergreen_exact_1500_00": ("Evergreen", 150_000),
        "bloom_1499_99": ("Bloom", 149_999),
        "evergreen_1499_995": ("Evergreen", 150_000),
        "bloom_exact_750_00": ("Bloom", 75_000),
        "sprout_749_99": ("Sprout", 74_999),
        "sprout_exact_250_00": ("Sprout", 25_000),
        "seed_249_99": ("Seed", 24_999),
        "first_time_buyer_249_99": ("First Time Buyer", 24_999),
        "sprout_by_frequency": ("Sprout", 4_500),
        "window_edge_not_sprout": ("First Time Buyer", 4_500),
        "return_drops_below_bloom": ("Sprout", 70_000),
        "unreferenced_refund": ("Seed", 24_000),
        "staff_high_spender": ("Evergreen", 260_000),
        "wholesale_high_spender": ("Evergreen", 520_000),
        "wrong_tier_group_big_spender": ("Evergreen", 210_000),
        "no_purchases_in_tier_group": ("None", 0),
        "open_layby_and_onaccount_only": ("None", 0),
        "layby_closed_bloom": ("Bloom", 78_000),
        "onaccount_closed_sprout": ("Sprout", 30_000),
        "missing_total_price_incl": ("Sprout", 26_000),
        "csv_hostile_comma_quote": ("Sprout", 32_000),
    }
    for label, wanted in expect.items():
        assert tiers[demo.labels[label]] == wanted, label
    assert demo.labels["deleted_customer_with_sales"] not in tiers
    # Customers already in their tier group, in a wrong tier group, and protected big spenders.
    in_tier_group = [
        cid for cid, (t, _) in tiers.items() if group_name(demo, demo.customers[cid]) in TIER_GROUP.values()
    ]
    right = [cid for cid in in_tier_group if TIER_GROUP.get(tiers[cid][0]) == group_name(demo, demo.customers[cid])]
    assert right and len(right) < len(in_tier_group)
    assert group_name(demo, demo.customers[demo.labels["staff_high_spender"]]) == "Staff"
    assert group_name(demo, demo.customers[demo.labels["wholesale_high_spender"]]) == "Wholesale"


def test_demo_sales_cover_every_feature(demo: SimStore) -> None:
    sales = list(demo.sales.values())
    statuses = Counter(s["status"] for s in sales)
    assert {"CLOSED", "LAYBY", "LAYBY_CLOSED", "SAVED", "VOIDED", "ONACCOUNT", "ONACCOUNT_CLOSED"} <= set(statuses)
    assert statuses["CLOSED"] > len(sales) / 2
    returns = [s for s in sales if s["return_for"]]
    assert returns and all(amount(s) < 0 for s in returns)
    assert all(s["id"] in demo.sales[s["return_for"]]["return_ids"] for s in returns)
    assert all(ln["is_return"] for s in returns for ln in s["line_items"])
    refunds = [s for s in sales if amount(s) < 0 and not s["return_for"]]
    assert refunds and not any(ln["is_return"] for s in refunds for ln in s["line_items"])
    assert any(s["deleted_at"] for s in sales)
    assert any(s["deleted_at"] and s["status"] == "CLOSED" for s in sales)
    assert sum(1 for s in sales if s["customer_id"] is None) >= 2
    assert any(s["customer_id"] and s["customer_id"] not in demo.customers for s in sales)
    assert sum(1 for s in sales if "total_price_incl" not in s) >= 2
    assert sum(1 for s in sales if s["updated_at"] > s["created_at"]) >= 10
    layby = [s for s in sales if s["status"] == "LAYBY"]
    assert all(s["attributes"] == ["layby"] for s in layby)
    assert "1499.995" in {str(s.get("total_price_incl")) for s in sales}
    recent = Counter(
        s["customer_id"]
        for s in sales
        if s["status"] == "CLOSED" and not s["deleted_at"] and NOW - timedelta(days=30) <= parse_ts(s["sale_date"])
    )
    assert sum(1 for n in recent.values() if n >= 3) >= 2
    assert min(parse_ts(s["sale_date"]) for s in sales) >= NOW - timedelta(days=366)


def test_demo_sale_shape_money_and_time(demo: SimStore) -> None:
    for sale in demo.sales.values():
        assert set(sale) >= SALE_FIELDS, set(SALE_FIELDS) - set(sale)
        lines = sale["line_items"]
        assert lines and all({"id", "product_id", "quantity", "price", "total_price", "total_tax"} <= set(ln) for ln in lines)
        assert sum((ln["total_price"] for ln in lines), Decimal(0)) == sale["total_price"]
        assert sum((ln["total_tax"] for ln in lines), Decimal(0)) == sale["total_tax"]
        if "total_price_incl" in sale:
            assert sale["total_price"] + sale["total_tax"] == sale["total_price_incl"]
    records = [*demo.groups.values(), *demo.customers.values(), *demo.sales.values()]
    for rec in records:
        assert rec["created_at"].endswith("+00:00") and len(rec["created_at"]) == 25
        created, updated = parse_ts(rec["created_at"]), parse_ts(rec["updated_at"])
        assert created <= updated < NOW
        if rec.get("deleted_at"):
            assert parse_ts(rec["deleted_at"]) <= updated
    versions = [r["version"] for r in records]
    assert len(set(versions)) == len(versions) and min(versions) > 30_000_000_000
    in_version_order = sorted(records, key=lambda r: r["version"])
    stamps = [r["updated_at"] for r in in_version_order]
    assert stamps == sorted(stamps), "versions follow the order of changes"
    gaps = {b - a for a, b in zip(sorted(versions), sorted(versions)[1:], strict=False)}
    assert len(gaps) > 1 and min(gaps) >= 1


def test_small_demo_still_has_every_scenario() -> None:
    small = generate_demo_store(seed=1, customers=10, now=NOW)
    assert {"evergreen_1499_995", "csv_hostile_newline", "staff_high_spender"} <= set(small.labels)
    assert len(small.customers) >= 10
