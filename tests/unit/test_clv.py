"""The CLV / tier engine against docs/tier-rules.md, on hand-built store frames.

Every expected value is worked out by hand in the test. Amounts enter the way the store holds
them: `money.sale_amount_cents` of the sale's JSON decimals (half-up per sale), so the cases that
floats get wrong go through the same path as production data.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pytest

from include.tier_sync.clv import (
    as_of_mask,
    assign_tiers,
    compute_customer_metrics,
    versions_as_of,
)
from include.tier_sync.money import sale_amount_cents
from include.tier_sync.rules import TierRules

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RULES = TierRules()

SALE_STR = ("id", "customer_id", "status", "state")
SALE_TS = ("sale_date", "created_at", "updated_at", "deleted_at")
CUST_STR = (
    "id",
    "customer_code",
    "first_name",
    "last_name",
    "name",
    "email",
    "phone",
    "mobile",
    "customer_group_id",
)
CUST_TS = ("created_at", "updated_at", "deleted_at")


def sale(
    sale_id: str,
    customer_id: str | None,
    amount: dict[str, Any] | str | int,
    when: datetime,
    *,
    status: str | None = "CLOSED",
    state: str | None = None,
    version: int = 1,
    updated_at: datetime | None = None,
    created_at: datetime | None = None,
    deleted_at: datetime | None = None,
) -> dict[str, Any]:
    """One stored sale version. `amount` is the JSON money fields, a decimal string (tax incl.) or cents."""
    if isinstance(amount, int):
        cents = amount
    elif isinstance(amount, str):
        cents = sale_amount_cents({"total_price_incl": Decimal(amount)})
    else:
        cents = sale_amount_cents(amount)
    return {
        "id": sale_id,
        "customer_id": customer_id,
        "status": status,
        "state": state,
        "sale_date": when,
        "created_at": created_at or when,
        "updated_at": updated_at or when,
        "deleted_at": deleted_at,
        "amount_cents": cents,
        "version": version,
    }


def customer(
    customer_id: str,
    *,
    name: str | None = None,
    loyalty: bool = False,
    version: int = 1,
    created_at: datetime | None = None,
    updated_at: datetime | None = None,
    deleted_at: datetime | None = None,
    email: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    phone: str | None = None,
    mobile: str | None = None,
) -> dict[str, Any]:
    created = created_at or datetime(2024, 1, 1, tzinfo=UTC)
    return {
        "id": customer_id,
        "customer_code": f"CODE-{customer_id}",
        "first_name": first_name,
        "last_name": last_name,
        "name": name if name is not None else f"Name {customer_id}",
        "email": email if email is not None else f"{customer_id}@example.com",
        "phone": phone,
        "mobile": mobile,
        "enable_loyalty": loyalty,
        "customer_group_id": "grp-default",
        "created_at": created,
        "updated_at": updated_at or created,
        "deleted_at": deleted_at,
        "version": version,
    }


def _frame(rows: list[dict[str, Any]], str_cols: tuple[str, ...], ts_cols: tuple[str, ...]) -> pd.DataFrame:
    """Rows in the store's schema (str columns, datetime64[us, UTC], int64)."""
    df = pd.DataFrame(rows)
    for col in str_cols:
        df[col] = df[col].astype("str")
    for col in ts_cols:
        df[col] = pd.to_datetime(df[col], utc=True).dt.as_unit("us")
    df["version"] = df["version"].astype("int64")
    return df


def sales_df(*rows: dict[str, Any]) -> pd.DataFrame:
    if not rows:
        return _frame([sale("x", None, 0, AS_OF)], SALE_STR, SALE_TS).iloc[0:0]
    df = _frame(list(rows), SALE_STR, SALE_TS)
    df["amount_cents"] = df["amount_cents"].astype("int64")
    return df


def customers_df(*rows: dict[str, Any]) -> pd.DataFrame:
    df = _frame(list(rows), CUST_STR, CUST_TS)
    df["enable_loyalty"] = df["enable_loyalty"].astype(bool)
    return df


