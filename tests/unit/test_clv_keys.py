"""The engine's fast paths give exactly the answers of the plain ones.

Lightspeed ids are 36-character UUIDs, so the as-of view and the customer lookup hash their bytes
as 64-bit words (`id_keys.Words`) instead of hashing strings, and compute_tiers hands the engine the
store's Arrow table instead of a DataFrame. Here a random store with every as-of case (several
versions, edits after as_of, records created after as_of, the same (id, version) twice, null and
unknown customer ids) is run through the fast path, the Arrow input, the generic path (ids of
varying length) and a forced hash collision, against a plain loop over the contract.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from include.tier_sync import clv, id_keys
from include.tier_sync.rules import TierRules
from include.tier_sync.store import CUSTOMERS_SCHEMA, SALES_SCHEMA

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
US = 1_000_000
DAY_US = 86_400 * US
CUT = clv.as_of_us(AS_OF)


def _uuid(prefix: int, i: int) -> str:
    return f"{prefix:08x}-0000-4000-8000-{i:012x}"


def _ts(us: int | None) -> datetime | None:
    return None if us is None else datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def random_store(seed: int = 3) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Customer and sale versions covering the as-of cases, as store rows (plain Python)."""
    rng = np.random.default_rng(seed)
    customers: list[dict[str, Any]] = []
    version = 1
    for i in range(120):
        cid = _uuid(0xC, i)
        created = CUT - int(rng.integers(DAY_US, 400 * DAY_US))
        if i % 17 == 0:
            created = CUT + DAY_US  # created after as_of: does not exist for the run
        for v in range(int(rng.integers(1, 4))):
            updated = created + v * DAY_US + int(rng.integers(0, DAY_US))
            if rng.random() < 0.3:
                updated = CUT + int(rng.integers(0, 5 * DAY_US))  # written after as_of
            deleted = None
            if rng.random() < 0.1:
                deleted = CUT + int(rng.integers(-5 * DAY_US, 5 * DAY_US))
            customers.append(
                {
                    "id": cid,
                    "customer_code": f"C{i}",
                    "first_name": "Ana",
                    "last_name": f"L{i}",
                    "name": None if i % 5 == 0 else f"Name {i}",
                    "email": f"c{i}@example.com",
                    "phone": None,
                    "mobile": f"+1{i}",
                    "enable_loyalty": bool(rng.random() < 0.5),
                    "customer_group_id": "g",
                    "created_at": _ts(created),
                    "updated_at": _ts(updated),
                    "deleted_at": _ts(deleted),
                    "version": version,
                }
            )
            version += 1
    statuses = ["CLOSED", "LAYBY_CLOSED", "SAVED", "VOIDED", None, ""]
    sales: list[dict[str, Any]] = []
    for i in range(1500):
        sid = _uuid(0x5, i)
        r = rng.random()
        cust = None if r < 0.05 else "ffffffff-dead-4000-8000-000000000000" if r < 0.08 else _uuid(0xC, int(rng.integers(0, 120)))
        sale_date = CUT - int(rng.integers(-2 * DAY_US, 90 * DAY_US))
        created = None if i % 50 == 0 else sale_date
        for v in range(int(rng.integers(1, 4))):
            updated = sale_date + v * US * 60
            if rng.random() < 0.25:
                updated = CUT + int(rng.integers(0, 3 * DAY_US))
            row = {
                "id": sid,
                "customer_id": cust,
                "status": statuses[int(rng.integers(0, len(statuses)))],
                "state": "closed" if rng.random() < 0.7 else "parked",
                "sale_date": _ts(sale_date),
                "created_at": _ts(created),
                "updated_at": None if i % 40 == 1 else _ts(updated),
                "deleted_at": _ts(sale_date + DAY_US) if rng.random() < 0.05 else None,
                "amount_cents": int(rng.integers(-5_000, 90_000)),
                "version": version,
            }
            sales.append(row)
            if i % 97 == 0:
                sales.append(dict(row))  # the same (id, version) stored twice
            version += 1
    return customers, sales


def reference_view(rows: list[dict[str, Any]]) -> set[int]:
    """Row numbers of the as-of view, by the contract's words, one id at a time."""
    by_id: dict[str, list[int]] = {}
    for n, row in enumerate(rows):
        if row["id"] is None:
            continue
        created = row["created_at"]
        if created is None or created < AS_OF:
            by_id.setdefault(row["id"], []).append(n)
    chosen = set()
    for numbers in by_id.values():
        current = [n for n in numbers if rows[n]["updated_at"] is None or rows[n]["updated_at"] < AS_OF]
        if current:
            best = max(rows[n]["version"] for n in current)
            chosen.add(min(n for n in current if rows[n]["version"] == best))
        else:
            oldest = min(rows[n]["version"] for n in numbers)
            chosen.add(min(n for n in numbers if rows[n]["version"] == oldest))
    return chosen


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def frame(rows: list[dict[str, Any]], schema: pa.Schema) -> pd.DataFrame:
    return table(rows, schema).to_pandas()


def renamed(rows: list[dict[str, Any]], columns: tuple[str, ...], names: dict[str, str]) -> list[dict[str, Any]]:
    return [{**r, **{c: names.get(r[c], r[c]) if r[c] is not None else None for c in columns}} for r in rows]


