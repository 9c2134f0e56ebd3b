"""Sale amounts that cannot be right (issue 13): never a silent $0, a silent Evergreen or a wrong sum.

A finished sale without any amount field, an amount keyed wrong (a barcode in the price, `1E+20`)
and sums beyond int64 each stop the run with an error naming the sale (or customer), or, for an
implausible amount with `implausible_amounts: "quarantine"`, leave that sale out and report it.
Fixed dates only (test_clv's AS_OF).
"""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from include.tier_sync import clv, money
from include.tier_sync.clv import compute_customer_metrics
from include.tier_sync.extract import extract_orders
from include.tier_sync.rules import TierRules
from include.tier_sync.store import MalformedRecordError, OrderStore
from tests.unit.test_clv import AS_OF, DAY, customer, customers_df, sale, sales_df
from tests.unit.test_extract import FakeClient

pytestmark = pytest.mark.unit

T = AS_OF - 5 * DAY
TWO_MILLION = 200_000_000  # cents


def metrics(sales: pd.DataFrame, *ids: str, rules: TierRules | None = None) -> pd.DataFrame:
    cust = customers_df(*(customer(i) for i in ids or ("c1",)))
    return compute_customer_metrics(sales, cust, AS_OF, rules or TierRules()).set_index("customer_id")


# -- 1. a finished sale with no amount at all ---------------------------------------------------------


def test_extraction_stops_at_a_finished_sale_without_amount_naming_it(tmp_path: Path) -> None:
    store = OrderStore(tmp_path / "store")
    client = FakeClient()
    client.put_customer("c-1")
    client.put_sale("s-good", amount="20.00")
    bad = client.put_sale("s-bare")
    del bad["total_price_incl"]  # and no total_price / total_tax either
    with pytest.raises(MalformedRecordError) as info:
        extract_orders(client, store, commit_every_pages=20)
    assert "id=s-bare" in str(info.value) and "total_price_incl/total_price/total_tax" in str(info.value)
    assert "s-bare" not in set(store.read("sales")["id"])  # never stored as a $0 sale


def test_a_qualifying_sale_with_a_null_amount_fails_compute_naming_it() -> None:
    sales = sales_df(sale("s-ok", "c1", 30_000, T), sale("s-null", "c1", 0, T), sale("s-nan", "c1", 0, T))
    # What a store built some other way could hold: nullable ints, or floats with NaN / a fraction.
    for column in (
        pd.array([30_000, None, None], dtype="Int64"),
        np.array([30_000.0, np.nan, 0.5]),
        np.array([30_000, None, "12"], dtype=object),
    ):
        sales["amount_cents"] = column
        with pytest.raises(MalformedRecordError) as info:
            metrics(sales)
        message = str(info.value)
        assert "s-null" in message and "s-nan" in message and "s-ok" not in message
        assert "no amount" in message and info.value.field == "amount_cents"
    # A parked sale without an amount never counts, so it is no reason to fail.
    parked = sales_df(sale("s-ok", "c1", 30_000, T), sale("s-park", "c1", 0, T, status="SAVED"))
    parked["amount_cents"] = pd.array([30_000, None], dtype="Int64")
    assert metrics(parked).loc["c1", "lifetime_value_cents"] == 30_000


# -- 2. an implausible amount -------------------------------------------------------------------------


def test_a_two_million_dollar_sale_fails_the_run_naming_the_sale() -> None:
    sales = sales_df(
        sale("s-ok", "c1", "300.00", T),
        sale("s-barcode", "c1", {"total_price_incl": Decimal("2000000.00")}, T),
    )
    with pytest.raises(MalformedRecordError) as info:
        metrics(sales)
    message = str(info.value)
    assert "s-barcode" in message and "s-ok" not in message
    assert "max_sale_amount_cents" in message and '"quarantine"' in message
    assert "2000000.00" not in message  # the bound is named, never the value
    assert info.value.sale_ids == ("s-barcode",)  # type: ignore[attr-defined]
    # Only qualifying sales are judged: a parked or a walk-in barcode cannot move a tier.
    harmless = sales_df(
        sale("s-ok", "c1", "300.00", T),
        sale("s-parked", "c1", TWO_MILLION, T, status="SAVED"),
        sale("s-walk-in", None, TWO_MILLION, T),
    )
    assert metrics(harmless).loc["c1", "tier"] == "Sprout"


