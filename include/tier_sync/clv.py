"""The exact CLV / loyalty-tier engine (docs/tier-rules.md), vectorised over the whole order store.

Money stays in integer cents from the store to the CSV so no float can move a customer across a
threshold. Everything is done with whole-array numpy/pandas operations: the store can hold millions
of sale versions and the engine has to finish in seconds, so there is no per-customer Python loop.
The sales may come as the store's Arrow table (compute_tiers: no pandas copy, customer ids already
turned into positions by `customer_positions`); ids are grouped and looked up by `id_keys`.

Decisions on points the rules leave open (see also docs/contracts.md "as-of view"):

- A record counts as deleted at `as_of` only when `deleted_at < as_of`; a deletion stamped at or
  after `as_of` had not happened yet, so a re-run of an old day reproduces that day.
- A missing `updated_at` counts as "before as_of" (we cannot tell it is later); a missing
  `created_at` counts as "existed"; a missing `sale_date` never qualifies (it cannot be placed
  before the cut-off).
- `status` null or empty falls back to `state == "closed"`.
- Tier is "None" whenever Order Count == 0, before the table is applied: with a configured zero
  threshold a customer without a purchase must still get no group.
- Amounts (issue 13): a qualifying sale whose `amount_cents` is null or not whole int64 cents is
  refused (`SaleAmountError`, naming the sales), never counted as 0; one at or beyond
  `max_sale_amount_cents` either way fails the run too, or with `implausible_amounts: "quarantine"`
  is left out of every figure and reported (log, `QUARANTINED_ATTR` of the metrics). Only
  qualifying sales are judged: a parked or walk-in sale cannot move a tier. Lifetime values are
  exact int64 sums and a sum int64 could not hold is refused (`AmountOverflowError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.tier_sync.id_keys import Lookup, index_in, repeated
from include.tier_sync.money import format_cents
from include.tier_sync.rules import (
    CLOSED_STATE,
    CLOSED_STATUSES,
    IMPLAUSIBLE_QUARANTINE,
    TierRules,
    in_window,
)
from include.tier_sync.rules import US_PER_DAY as US_PER_DAY  # re-exported: master_csv, dashboard
from include.tier_sync.rules import assign_tiers as rule_tiers
from include.tier_sync.store import SALES, MalformedRecordError

log = logging.getLogger(__name__)

NAT = np.iinfo(np.int64).min  # what pandas stores for NaT in an int64 view

_EPOCH = pd.Timestamp(0, tz="UTC")

I64 = np.ndarray[Any, np.dtype[np.int64]]

# The metrics' `attrs` key with the ids of the sales quarantined for an implausible amount.
QUARANTINED_ATTR = "quarantined_sales"
_NAMED = 20  # sale / customer ids named in one error message
_SUM_LIMIT = 2.0**62  # a per-customer sum of |cents| below this cannot overflow int64 (float error included)


def _named(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_NAMED])
    return shown + (f" and {len(ids) - _NAMED} more" if len(ids) > _NAMED else "")


class SaleAmountError(MalformedRecordError):
    """Qualifying sales the engine must not count as they are. Names every sale (ids, a long list
    cut short) and what to do, never the amounts."""

    def __init__(self, sale_ids: Sequence[str], problem: str) -> None:
        ids = sorted({str(i) for i in sale_ids})
        self.sale_ids: tuple[str, ...] = tuple(ids)
        self.resource = SALES
        self.record_id = ids[0] if ids else None
        self.field = "amount_cents"
        self.problem = problem
        ValueError.__init__(
            self, f"malformed sales: {len(ids)} qualifying sale(s) {problem}; sale ids: {_named(ids)}"
        )


class AmountOverflowError(ValueError):
    """A customer's lifetime value would not fit int64 cents: the amounts cannot be right."""

    def __init__(self, customer_ids: Sequence[str]) -> None:
        self.customer_ids: tuple[str, ...] = tuple(customer_ids)
        super().__init__(
            f"lifetime value of {len(customer_ids)} customer(s) is beyond what int64 cents can hold "
            f"(2^62 cents either way); their sales' amounts cannot be right, check max_sale_amount_cents: "
            f"{_named(customer_ids)}"
        )


# Columns of compute_customer_metrics' result, in order.
METRIC_COLUMNS: tuple[str, ...] = (
    "customer_id",
    "customer_code",
    "name",
    "email",
    "phone",
    "lifetime_value_cents",
    "order_count",
    "purchases_in_window",
    "first_order_us",
    "last_order_us",
    "loyalty_member",
    "tier",
)