def metrics_for(sales: pd.DataFrame, customers: pd.DataFrame, as_of: datetime = AS_OF) -> pd.DataFrame:
    return compute_customer_metrics(sales, customers, as_of, RULES).set_index("customer_id")


def one(sales: pd.DataFrame, customer_id: str = "c1", as_of: datetime = AS_OF, **cust: Any) -> pd.Series:
    """Metrics row of a single customer c1."""
    return metrics_for(sales, customers_df(customer(customer_id, **cust)), as_of).loc[customer_id]


def us(when: datetime) -> int:
    return int((when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1))


# --- exact money -------------------------------------------------------------------------------


def test_threshold_sum_that_floats_get_wrong_reaches_evergreen() -> None:
    # 1309.05 + 165.58 + 25.37 == 1500.00 exactly; in binary floats it is 1499.9999999999998.
    assert 1309.05 + 165.58 + 25.37 < 1500
    t = AS_OF - 100 * DAY
    row = one(
        sales_df(sale("s1", "c1", "1309.05", t), sale("s2", "c1", "165.58", t), sale("s3", "c1", "25.37", t))
    )
    assert row["lifetime_value_cents"] == 150_000
    assert row["tier"] == "Evergreen"


def test_many_small_sales_sum_exactly_to_sprout() -> None:
    # 2500 x 0.10 == 250.00; a float running sum gives 249.99999999999008.
    assert sum([0.1] * 2500) < 250
    t = AS_OF - 200 * DAY
    row = one(sales_df(*(sale(f"s{i}", "c1", "0.10", t) for i in range(2500))))
    assert row["lifetime_value_cents"] == 25_000
    assert row["order_count"] == 2500
    assert row["tier"] == "Sprout"


def test_half_cent_rounds_up_to_evergreen_and_one_cent_less_is_bloom() -> None:
    t = AS_OF - 10 * DAY
    assert one(sales_df(sale("s1", "c1", "1499.995", t)))["tier"] == "Evergreen"  # -> 1500.00
    row = one(sales_df(sale("s1", "c1", "1499.99", t)))
    assert row["lifetime_value_cents"] == 149_999
    assert row["tier"] == "Bloom"


def test_tax_exclusive_totals_add_tax_and_inclusive_total_wins() -> None:
    t = AS_OF - 10 * DAY
    excl = {"total_price": Decimal("1300.00"), "total_tax": Decimal("200.00")}  # no incl: 1500.00
    assert one(sales_df(sale("s1", "c1", excl, t)))["tier"] == "Evergreen"
    incl = {
        "total_price_incl": Decimal("1499.99"),
        "total_price": Decimal("1300.00"),
        "total_tax": Decimal("200.00"),
    }
    row = one(sales_df(sale("s1", "c1", incl, t)))
    assert row["lifetime_value_cents"] == 149_999  # the tax-inclusive figure, not 1300 + 200
    assert row["tier"] == "Bloom"


def test_missing_total_price_incl_and_missing_tax_count_as_zero() -> None:
    t = AS_OF - 10 * DAY
    row = one(sales_df(sale("s1", "c1", {"total_price": Decimal("250.00")}, t)))  # no incl, no tax
    assert row["lifetime_value_cents"] == 25_000
    assert row["tier"] == "Sprout"
    row = one(sales_df(sale("s1", "c1", {"total_price_incl": None, "total_price": Decimal("249.995")}, t)))
    assert row["lifetime_value_cents"] == 25_000  # 249.995 half-up


# --- returns -----------------------------------------------------------------------------------


def test_return_drops_bloom_to_sprout_and_is_not_a_purchase() -> None:
    t = AS_OF - 40 * DAY
    before = one(sales_df(sale("s1", "c1", "800.00", t)))
    assert before["tier"] == "Bloom"
    row = one(sales_df(sale("s1", "c1", "800.00", t), sale("r1", "c1", "-100.00", t + DAY)))
    assert row["lifetime_value_cents"] == 70_000
    assert row["order_count"] == 1
    assert row["tier"] == "Sprout"
    assert row["last_order_us"] == us(t)  # the return is not an order


