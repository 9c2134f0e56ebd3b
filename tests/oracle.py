"""An independent, deliberately plain reading of tier-rules.md, for end-to-end expectations.

It loops over the simulator's raw records with Decimal arithmetic and shares no code with the
pipeline (no pandas, no include/), so a bug in the engine cannot hide in its own expectations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

CLOSED = {"CLOSED", "ONACCOUNT_CLOSED", "LAYBY_CLOSED", "DISPATCHED_CLOSED", "PICKED_UP_CLOSED", "SERVICE_CLOSED"}
GROUPS = {
    "Evergreen": "GreenHaus Crew - Evergreen",
    "Bloom": "GreenHaus Crew - Bloom",
    "Sprout": "GreenHaus Crew - Sprout",
    "Seed": "GreenHaus Crew - Seed",
    "First Time Buyer": "First Time Buyer",
}
DEFAULT_GROUP = "All Customers"


def ts(value: str | None) -> datetime | None:
    return None if value in (None, "") else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def cents(sale: dict[str, Any]) -> int:
    incl = sale.get("total_price_incl")
    if incl is not None:
        amount = Decimal(str(incl))
    else:
        amount = Decimal(str(sale.get("total_price") or 0)) + Decimal(str(sale.get("total_tax") or 0))
    return int(amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP) * 100)


@dataclass
class Expected:
    ltv_cents: int = 0
    orders: int = 0
    last_30: int = 0
    first: datetime | None = None
    last: datetime | None = None
    loyalty: bool = False
    tier: str = "None"

    @property
    def ltv(self) -> str:
        sign = "-" if self.ltv_cents < 0 else ""
        return f"{sign}{abs(self.ltv_cents) // 100}.{abs(self.ltv_cents) % 100:02d}"


def expected_tiers(customers: dict[str, dict[str, Any]], sales: dict[str, dict[str, Any]], as_of: datetime) -> dict[str, Expected]:
    """One entry per live customer, computed from records that all predate as_of."""
    out = {cid: Expected(loyalty=bool(c.get("enable_loyalty"))) for cid, c in customers.items() if c.get("deleted_at") is None}
    for sale in sales.values():
        if sale.get("deleted_at") is not None:
            continue
        status = sale.get("status")
        if not (status in CLOSED or (status is None and sale.get("state") == "closed")):
            continue
        cid = sale.get("customer_id")
        if cid not in out:
            continue
        when = ts(sale["sale_date"])
        assert when is not None
        if when >= as_of:
            continue
        e = out[cid]
        amount = cents(sale)
        e.ltv_cents += amount
        if amount > 0:
            e.orders += 1
            if as_of - timedelta(days=30) <= when:
                e.last_30 += 1
            e.first = when if e.first is None or when < e.first else e.first
            e.last = when if e.last is None or when > e.last else e.last
    for e in out.values():
        if e.ltv_cents >= 150000:
            e.tier = "Evergreen"
        elif e.ltv_cents >= 75000:
            e.tier = "Bloom"
        elif e.ltv_cents >= 25000 or e.last_30 >= 3:
            e.tier = "Sprout"
        elif e.orders >= 1 and e.loyalty:
            e.tier = "Seed"
        elif e.orders >= 1:
            e.tier = "First Time Buyer"
        else:
            e.tier = "None"
    return out


def expected_final_groups(
    customers: dict[str, dict[str, Any]], groups: dict[str, dict[str, Any]], tiers: dict[str, Expected]
) -> dict[str, str]:
    """customer id -> group *name* the customer must end in after a full sync."""
    name_of = {gid: g["name"] for gid, g in groups.items()}
    managed = set(GROUPS.values()) | {DEFAULT_GROUP}
    out: dict[str, str] = {}
    for cid, customer in customers.items():
        current = name_of.get(customer.get("customer_group_id") or "", DEFAULT_GROUP)
        expected = tiers.get(cid)
        if customer.get("deleted_at") is not None or expected is None or expected.tier == "None" or current not in managed:
            out[cid] = current
        else:
            out[cid] = GROUPS[expected.tier]
    return out


UNFINISHED = {"VOIDED": "voided", "SAVED": "parked", "LAYBY": "layby_open", "ONACCOUNT": "on_account_open"}


def _before(value: datetime | None, as_of: datetime) -> bool:
    return value is None or value < as_of


def expected_sales(
    versions: list[dict[str, Any]], customer_id: str, as_of: datetime, max_cents: int = 100_000_000
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(counting, not counting) of one customer's sales as (sale id, reason), newest sale date first
    (equal dates by id, undated last), read plainly off tier-rules.md from the store's rows
    (datetimes, `amount_cents`): every version of every sale the customer ever owned."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        by_id.setdefault(str(v["id"]), []).append(v)
    counting: list[tuple[datetime | None, str, str]] = []
    not_counting: list[tuple[datetime | None, str, str]] = []
    for sid, vs in by_id.items():
        existed = [v for v in vs if _before(v.get("created_at"), as_of)]
        if not existed:
            newest = max(vs, key=lambda v: v["version"])
            if newest.get("customer_id") == customer_id:
                not_counting.append((newest.get("sale_date"), sid, "recorded_after_as_of"))
            continue
        current = [v for v in existed if _before(v.get("updated_at"), as_of)]
        seen = max(current, key=lambda v: v["version"]) if current else min(existed, key=lambda v: v["version"])
        if seen.get("customer_id") != customer_id:
            continue
        status, when, amount = seen.get("status"), seen.get("sale_date"), seen.get("amount_cents")
        deleted = seen.get("deleted_at")
        if deleted is not None and deleted < as_of:
            reason = "deleted"
        elif when is None:
            reason = "no_sale_date"
        elif when >= as_of:
            reason = "after_as_of"
        elif not (status in CLOSED or (not status and seen.get("state") == "closed")):
            reason = UNFINISHED.get(str(status), "not_finished")
        elif amount is None:
            reason = "no_amount"
        elif abs(int(amount)) >= max_cents:
            reason = "implausible_amount"
        else:
            kind = "purchase" if amount > 0 else "return" if amount < 0 else "zero"
            counting.append((when, sid, kind))
            continue
        not_counting.append((when, sid, reason))

    def order(items: list[tuple[datetime | None, str, str]]) -> list[tuple[str, str]]:
        dated = sorted((i for i in items if i[0] is not None), key=lambda i: (-i[0].timestamp(), i[1]))
        undated = sorted((i for i in items if i[0] is None), key=lambda i: i[1])
        return [(sid, reason) for _, sid, reason in [*dated, *undated]]

    return order(counting), order(not_counting)


NEXT_THRESHOLD = {"First Time Buyer": ("Sprout", 25000), "Seed": ("Sprout", 25000), "Sprout": ("Bloom", 75000),
                  "Bloom": ("Evergreen", 150000)}


def progress_text(e: Expected) -> str:
    """The till's progress text (README "Progress at the till"): tier, then the spend to the next one."""
    if e.tier == "None":
        return f"No tier yet · first purchase to {'Seed' if e.loyalty else 'First Time Buyer'}"
    if e.tier == "Evergreen":
        return "Evergreen · top tier"
    target, threshold = NEXT_THRESHOLD[e.tier]
    gap = max(threshold - e.ltv_cents, 1)
    return f"{e.tier} · ${gap // 100}.{gap % 100:02d} to {target}"
