"""One customer's sales on the "Loyalty tiers" page: those that count, and those that do not and why.

The customer view (issue 18) replaces grepping the order store: it lists every sale the customer
has in the order store, as the latest run saw it (its as_of), split into the sales that count
toward the tier and the ones that do not, each with its reason in words. Nothing here is a second
copy of the rules: the version shown is the engine's as-of view (`clv.as_of_mask`), and the tests
are the engine's own (`clv.not_deleted`, `clv.dated_before`, `clv.finished`,
`clv.implausible_amounts`, docs/tier-rules.md "Which sales count"); this module only says which
test a sale failed first, and puts it in words. The sales that count are checked against the
master (their sum is the Lifetime Value, their purchases the Order Count) and the answer says so.

The sales are read from the order store for this customer only (`dashboard_at_risk.customer_sales`)
and classified once per (customer, store version, as_of, rules); pages are slices of that list.
pandas and numpy are imported inside the functions: the plugin imports this module at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio
from include.tier_sync.dashboard_at_risk import customer_sales, iso_us, parse_iso
from include.tier_sync.dashboard_cache import cached, signature
from include.tier_sync.dashboard_master import latest_run, load_master, money
from include.tier_sync.ledger import STORE_DIR
from include.tier_sync.money import format_cents
from include.tier_sync.rules import IMPLAUSIBLE_QUARANTINE
from include.tier_sync.runtime import iso

if TYPE_CHECKING:
    from datetime import datetime

    from include.tier_sync.rules import TierRules

PER_PAGE = 25
MAX_PER_PAGE = 200  # dashboard.MAX_PAGE

# Why an unfinished sale does not count, by its status (docs/lightspeed-x-series-api.md).
STATUS_REASONS: dict[str, tuple[str, str]] = {
    "VOIDED": ("voided", "voided"),
    "SAVED": ("parked", "parked (saved), never finished"),
    "LAYBY": ("layby_open", "lay-by still open: counts once it is closed"),
    "ONACCOUNT": ("on_account_open", "on account, still open: counts once it is closed"),
}


class SalesUnavailable(RuntimeError):
    """The order store cannot be read, so the customer's sales cannot be listed (never "no sales")."""


@dataclass(frozen=True)
class Listed:
    """One customer's sales at one as_of, newest first, split by whether they count."""

    counting: list[dict[str, Any]]
    not_counting: list[dict[str, Any]]