def test_only_returns_and_zero_sales_give_no_tier() -> None:
    t = AS_OF - 5 * DAY
    row = one(sales_df(sale("r1", "c1", "-20.00", t), sale("z1", "c1", "0.00", t)))
    assert row["lifetime_value_cents"] == -2000
    assert row["order_count"] == 0
    assert row["tier"] == "None"
    assert row["first_order_us"] == row["last_order_us"] == np.iinfo(np.int64).min


# --- statuses and deletions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state", "counted"),
    [
        ("CLOSED", None, True),
        ("LAYBY_CLOSED", None, True),
        ("ONACCOUNT_CLOSED", None, True),
        ("DISPATCHED_CLOSED", None, True),
        ("PICKED_UP_CLOSED", None, True),
        ("SERVICE_CLOSED", None, True),
        ("VOIDED", None, False),
        ("SAVED", None, False),  # parked
        ("LAYBY", None, False),
        ("ONACCOUNT", None, False),
        ("OPEN", None, False),
        ("AWAITING_DISPATCH", None, False),
        (None, "closed", True),
        (None, "parked", False),
        (None, None, False),
        ("VOIDED", "closed", False),  # a status, when present, decides
    ],
)
def test_only_finished_sales_count(status: str | None, state: str | None, counted: bool) -> None:
    t = AS_OF - 10 * DAY
    row = one(
        sales_df(sale("keep", "c1", "10.00", t), sale("s1", "c1", "300.00", t, status=status, state=state))
    )
    assert row["lifetime_value_cents"] == (31_000 if counted else 1_000)
    assert row["order_count"] == (2 if counted else 1)


def test_deleted_sale_is_ignored_unless_deleted_after_as_of() -> None:
    t = AS_OF - 10 * DAY
    deleted = sales_df(sale("s1", "c1", "300.00", t, deleted_at=AS_OF - DAY), sale("s2", "c1", "5.00", t))
    assert one(deleted)["lifetime_value_cents"] == 500
    # Deleted only after the cut-off: on that day it still counted.
    later = sales_df(sale("s1", "c1", "300.00", t, deleted_at=AS_OF), sale("s2", "c1", "5.00", t))
    assert one(later)["lifetime_value_cents"] == 30_500


def test_layby_counts_from_the_version_that_closed_it() -> None:
    t = AS_OF - 20 * DAY
    rows = [
        sale("s1", "c1", "400.00", t, status="LAYBY", version=1, updated_at=t),
        sale("s1", "c1", "400.00", t, status="LAYBY_CLOSED", version=2, updated_at=AS_OF - DAY),
    ]
    assert one(sales_df(*rows))["tier"] == "Sprout"
    assert one(sales_df(*rows), as_of=AS_OF - 2 * DAY)["order_count"] == 0  # not closed yet then


# --- versions ----------------------------------------------------------------------------------


def test_same_sale_edited_twice_counts_once_at_its_newest_version() -> None:
    t = AS_OF - 10 * DAY
    rows = [
        sale("s1", "c1", "100.00", t, version=10, updated_at=t),
        sale("s1", "c1", "900.00", t, version=30, updated_at=t + 2 * DAY),  # rows out of order
        sale("s1", "c1", "500.00", t, version=20, updated_at=t + DAY),
    ]
    row = one(sales_df(*rows))
    assert row["lifetime_value_cents"] == 90_000
    assert row["order_count"] == 1
    assert row["tier"] == "Bloom"


def test_edit_after_as_of_is_ignored() -> None:
    t = AS_OF - 10 * DAY
    rows = [
        sale("s1", "c1", "500.00", t, version=1, updated_at=t),
        sale("s1", "c1", "2000.00", t, version=2, updated_at=AS_OF),  # at as_of: not yet
        sale("s2", "c1", "1000.00", AS_OF + DAY, version=3),  # a sale made later
    ]
    row = one(sales_df(*rows))
    assert row["lifetime_value_cents"] == 50_000
    assert row["tier"] == "Sprout"