def test_the_sale_bound_is_strict_either_way_and_configurable() -> None:
    for cents in (100_000_000, -100_000_000, 10**13 - 1):  # exactly $1,000,000.00, a return of it, more
        with pytest.raises(MalformedRecordError, match="s-x"):
            metrics(sales_df(sale("s-x", "c1", cents, T)))
    row = metrics(sales_df(sale("s-x", "c1", 99_999_999, T))).loc["c1"]
    assert row["lifetime_value_cents"] == 99_999_999 and row["tier"] == "Evergreen"
    lower = TierRules.from_mapping({"max_sale_amount": 500})
    with pytest.raises(MalformedRecordError, match="s-600"):
        metrics(sales_df(sale("s-600", "c1", "600.00", T)), rules=lower)
    assert metrics(sales_df(sale("s-499", "c1", "499.99", T)), rules=lower).loc["c1", "order_count"] == 1


def test_quarantine_leaves_implausible_sales_out_and_reports_them(caplog: pytest.LogCaptureFixture) -> None:
    rules = TierRules(implausible_amounts="quarantine")
    sales = sales_df(
        sale("s-ok", "c1", "300.00", T),
        sale("s-barcode", "c1", TWO_MILLION, AS_OF - DAY),  # newer than s-ok: would be Last Order
        sale("s-c2", "c2", "40.00", T),
        sale("s-refund", "c2", -5 * TWO_MILLION, T),
    )
    with caplog.at_level(logging.WARNING, logger="include.tier_sync.clv"):
        out = compute_customer_metrics(sales, customers_df(customer("c1"), customer("c2")), AS_OF, rules)
    by_id = out.set_index("customer_id")
    assert by_id.loc["c1", "lifetime_value_cents"] == 30_000 and by_id.loc["c1", "tier"] == "Sprout"
    assert by_id.loc["c1", "order_count"] == 1
    assert by_id.loc["c1", "last_order_us"] == clv.as_of_us(T)
    assert by_id.loc["c2", "lifetime_value_cents"] == 4_000 and by_id.loc["c2", "tier"] == "First Time Buyer"
    assert out.attrs[clv.QUARANTINED_ATTR] == ["s-barcode", "s-refund"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "quarantined 2" in warnings[0]
    assert "s-barcode" in warnings[0] and "s-refund" in warnings[0]
    # Nothing quarantined: an empty report, not a missing one.
    clean = compute_customer_metrics(
        sales_df(sale("s-ok", "c1", "300.00", T)), customers_df(customer("c1")), AS_OF, rules
    )
    assert clean.attrs[clv.QUARANTINED_ATTR] == []


# -- 3. huge values: an error, never OverflowError ---------------------------------------------------


def test_1e20_is_a_malformed_record_at_extraction_not_an_overflow_error(tmp_path: Path) -> None:
    store = OrderStore(tmp_path / "store")
    client = FakeClient()
    client.put_customer("c-1")
    client.put_sale("s-good", amount="20.00")
    client.put_sale("s-1e20", amount="1E+20")
    with pytest.raises(MalformedRecordError) as info:
        extract_orders(client, store, commit_every_pages=20)
    assert "id=s-1e20" in str(info.value) and "out of range" in str(info.value)
    for value in ("1E+20", Decimal("1E+20"), 1e20, "NaN", "Infinity", float("-inf"), Decimal("1E+999999")):
        with pytest.raises(ValueError):  # AmountError: a ValueError, never OverflowError / InvalidOperation
            money.to_cents(value)


def test_an_amount_column_beyond_int64_fails_compute_naming_the_sale() -> None:
    sales = sales_df(sale("s-ok", "c1", 30_000, T), sale("s-huge", "c1", 0, T))
    sales["amount_cents"] = np.array([30_000, 10**22], dtype=object)  # to_numpy(int64) would overflow
    with pytest.raises(MalformedRecordError, match="s-huge"):
        metrics(sales)


# -- 4. sums that int64 cannot hold --------------------------------------------------------------------


def test_two_sales_that_would_overflow_int64_fail_instead_of_wrapping() -> None:
    near_max = 9_000_000_000_000_000_000  # cents; fits int64 (9.22e18), two of them do not
    sales = sales_df(sale("s-a", "c1", near_max, T), sale("s-b", "c1", near_max, T))
    with pytest.raises(MalformedRecordError) as info:
        metrics(sales)
    assert "s-a" in str(info.value) and "s-b" in str(info.value)
    # The sum itself is guarded too, whatever the per-sale bound: exact where int64 holds it ...
    ids = pd.Series(["c1", "c2"])
    pos = np.array([0, 0, 1], dtype=np.int64)
    amount = np.array([4 * 10**18, 1, 4 * 10**18], dtype=np.int64)
    assert clv.sum_cents(pos, amount, 2, ids).tolist() == [4 * 10**18 + 1, 4 * 10**18]
    # ... and refused, naming the customer, where it does not.
    overflow = np.array([5 * 10**18, 5 * 10**18, 1], dtype=np.int64)
    with pytest.raises(clv.AmountOverflowError, match="c1") as info2:
        clv.sum_cents(pos, overflow, 2, ids)
    assert info2.value.customer_ids == ("c1",)
