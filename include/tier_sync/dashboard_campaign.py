"""The at-risk and growing lists (dashboard_growth) as one CSV for a campaign, spreadsheet-safe.

One row per entry (a customer on two lists, or of two kinds, has two rows), with the contact a
campaign needs (name, email) and the figure that decides the entry. Written by
`spreadsheet.to_safe_csv_bytes` like every CSV of ours: a name such as `=HYPERLINK(...)`, `+1` or
`@x` gets a leading `'`, amounts stay plain numbers, UTF-8 with a BOM. Who may download it is the
plugin's business (the per-customer permission, audited and rate-limited like one customer's view).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from include.tier_sync import dashboard_growth as growth
from include.tier_sync.dashboard_master import load_master
from include.tier_sync.ledger import run_key
from include.tier_sync.runtime import to_utc

if TYPE_CHECKING:
    from include.tier_sync.rules import TierRules

COLUMNS = ["List", "Kind", "Customer ID", "Customer Code", "Name", "Email", "Tier", "Lifetime Value",
           "Amount", "Date", "To Tier", "Detail"]
NUMERIC_COLUMNS = ("Lifetime Value", "Amount")
LISTS = ("at_risk", "growing")


def _day(value: str | None) -> str:
    return (value or "")[:10]


def _decides(e: dict[str, Any]) -> tuple[str, str, str, str]:
    """(amount, date, to tier, sentence) of one entry: what decides it, in words a person acts on."""
    kind = e["kind"]
    if kind == growth.RETURN:
        p = e["purchase"]
        return (p["amount"]["dollars"], p["date"], e["drops_to"],
                f"A return of the ${p['amount']['dollars']} purchase of {_day(p['date'])} (returnable until "
                f"{_day(e['returnable_until'])}) drops them to {e['drops_to']}; any return of "
                f"${e['return_needed']['dollars']} or more lowers the tier")
    if kind == growth.NEXT_RUN:
        return ("", e["drops_after"], e["drops_to"],
                f"The next run (as of {_day(e['next_run_as_of'])}) moves them to {e['drops_to']}: their purchase "
                f"of {_day(e['leaves_window'])} leaves the window; one more purchase before then keeps {e['tier']}")
    if kind == growth.STREAK:
        return ("", e["drops_after"], e["drops_to"],
                f"Drops to {e['drops_to']} after {_day(e['drops_after'])} unless they buy again")
    if kind == growth.MOVED_UP:
        return ("", e["moved_at"], e["to"], f"Moved up from {e['from']} to {e['to']} in the run as of {_day(e['moved_at'])}")
    return (e["amount_needed"]["dollars"], "", e["next_tier"], f"${e['amount_needed']['dollars']} more to {e['next_tier']}")


def campaign_rows(data_dir: str, rules: TierRules, opts: growth.Options, lists: tuple[str, ...] = LISTS,
                  within_days: int = 30, runs: int = growth.GROWING_RUNS_DEFAULT) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of the campaign CSV and the as-of they are computed at (None without a master)."""
    found: list[tuple[str, dict[str, Any]]] = []
    as_of = None
    if "at_risk" in lists:
        risk = growth.risk_entries(data_dir, rules, opts, within_days)
        found += [("at risk", e) for e in risk["entries"]]
        as_of = risk["as_of"]
    if "growing" in lists:
        grow = growth.growth_entries(data_dir, rules, opts, runs)
        found += [("growing", e) for e in grow["entries"]]
        as_of = as_of or grow["as_of"]
    master = load_master(data_dir)
    rows = []
    for name, e in found:
        amount, date, to, detail = _decides(e)
        r = master.position.get(e["customer_id"]) if master is not None else None
        email = str(master.df["Email"].iat[r]) if master is not None and r is not None else ""
        rows.append(dict(zip(COLUMNS, [name, e["kind"], e["customer_id"], e["customer_code"], e["name"], email,
                                       e["tier"], e["lifetime_value"]["dollars"], amount, date, to, detail],
                             strict=True)))
    return rows, as_of


def campaign_csv(rows: list[dict[str, Any]]) -> bytes:
    """The rows as a spreadsheet-safe CSV (spreadsheet.to_safe_csv_bytes), header always present."""
    import pandas as pd

    from include.tier_sync.spreadsheet import to_safe_csv_bytes

    frame = pd.DataFrame(rows, columns=COLUMNS, dtype=object)
    return to_safe_csv_bytes(frame, numeric_columns=NUMERIC_COLUMNS)


def file_name(as_of: str | None) -> str:
    """`loyalty-campaign-<run key>.csv`: the as-of the lists are computed at, in the name."""
    return f"loyalty-campaign-{run_key(to_utc(as_of)) if as_of else 'no-run'}.csv"