def test_as_of_view_falls_back_to_the_oldest_version_seen() -> None:
    # Every version we have was written after as_of (we started extracting later): the earliest
    # state we ever saw stands in for the state at as_of.
    t = AS_OF - 10 * DAY
    rows = [
        sale("s1", "c1", "800.00", t, version=7, updated_at=AS_OF + DAY, created_at=t),
        sale("s1", "c1", "50.00", t, version=9, updated_at=AS_OF + 2 * DAY, created_at=t),
    ]
    assert one(sales_df(*rows))["lifetime_value_cents"] == 80_000


def test_versions_as_of_keeps_one_row_per_id_and_drops_records_created_later() -> None:
    t = AS_OF - DAY
    df = sales_df(
        sale("a", "c1", 1, t, version=1),
        sale("a", "c1", 2, t, version=2),
        sale("b", "c1", 3, t, version=5, updated_at=AS_OF + DAY),
        sale("b", "c1", 4, t, version=4, updated_at=AS_OF + DAY),
        sale("c", "c1", 5, AS_OF + DAY, version=1, created_at=AS_OF + DAY),
        sale("d", "c1", 6, t, version=3),
        sale("d", "c1", 7, t, version=3),  # the same (id, version) stored twice
    )
    view = versions_as_of(df, AS_OF)
    assert view["amount_cents"].tolist() == [2, 4, 6]
    assert as_of_mask(df.iloc[[0, 5]], AS_OF).tolist() == [True, True]  # fast path: nothing to drop


# --- cut-off and the 30-day window ---------------------------------------------------------------


def test_sale_exactly_at_as_of_is_ignored_and_one_microsecond_before_counts() -> None:
    rows = [
        sale("s1", "c1", "1000.00", AS_OF),
        sale("s2", "c1", "10.00", AS_OF - timedelta(microseconds=1)),
    ]
    row = one(sales_df(*rows))
    assert row["lifetime_value_cents"] == 1000
    assert row["order_count"] == 1


def test_window_starts_exactly_thirty_days_before_as_of() -> None:
    start = AS_OF - 30 * DAY
    inside = [
        sale("s1", "c1", "1.00", start),  # exactly as_of - 30 days: counts
        sale("s2", "c1", "1.00", AS_OF - DAY),
        sale("s3", "c1", "1.00", AS_OF - timedelta(seconds=1)),
    ]
    row = one(sales_df(*inside))
    assert row["purchases_in_window"] == 3
    assert row["tier"] == "Sprout"  # three purchases in 30 days, whatever the spend

    edge = [sale("s1", "c1", "1.00", start - timedelta(microseconds=1)), *inside[1:]]
    row = one(sales_df(*edge), loyalty=True)
    assert row["purchases_in_window"] == 2
    assert row["order_count"] == 3
    assert row["tier"] == "Seed"


def test_returns_in_the_window_are_not_purchases() -> None:
    t = AS_OF - 2 * DAY
    rows = [sale("s1", "c1", "5.00", t), sale("s2", "c1", "5.00", t), sale("r1", "c1", "-1.00", t)]
    row = one(sales_df(*rows))
    assert row["purchases_in_window"] == 2
    assert row["tier"] == "First Time Buyer"


# --- customers -----------------------------------------------------------------------------------


def test_null_and_unknown_customer_ids_are_ignored() -> None:
    t = AS_OF - DAY
    sales = sales_df(
        sale("s1", None, "5000.00", t), sale("s2", "ghost", "5000.00", t), sale("s3", "c1", "10.00", t)
    )
    m = metrics_for(sales, customers_df(customer("c1"), customer("c2")))
    assert m.index.tolist() == ["c1", "c2"]
    assert m.loc["c1", "lifetime_value_cents"] == 1000
    assert m.loc["c2", "tier"] == "None"