def sales(
    data_dir: str,
    customer_id: str,
    rules: TierRules,
    *,
    counting: bool,
    page: int = 1,
    per_page: int = PER_PAGE,
) -> dict[str, Any] | None:
    """One page of the customer's sales that count (`counting`) or do not, newest first.

    None when the customer is not in the latest master. Raises SalesUnavailable when there is no
    as_of or the order store cannot be read.
    """
    master = load_master(data_dir)
    row = master.position.get(customer_id) if master is not None else None
    if master is None or row is None:
        return None
    as_of = parse_iso(latest_run(data_dir, master).get("as_of"))
    if as_of is None:
        raise SalesUnavailable("the latest run has no as_of (latest.json, the master's Last Updated)")
    listed = _listed(data_dir, customer_id, as_of, rules)
    chosen = listed.counting if counting else listed.not_counting
    per_page = max(1, min(int(per_page), MAX_PER_PAGE))
    pages = max(1, -(-len(chosen) // per_page))
    page = max(1, int(page))
    ltv = sum(int(s["amount"]["cents"]) for s in listed.counting)
    orders = sum(1 for s in listed.counting if s["kind"] == "purchase")
    master_ltv, master_orders = int(master.ltv_cents[row]), int(master.orders[row])
    return {
        "customer_id": customer_id,
        "as_of": iso(as_of),
        "counting": counting,
        "total": len(chosen),
        "counts": {"counting": len(listed.counting), "not_counting": len(listed.not_counting)},
        "page": page,
        "per_page": per_page,
        "pages": pages,
        "sales": chosen[(page - 1) * per_page : page * per_page],
        # The sales that count add up to the master's figures: say so, or say that they do not.
        "lifetime_value": money(ltv),
        "order_count": orders,
        "matches_master": ltv == master_ltv and orders == master_orders,
    }


def _listed(data_dir: str, customer_id: str, as_of: datetime, rules: TierRules) -> Listed:
    """The classified list, once per customer, store version, as_of and rules (one entry kept)."""
    store_sig = signature(fileio.join(data_dir, STORE_DIR, "manifest.json"))
    key = (customer_id, store_sig, iso(as_of), rules.max_sale_amount_cents)

    def load() -> Listed:
        table = customer_sales(data_dir, [customer_id])
        if table is None:
            raise SalesUnavailable("the order store cannot be read (see the api-server log)")
        return classify(table.to_pandas(), customer_id, as_of, rules)

    return cached("customer_sales", data_dir, key, load)


def classify(sales_df: Any, customer_id: str, as_of: datetime, rules: TierRules) -> Listed:
    """Every sale of `sales_df` (all stored versions of the customer's sales) in the version the
    as-of view picks, with whether it counts for `customer_id` and why (newest first)."""
    import numpy as np

    from include.tier_sync.clv import (
        NAT,
        as_of_mask,
        as_of_us,
        dated_before,
        finished,
        implausible_amounts,
        not_deleted,
        timestamps_us,
    )

    cut = as_of_us(as_of)
    df = sales_df.reset_index(drop=True)
    if not len(df):
        return Listed([], [])
    view = as_of_mask(df, as_of)
    tests = {
        "not_deleted": not_deleted(df, cut),
        "dated": dated_before(df, cut)[0],
        "finished": finished(df),
        "implausible": implausible_amounts(df["amount_cents"].fillna(0).to_numpy(dtype=np.int64), rules),
    }
    times = {c: timestamps_us(df, c) for c in ("sale_date", "created_at", "updated_at", "deleted_at")}
    counting: list[dict[str, Any]] = []
    not_counting: list[dict[str, Any]] = []
    for _sale_id, rows in df.groupby("id", sort=True).indices.items():
        chosen = [int(r) for r in rows if view[r]]
        later = bool((times["updated_at"][rows] >= cut).any())
        if not chosen:  # no version existed at as_of: entered in the POS at or after it
            newest = max(rows, key=lambda r: int(df["version"].iloc[r]))
            if str(df["customer_id"].iloc[newest]) == customer_id:
                entry = _entry(df, int(newest), times, NAT, "recorded_after_as_of",
                               f"entered in the POS on {_when(times['created_at'][newest], NAT)}, at or after "
                               "as_of: counts from the next run")
                not_counting.append(entry)
            continue
        r = chosen[0]
        if str(df["customer_id"].iloc[r]) != customer_id:
            continue  # another customer's sale at as_of (moved to or away from this one)
        reason = _first_failed(df, r, tests, times, NAT, rules)
        entry = _entry(df, r, times, NAT, *(reason or _counts_as(df, r)))
        if later:
            entry["notes"].append("changed after as_of (edited, voided or deleted): shown as it was at as_of")
        if reason is None:
            deleted = int(times["deleted_at"][r])
            if deleted != NAT:
                entry["notes"].append(f"deleted on {_when(deleted, NAT)}, after as_of: still counts")
            counting.append(entry)
        else:
            not_counting.append(entry)
    return Listed(_newest_first(counting), _newest_first(not_counting))


def _first_failed(
    df: Any, r: int, tests: dict[str, Any], times: dict[str, Any], nat: int, rules: TierRules
) -> tuple[str, str] | None:
    """(reason, words) of the first test of "Which sales count" that row `r` fails; None: it counts."""
    if not tests["not_deleted"][r]:
        return "deleted", f"deleted on {_when(times['deleted_at'][r], nat)}, before as_of"
    if not tests["dated"][r]:
        if int(times["sale_date"][r]) == nat:
            return "no_sale_date", "no sale date: it cannot be placed before as_of"
        return "after_as_of", "dated at or after as_of: counts from a later run"
    if not tests["finished"][r]:
        status = _text(df, "status", r)
        if status in STATUS_REASONS:
            return STATUS_REASONS[status]
        shown = status or f"no status, state {_text(df, 'state', r) or 'unknown'}"
        return "not_finished", f"not finished ({shown})"
    if _missing(df["amount_cents"].iloc[r]):  # null / NaN: the engine refuses it, never $0
        return "no_amount", "no amount: the run refuses it rather than count $0"
    if tests["implausible"][r]:
        action = "left out" if rules.implausible_amounts == IMPLAUSIBLE_QUARANTINE else "stops the run"
        return ("implausible_amount",
                f"amount of ${format_cents(rules.max_sale_amount_cents)} or more either way: {action} "
                "(max_sale_amount_cents)")
    return None


def _counts_as(df: Any, r: int) -> tuple[str, str]:
    """What a sale that counts does: a purchase is an order; a return or $0 only moves the value."""
    cents = int(df["amount_cents"].iloc[r])
    if cents > 0:
        return "purchase", "counts: a purchase (an order)"
    if cents < 0:
        return "return", "counts: a return lowers the lifetime value; not an order"
    return "zero", "counts: a $0.00 sale, not an order"


def _entry(df: Any, r: int, times: dict[str, Any], nat: int, kind: str, reason: str) -> dict[str, Any]:
    amount = df["amount_cents"].iloc[r]
    known = not _missing(amount)
    date = int(times["sale_date"][r])
    return {
        "sale_id": str(df["id"].iloc[r]),
        "date": None if date == nat else iso_us(date),
        "amount": money(int(amount)) if known else None,
        "status": _text(df, "status", r) or _text(df, "state", r) or None,
        "kind": kind,
        "reason": reason,
        "notes": [],
        "_date": date,
    }


def _newest_first(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest sale date first, undated last, equal dates by sale id: the same order every time."""
    entries.sort(key=lambda e: e["sale_id"])
    entries.sort(key=lambda e: e["_date"], reverse=True)
    return [{k: v for k, v in e.items() if k != "_date"} for e in entries]


def _text(df: Any, column: str, r: int) -> str:
    if column not in df.columns:
        return ""
    value = df[column].iloc[r]
    return "" if _missing(value) else str(value)


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _when(us: Any, nat: int) -> str:
    return "an unknown date" if int(us) == nat else iso_us(int(us))