def as_of_us(as_of: datetime | pd.Timestamp) -> int:
    """An instant as integer microseconds since the epoch (UTC; naive means UTC)."""
    ts = pd.Timestamp(as_of)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    # Timestamp.value is nanoseconds whatever the unit; a Timedelta division is exact in any unit.
    return int((ts - _EPOCH) // pd.Timedelta(1, "us"))


def timestamps_us(df: Frame, column: str) -> I64:
    """A datetime column as int64 microseconds UTC, NaT as `NAT`; a missing column is all NaT.

    Integer views make every comparison a plain numpy op, whatever unit/tz the column came with.
    """
    if not _has(df, column):
        return np.full(len(df), NAT, dtype=np.int64)
    if isinstance(df, pa.Table):
        col = df.column(column)
        if not pa.types.is_timestamp(col.type):
            return timestamps_us(pd.DataFrame({column: col.to_pandas()}), column)
        if col.type.tz is None or col.type.unit != "us":
            col = pc.cast(col, pa.timestamp("us", tz=col.type.tz or "UTC"))
        out = np.empty(len(col), dtype=np.int64)
        at = 0
        for chunk in col.chunks:  # chunk by chunk: no second whole-column copy on the way
            out[at : at + len(chunk)] = pc.fill_null(chunk.cast(pa.int64()), NAT).to_numpy()
            at += len(chunk)
        return out
    col = df[column]
    if not isinstance(col.dtype, pd.DatetimeTZDtype) and not pd.api.types.is_datetime64_dtype(col.dtype):
        col = pd.to_datetime(col, utc=True, format="ISO8601")
    idx = pd.DatetimeIndex(col)
    if idx.tz is None:
        idx = idx.tz_localize("UTC")
    return np.asarray(idx.as_unit("us").asi8, dtype=np.int64)


def _strings(df: pd.DataFrame, column: str) -> pd.Series:
    """A text column with nulls as "" (a missing column is all "")."""
    if column not in df.columns:
        return pd.Series([""] * len(df), index=df.index, dtype="str")
    return df[column].astype("str").fillna("")


def arrow_strings(col: pd.Series) -> pa.Array | pa.ChunkedArray:
    """A text column as an Arrow array (zero-copy for pandas 3's default pyarrow-backed str)."""
    if not isinstance(col.dtype, pd.StringDtype) or col.dtype.storage != "pyarrow":
        col = col.astype(pd.StringDtype("pyarrow", na_value=np.nan))
    return pa.array(col.array)


Frame: TypeAlias = pd.DataFrame | pa.Table  # the store's rows: a DataFrame, or the Arrow table the store read


def _has(frame: Frame, column: str) -> bool:
    return column in (frame.column_names if isinstance(frame, pa.Table) else frame.columns)


def _text(frame: Frame, column: str, *, dictionary: bool = False) -> pa.Array | pa.ChunkedArray:
    """A text column as Arrow (a pandas column converted, an Arrow one as it is; a dictionary one
    decoded unless `dictionary`, for `_test_values`)."""
    if isinstance(frame, pa.Table):
        col = frame.column(column)
        if pa.types.is_string(col.type) or (dictionary and pa.types.is_dictionary(col.type)):
            return col
        return pc.cast(col, pa.string())
    return arrow_strings(frame[column])


def _test_values(arr: pa.Array | pa.ChunkedArray, test: Any, n: int) -> npt.NDArray[np.bool_]:
    """A boolean Arrow kernel applied to each value (null as False); on a dictionary column it runs
    on the dictionary and is looked up by index, so millions of rows cost a take."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    parts = []
    for chunk in chunks:
        if pa.types.is_dictionary(chunk.type):
            # The answers for the dictionary, one more False for a null index, looked up by numpy.
            found = np.asarray(pc.fill_null(test(chunk.dictionary), False).to_numpy(zero_copy_only=False), dtype=bool)
            table = np.append(found, False)
            parts.append(table[pc.fill_null(chunk.indices, len(found)).to_numpy()])
        else:
            parts.append(np.asarray(pc.fill_null(test(chunk), False).to_numpy(zero_copy_only=False), dtype=bool))
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
    return out if len(out) == n else np.zeros(n, dtype=bool)


def _id_strings(frame: Frame, rows: npt.ArrayLike) -> list[str]:
    """The ids of `rows` (row numbers or a mask), for error messages."""
    taken = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
    return [str(v) for v in _text(frame, "id").take(pa.array(taken, type=pa.int64())).to_pylist()]


# The int64 column `customer_positions` puts in place of a sales table's customer_id.
CUSTOMER_POSITION = "_customer_position"


def customer_positions(live_ids: pd.Series | Callable[[], pd.Series]) -> Any:
    """A function for OrderStore.read_table(each=...): a sales table with its customer_id column
    replaced by the position of that customer among `live_ids` (-1: none, or not live), so the
    store's millions of customer id strings never sit in memory at once. Pass the same live
    customers to compute_customer_metrics (`live=`). `live_ids` may be a function giving them
    (e.g. a Future's result): asked for at the first table, so they can be worked out while the
    first sales are decoded."""
    lookups: list[Lookup] = []

    def replace(table: pa.Table) -> pa.Table:
        if not lookups:
            lookups.append(Lookup(arrow_strings(live_ids() if callable(live_ids) else live_ids)))
        at = table.schema.get_field_index("customer_id")
        position = pa.array(lookups[0](table.column("customer_id")), type=pa.int64())
        return table.set_column(at, CUSTOMER_POSITION, position)

    return replace


def as_of_mask(df: Frame, as_of: datetime | pd.Timestamp) -> npt.NDArray[np.bool_]:
    """Which rows form the store as it was at `as_of`: one version per `id` (contracts "As-of view").

    Among versions created before `as_of` (or with no `created_at`), the newest one whose
    `updated_at < as_of`; if every such version was written later, the oldest one (the earliest
    state we ever saw). Rows with a null id are never chosen.
    """
    n = len(df)
    if n == 0:
        return np.zeros(0, dtype=bool)
    cut = as_of_us(as_of)
    ids = _text(df, "id")
    eligible = timestamps_us(df, "created_at") < cut  # NaT (int64 min) < cut: a missing created_at counts
    if ids.null_count:
        eligible &= np.asarray(pc.is_valid(ids).to_numpy(zero_copy_only=False), dtype=bool)
    rows, codes, size = repeated(ids)
    if len(rows) == 0:
        return eligible  # every id has one version: chosen whenever it existed at as_of
    # Ids with several versions: one ranking key, in which every "current" version (updated_at <
    # as_of; a missing updated_at counts as before) outranks every later-written one; among
    # current ones the highest version wins, among later ones the lowest (-v - 1 is larger).
    current = timestamps_us(df, "updated_at")[rows] < cut
    version = (
        np.asarray(pc.fill_null(df.column("version"), 0).to_numpy(), dtype=np.int64)
        if isinstance(df, pa.Table)
        else df["version"].to_numpy(dtype=np.int64, na_value=0)
    )[rows]
    shifted = version - min(int(version.min()), 0)  # >= 0, order kept
    key = np.where(current, shifted, -shifted - 1)
    chosen = eligible.copy()
    chosen[rows] = False
    sub = np.flatnonzero(eligible[rows])
    best = np.full(size, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(best, codes[sub], key[sub])
    winners = sub[key[sub] == best[codes[sub]]]
    # The same (id, version) stored twice ties: keep the first row of each id.
    first = np.full(size, len(rows), dtype=np.int64)
    np.minimum.at(first, codes[winners], winners)
    chosen[rows[first[first < len(rows)]]] = True
    return chosen


def versions_as_of(df: pd.DataFrame, as_of: datetime | pd.Timestamp) -> pd.DataFrame:
    """The rows of `as_of_mask`, input order kept."""
    return df.loc[as_of_mask(df, as_of)]


def live_customers(customers: Frame, as_of: datetime | pd.Timestamp) -> pd.DataFrame:
    """Customers that existed and were not deleted at `as_of`, one row each, sorted by id (the
    store's Arrow table is filtered and sorted in Arrow, and only the live rows reach pandas)."""
    if isinstance(customers, pa.Table):
        view = customers.filter(pa.array(as_of_mask(customers, as_of)))
        deleted_at = timestamps_us(view, "deleted_at")
        view = view.filter(pa.array((deleted_at == NAT) | (deleted_at >= as_of_us(as_of))))
        return view.take(pc.sort_indices(view, [("id", "ascending")])).to_pandas()
    view = versions_as_of(customers, as_of)
    deleted_at = timestamps_us(view, "deleted_at")
    alive = (deleted_at == NAT) | (deleted_at >= as_of_us(as_of))
    out = view.loc[alive]
    return out.sort_values("id", kind="stable", ignore_index=True)


def qualifying_sales(
    sales: Frame, customer_ids: pd.Series, as_of: datetime | pd.Timestamp
) -> tuple[I64, I64, I64]:
    """(customer position, amount cents, sale_date us) of every qualifying sale (tier-rules.md).

    `customer_ids` are the live customers (unique); a sale whose customer is null or not among
    them does not qualify. Works on whole columns with boolean masks, so the (large) sales frame
    is never copied. A qualifying sale without whole int64 cents raises SaleAmountError.
    """
    _, position, amount, sale_date = _qualifying(sales, customer_ids, as_of)
    return position, amount, sale_date


def checked_sales(
    sales: Frame, customer_ids: pd.Series, as_of: datetime | pd.Timestamp, rules: TierRules
) -> tuple[I64, I64, I64, list[str]]:
    """`qualifying_sales` under the plausibility bound, plus the ids of the sales it quarantined.

    A qualifying sale with |amount| >= `rules.max_sale_amount_cents` raises SaleAmountError, or
    with `implausible_amounts == "quarantine"` is dropped (logged with its id): a barcode keyed
    into the price must never make a customer Evergreen without anyone noticing.
    """
    rows, position, amount, sale_date = _qualifying(sales, customer_ids, as_of)
    bound = rules.max_sale_amount_cents
    implausible = implausible_amounts(amount, rules)
    if not implausible.any():
        return position, amount, sale_date, []
    ids = sorted(_id_strings(sales, rows[implausible]))
    limit = f"{format_cents(bound)} either way (max_sale_amount_cents)"
    if rules.implausible_amounts != IMPLAUSIBLE_QUARANTINE:
        raise SaleAmountError(
            ids,
            f"have an amount of at least {limit}: a barcode keyed into the price? Correct them in "
            'Lightspeed, raise max_sale_amount_cents, or set implausible_amounts to "quarantine" '
            "in the tier_sync_rules Variable to leave them out of the tiers",
        )
    log.warning(
        "quarantined %d qualifying sale(s) with an amount of at least %s: left out of every figure: %s",
        len(ids),
        limit,
        _named(ids),
    )
    keep = ~implausible
    return position[keep], amount[keep], sale_date[keep], ids


def implausible_amounts(amount: I64, rules: TierRules) -> npt.NDArray[np.bool_]:
    """Amounts at or beyond `max_sale_amount_cents` either way (not np.abs: it overflows at int64 min)."""
    bound = rules.max_sale_amount_cents
    return np.asarray((amount >= bound) | (amount <= -bound), dtype=bool)


def _qualifying(
    sales: Frame, customer_ids: pd.Series, as_of: datetime | pd.Timestamp
) -> tuple[I64, I64, I64, I64]:
    """(row numbers, customer position, amount cents, sale_date us) of the qualifying sales."""
    if len(sales) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy(), empty.copy()
    cut = as_of_us(as_of)
    # The as-of view on a second thread while the other tests run (numpy and Arrow release the
    # GIL): with the text kept in Arrow and no whole-column temporary held while the ids are
    # grouped, both sets of temporaries fit under DuckDB's peak.
    with ThreadPoolExecutor(1) as pool:
        view = pool.submit(as_of_mask, sales, as_of)
        passed, sale_date, position = _other_tests(sales, customer_ids, cut)
        passed &= view.result()
    rows = np.flatnonzero(passed & (position >= 0)).astype(np.int64)
    del passed
    position, sale_date = position[rows], sale_date[rows]
    amount, unusable = _amount_cents(sales)
    if unusable[rows].any():
        ids = _id_strings(sales, rows[unusable[rows]])
        raise SaleAmountError(
            ids,
            "have no amount (amount_cents null or not whole int64 cents), which must never count as "
            '$0 (docs/tier-rules.md "Amount"); re-extract them (full_refresh) or fix them in Lightspeed',
        )
    return rows, position, amount[rows], sale_date


def _other_tests(
    sales: Frame, customer_ids: pd.Series, cut: int
) -> tuple[npt.NDArray[np.bool_], I64, I64]:
    """Which sales pass every test but the as-of view (not deleted, dated before the cut-off,
    finished), their sale_date us and their customer's position (-1: none or unknown)."""
    mask = not_deleted(sales, cut)  # the sales can be millions of rows: few whole columns at once
    dated, sale_date = dated_before(sales, cut)
    mask &= dated
    del dated
    mask &= finished(sales)
    if isinstance(sales, pa.Table) and CUSTOMER_POSITION in sales.column_names:  # customer_positions
        position = np.asarray(sales.column(CUSTOMER_POSITION).to_numpy(), dtype=np.int64)
        if len(position) and int(position.max()) >= len(customer_ids):
            raise ValueError("sales' customer positions were taken against other live customers")
    else:
        position = index_in(_text(sales, "customer_id", dictionary=True), arrow_strings(customer_ids))
    return mask, sale_date, position


# The tests of "Which sales count" one by one (tier-rules.md), also read by the page's list of a
# customer's sales (dashboard_customer.py), which says which test a sale failed.


def not_deleted(sales: Frame, cut: int) -> npt.NDArray[np.bool_]:
    """Not deleted at the cut-off: no `deleted_at`, or one at or after it."""
    deleted_at = timestamps_us(sales, "deleted_at")
    return np.asarray((deleted_at == NAT) | (deleted_at >= cut), dtype=bool)


def dated_before(sales: Frame, cut: int) -> tuple[npt.NDArray[np.bool_], I64]:
    """Which sales have a `sale_date` before the cut-off, and every sale_date (us, `NAT` if none)."""
    sale_date = timestamps_us(sales, "sale_date")
    return np.asarray((sale_date != NAT) & (sale_date < cut), dtype=bool), sale_date


def finished(sales: Frame) -> npt.NDArray[np.bool_]:
    """A closed status (`CLOSED_STATUSES`), or no status and the state `closed`."""
    n = len(sales)
    if _has(sales, "status"):
        status = _text(sales, "status", dictionary=True)
        closing = pa.array(sorted(CLOSED_STATUSES))
        closed = _test_values(status, lambda a: pc.is_in(a, value_set=closing), n)
        no_status = ~_test_values(status, lambda a: pc.greater(pc.utf8_length(a), 0), n)  # null or ""
    else:
        closed = np.zeros(n, dtype=bool)
        no_status = np.ones(n, dtype=bool)
    if _has(sales, "state"):
        state_closed = _test_values(_text(sales, "state", dictionary=True), lambda a: pc.equal(a, CLOSED_STATE), n)
        closed |= no_status & state_closed
    return closed


def _amount_cents(sales: Frame) -> tuple[I64, npt.NDArray[np.bool_]]:
    """`amount_cents` as int64 and which rows have no usable value (null, NaN, a fraction of a
    cent, beyond int64): those are 0 in the array and must not be counted."""
    n = len(sales)
    if not _has(sales, "amount_cents"):
        return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    if isinstance(sales, pa.Table):
        arrow = sales.column("amount_cents")
        if pa.types.is_integer(arrow.type) and arrow.null_count == 0:  # the store's int64: the fast path
            return np.asarray(arrow.to_numpy(), dtype=np.int64), np.zeros(n, dtype=bool)
        col = arrow.to_pandas()
    else:
        col = sales["amount_cents"]
    if getattr(col.dtype, "kind", "") == "i" and not col.hasnans:  # the store's int64: the fast path
        return col.to_numpy(dtype=np.int64), np.zeros(n, dtype=bool)
    out = np.zeros(n, dtype=np.int64)
    unusable = np.zeros(n, dtype=bool)
    for i, value in enumerate(col.tolist()):
        cents = _whole_cents(value)
        if cents is None:
            unusable[i] = True
        else:
            out[i] = cents
    return out, unusable


def _whole_cents(value: Any) -> int | None:
    """One amount as int64 cents, or None when it is not a whole number that int64 can hold."""
    if value is None or isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        cents = int(value)
    elif isinstance(value, float | np.floating | Decimal):
        number = Decimal(str(value)) if not isinstance(value, Decimal) else value
        if not number.is_finite() or number != number.to_integral_value():
            return None
        cents = int(number)
    else:
        return None
    return cents if -(2**63) <= cents < 2**63 else None


def sum_cents(position: I64, amount: I64, n: int, customer_ids: pd.Series) -> I64:
    """Exact per-customer sums of cents (`position` indexes `customer_ids`), refused with
    AmountOverflowError, naming the customers, where int64 could not hold a sum."""
    out = np.zeros(n, dtype=np.int64)
    if len(amount) == 0:
        return out
    peak = max(int(amount.max()), -int(amount.min()))  # Python ints: cannot overflow
    if peak * len(amount) >= 2**63:  # only then could any partial sum leave int64
        magnitude = np.bincount(position, weights=np.abs(amount.astype(np.float64)), minlength=n)
        over = np.flatnonzero(magnitude >= _SUM_LIMIT)
        if len(over):
            raise AmountOverflowError(sorted(customer_ids.astype("str").to_numpy()[over].tolist()))
    np.add.at(out, position, amount)  # integer adds: exact to the cent
    return out


def assign_tiers(
    ltv_cents: I64,
    order_count: I64,
    purchases_in_window: I64,
    loyalty: np.ndarray[Any, np.dtype[np.bool_]],
    rules: TierRules,
) -> np.ndarray[Any, np.dtype[np.object_]]:
    """The tier table (`rules.assign_tiers`, first match wins); "None" whenever there is no purchase."""
    return rule_tiers(ltv_cents, order_count, purchases_in_window, loyalty, rules)


def compute_customer_metrics(
    sales: Frame,
    customers: Frame,
    as_of: datetime | pd.Timestamp,
    rules: TierRules,
    *,
    live: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per live customer at `as_of` (sorted by id) with exact CLV metrics and tier.

    Columns: METRIC_COLUMNS. Money is int64 cents; first/last order are int64 microseconds UTC
    (`NAT` when there is no purchase). `attrs[QUARANTINED_ATTR]` lists the sales left out for an
    implausible amount (`checked_sales`); bad amounts raise SaleAmountError / AmountOverflowError.
    """
    cust = live if live is not None else live_customers(customers, as_of)
    qualifying = checked_sales(sales, cust["id"].astype("str"), as_of, rules)
    return customer_metrics(cust, qualifying, as_of, rules)


def customer_metrics(
    cust: pd.DataFrame, qualifying: tuple[I64, I64, I64, list[str]], as_of: datetime | pd.Timestamp, rules: TierRules
) -> pd.DataFrame:
    """compute_customer_metrics' second stage: the figures of the live customers `cust` from their
    qualifying sales (`checked_sales`). Apart so a caller can free the sales table in between."""
    cut = as_of_us(as_of)
    n = len(cust)
    ids = cust["id"].astype("str")
    pos, amount, sale_date, quarantined = qualifying

    ltv = sum_cents(pos, amount, n, ids)
    purchase = amount > 0
    ppos, pdate = pos[purchase], sale_date[purchase]
    order_count = np.bincount(ppos, minlength=n).astype(np.int64)
    counted = in_window(pdate, cut, rules)  # every qualifying sale is before as_of already
    purchases_in_window = np.bincount(ppos[counted], minlength=n).astype(np.int64)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, ppos, pdate)
    first[order_count == 0] = NAT
    last = np.full(n, NAT, dtype=np.int64)
    np.maximum.at(last, ppos, pdate)

    loyalty = (
        cust["enable_loyalty"].to_numpy(dtype=bool, na_value=False)
        if "enable_loyalty" in cust.columns
        else np.zeros(n, dtype=bool)
    )
    tiers = assign_tiers(ltv, order_count, purchases_in_window, loyalty, rules)

    name = _strings(cust, "name").str.strip()
    full = (_strings(cust, "first_name") + " " + _strings(cust, "last_name")).str.strip()
    phone = _strings(cust, "phone")
    out = pd.DataFrame(
        {
            # Text stays in pandas' Arrow-backed str: no Python string per cell (master_csv writes it).
            "customer_id": ids.array,
            "customer_code": _strings(cust, "customer_code").array,
            "name": name.where(name != "", full).array,
            "email": _strings(cust, "email").array,
            "phone": phone.where(phone != "", _strings(cust, "mobile")).array,
            "lifetime_value_cents": ltv,
            "order_count": order_count,
            "purchases_in_window": purchases_in_window,
            "first_order_us": first,
            "last_order_us": last,
            "loyalty_member": loyalty,
            "tier": tiers,
        }
    )
    out.attrs[QUARANTINED_ATTR] = quarantined
    log.info(
        "CLV as of %s: %d live customers, %d qualifying sales, %d with a purchase, %d quarantined",
        pd.Timestamp(cut, unit="us", tz="UTC").isoformat(),
        n,
        len(pos),
        int((order_count > 0).sum()),
        len(quarantined),
    )
    return out