@pytest.mark.parametrize("threads", ["serial", "both cores"])
def test_the_fixed_width_view_is_the_contracts_view(threads: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if threads == "both cores":  # the split the engine makes from a million rows on, on this small store
        monkeypatch.setattr(id_keys, "_PARALLEL_ROWS", 1)
        monkeypatch.setattr(id_keys, "_STEP_ROWS", 64)
    customers, sales = random_store()
    assert id_keys.Words.of(pa.array([r["id"] for r in sales])) is not None  # the fast path is taken
    for rows, schema in ((customers, CUSTOMERS_SCHEMA), (sales, SALES_SCHEMA)):
        expected = reference_view(rows)
        assert set(np.flatnonzero(clv.as_of_mask(frame(rows, schema), AS_OF))) == expected
        assert set(np.flatnonzero(clv.as_of_mask(table(rows, schema), AS_OF))) == expected


def test_arrow_input_fast_path_generic_path_and_a_collision_agree(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    customers, sales = random_store(seed=11)
    rules = TierRules()
    fast = clv.compute_customer_metrics(frame(sales, SALES_SCHEMA), frame(customers, CUSTOMERS_SCHEMA), AS_OF, rules)
    assert fast["order_count"].sum() > 100 and (fast["tier"] != "None").sum() > 20  # a store with substance
    arrow = clv.compute_customer_metrics(table(sales, SALES_SCHEMA), frame(customers, CUSTOMERS_SCHEMA), AS_OF, rules)
    pd.testing.assert_frame_equal(arrow, fast)

    # Ids of varying length (not Lightspeed's) take the generic string hash.
    ids = sorted({r["id"] for r in customers} | {r["id"] for r in sales} | {"ffffffff-dead-4000-8000-000000000000"})
    short = {old: f"x{n}" for n, old in enumerate(ids)}
    back = {v: k for k, v in short.items()}
    assert id_keys.Words.of(pa.array(list(short.values()))) is None
    generic = clv.compute_customer_metrics(
        frame(renamed(sales, ("id", "customer_id"), short), SALES_SCHEMA),
        frame(renamed(customers, ("id",), short), CUSTOMERS_SCHEMA),
        AS_OF,
        rules,
    )
    generic["customer_id"] = generic["customer_id"].map(back)
    generic = generic.sort_values("customer_id", ignore_index=True)
    pd.testing.assert_frame_equal(generic, fast, check_dtype=False)

    # Every id hashing alike: the byte check catches it and the exact path answers the same.
    monkeypatch.setattr(id_keys.Words, "hashes", lambda self: np.zeros(int(self.starts[-1]), dtype=np.int64))
    with caplog.at_level(logging.WARNING, logger="include.tier_sync.id_keys"):
        collided = clv.compute_customer_metrics(
            table(sales, SALES_SCHEMA), frame(customers, CUSTOMERS_SCHEMA), AS_OF, rules
        )
    pd.testing.assert_frame_equal(collided, fast)
    assert "hash collision" in caplog.text


def test_words_only_for_one_width_with_empty_nulls() -> None:
    ids = [_uuid(1, i) for i in range(5)]
    words = id_keys.Words.of(pa.chunked_array([pa.array(ids[:2]), pa.array([None, *ids[2:]])]))
    assert words is not None and words.valid.tolist() == [True, True, False, True, True, True]
    assert len(set(words.hashes().tolist())) == 5
    assert id_keys.Words.of(pa.array(["abcdefgh", "abcdefghi"])) is None  # two widths
    assert id_keys.Words.of(pa.array(["short", "other"])) is None  # under one word
    # The lookup: nulls, unknown ids and a key of another width all come back -1 or exact.
    keys = pa.array(ids[1:4])
    values = pa.array([ids[3], None, ids[0], ids[1], "ffffffff-dead-4000-8000-000000000000"])
    assert id_keys.index_in(values, keys).tolist() == [2, -1, -1, 0, -1]
    assert id_keys.index_in(pa.array(["a", ids[2]]), keys).tolist() == [-1, 1]


@pytest.mark.parametrize("dictionary", [("status", "state"), ("customer_id", "status", "state")])
def test_customer_positions_taken_while_reading_give_the_same_metrics(tmp_path: Any, dictionary: tuple[str, ...]) -> None:
    """compute_tiers' path: the store's sales with customer ids replaced by positions as each piece
    is read, and the live customers passed in; positions against other customers are refused."""
    from include.tier_sync.store import OrderStore

    customers, sales = random_store(seed=5)
    store = OrderStore(tmp_path / "store")
    half = len(sales) // 2
    store.append("sales", table(sales[:half], SALES_SCHEMA), cursor=half)
    store.append("sales", table(sales[half:], SALES_SCHEMA), cursor=len(sales))
    cust = frame(customers, CUSTOMERS_SCHEMA)
    rules = TierRules()
    live = clv.live_customers(cust, AS_OF)
    # With customer_id as dictionaries, each segment's dictionary is looked up once and its positions
    # reused for every later piece of it (id_keys.Lookup): two segments, two different dictionaries.
    read = store.read_table("sales", dictionary=dictionary, each=clv.customer_positions(live["id"]))
    assert clv.CUSTOMER_POSITION in read.column_names and "customer_id" not in read.column_names
    fast = clv.compute_customer_metrics(read, cust, AS_OF, rules, live=live)
    plain = clv.compute_customer_metrics(frame(sales, SALES_SCHEMA), cust, AS_OF, rules)
    pd.testing.assert_frame_equal(fast, plain)
    with pytest.raises(ValueError, match="other live customers"):
        clv.compute_customer_metrics(read, cust, AS_OF, rules, live=live.iloc[:3])