def test_deleted_customer_has_no_row_and_their_sales_do_not_count() -> None:
    t = AS_OF - 10 * DAY
    sales = sales_df(
        sale("s1", "c1", "2000.00", t), sale("s2", "c2", "2000.00", t), sale("s3", "c3", "20.00", t)
    )
    custs = customers_df(
        customer("c1", deleted_at=AS_OF - DAY, version=2),
        customer("c2", deleted_at=AS_OF + DAY, version=2),  # deleted only after as_of
        customer("c3"),
        customer("c4", created_at=AS_OF + DAY),  # did not exist yet
    )
    m = metrics_for(sales, custs)
    assert m.index.tolist() == ["c2", "c3"]
    assert m.loc["c2", "tier"] == "Evergreen"


def test_customer_versions_as_of_decide_loyalty() -> None:
    t = AS_OF - 10 * DAY
    custs = customers_df(
        customer("c1", loyalty=False, version=1, updated_at=t),
        customer("c1", loyalty=True, version=2, updated_at=AS_OF + DAY),  # joined after as_of
    )
    m = metrics_for(sales_df(sale("s1", "c1", "10.00", t)), custs)
    assert m.loc["c1", "tier"] == "First Time Buyer"
    m = metrics_for(sales_df(sale("s1", "c1", "10.00", t)), custs, as_of=AS_OF + 2 * DAY)
    assert m.loc["c1", "tier"] == "Seed"


def test_metrics_columns_for_a_typical_customer() -> None:
    first, last = AS_OF - 400 * DAY, AS_OF - 3 * DAY - timedelta(hours=1)
    sales = sales_df(sale("s1", "c1", "120.00", first), sale("s2", "c1", "130.00", last))
    row = metrics_for(
        sales, customers_df(customer("c1", name="", first_name="Ada", last_name="Lovelace", mobile="+1 555"))
    ).loc["c1"]
    assert row["lifetime_value_cents"] == 25_000
    assert row["order_count"] == 2
    assert row["purchases_in_window"] == 1
    assert row["first_order_us"] == us(first)
    assert row["last_order_us"] == us(last)
    assert row["name"] == "Ada Lovelace"  # empty `name` falls back to first + last
    assert row["phone"] == "+1 555"  # no phone: the mobile number
    assert row["tier"] == "Sprout"


def test_empty_store_gives_customers_without_tier() -> None:
    m = metrics_for(sales_df(), customers_df(customer("c1"), customer("c2", loyalty=True)))
    assert m["tier"].tolist() == ["None", "None"]
    assert m["order_count"].tolist() == [0, 0]


# --- the tier table ------------------------------------------------------------------------------


def test_tier_table_first_match_wins() -> None:
    ltv = np.array([150_000, 149_999, 75_000, 74_999, 25_000, 24_999, 100, 100, 0, 500_000], dtype=np.int64)
    cnt = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=np.int64)
    win = np.array([0, 0, 0, 0, 0, 3, 0, 0, 0, 0], dtype=np.int64)
    loy = np.array([True, True, True, True, True, True, True, False, True, False])
    tiers = assign_tiers(ltv, cnt, win, loy, RULES).tolist()
    assert tiers == [
        "Evergreen",
        "Bloom",
        "Bloom",
        "Sprout",
        "Sprout",
        "Sprout",  # 3 purchases in the window
        "Seed",
        "First Time Buyer",
        "None",
        "None",  # no purchase: no tier whatever the value
    ]


def test_configured_thresholds_apply() -> None:
    rules = TierRules.from_mapping({"sprout_min": 100, "window_days": 7, "sprout_min_purchases_in_window": 2})
    t = AS_OF - 8 * DAY
    sales = sales_df(
        sale("s1", "c1", "100.00", t), sale("s2", "c2", "1.00", AS_OF - DAY), sale("s3", "c2", "1.00", t)
    )
    m = compute_customer_metrics(sales, customers_df(customer("c1"), customer("c2")), AS_OF, rules)
    assert m.set_index("customer_id")["tier"].to_dict() == {"c1": "Sprout", "c2": "First Time Buyer"}
