"""Why a customer is in their tier, and what would change it (the page's customer view, issue 18).

Pure arithmetic on the figures the master CSV already has (lifetime value, order count, loyalty)
plus the customer's purchase instants, with the tier table the engine uses (`rules.tier_for`), so the
explanation can never disagree with the tier. Every amount is integer cents and every "what next"
is the smallest change that does it (tested against the independent oracle to the cent):

- **because**: the first rule of the tier table that matched, with its numbers;
- **next_up**: the smallest lifetime value increase (one purchase of that amount) that reaches a
  higher tier, and for Seed / First Time Buyer also the purchases-in-window route to Sprout;
- **keeps**: for a tier held only by the purchases in the window, the last instant at which it
  still holds if nothing is bought (one more purchase before then keeps it);
- **drops**: the smallest return (a negative sale) that would lower the tier, and to what.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from include.tier_sync.money import format_cents
from include.tier_sync.rules import (
    BLOOM,
    EVERGREEN,
    FIRST_TIME_BUYER,
    NO_TIER,
    SEED,
    SPROUT,
    TierRules,
    in_window,
    tier_for,
    window_drop_us,
)

RANK = {NO_TIER: 0, FIRST_TIME_BUYER: 1, SEED: 2, SPROUT: 3, BLOOM: 4, EVERGREEN: 5}


@dataclass(frozen=True)
class Figures:
    """One customer at one as_of: what the tier table reads."""

    ltv_cents: int
    order_count: int
    purchases_us: tuple[int, ...]  # every qualifying purchase (amount > 0) before as_of, any order
    loyalty: bool
    as_of_us: int

    def in_window(self, rules: TierRules) -> list[int]:
        if not self.purchases_us:
            return []
        counted = in_window(list(self.purchases_us), self.as_of_us, rules).tolist()
        return sorted(d for d, keep in zip(self.purchases_us, counted, strict=True) if keep)


def tier_of(ltv_cents: int, orders: int, window_count: int, loyalty: bool, rules: TierRules) -> str:
    return tier_for(ltv_cents, orders, window_count, loyalty, rules)


def _date(us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).strftime("%d %b %Y")


def because(f: Figures, rules: TierRules) -> dict[str, Any]:
    """The rule that put the customer in their tier (first match wins)."""
    window = len(f.in_window(rules))
    tier = tier_of(f.ltv_cents, f.order_count, window, f.loyalty, rules)
    ltv = f"${format_cents(f.ltv_cents)}"
    k, days = rules.sprout_min_purchases_in_window, rules.window_days
    if tier == NO_TIER:
        text, rule = "No qualifying purchase yet, so no tier (and no group)", "no_order"
    elif tier in (EVERGREEN, BLOOM) or (tier == SPROUT and f.ltv_cents >= rules.sprout_min_cents):
        threshold = {EVERGREEN: rules.evergreen_min_cents, BLOOM: rules.bloom_min_cents}.get(tier, rules.sprout_min_cents)
        text, rule = f"Lifetime value {ltv} is at least {tier}'s ${format_cents(threshold)}", "lifetime_value"
    elif tier == SPROUT:
        text = f"{window} purchases in the last {days} days (Sprout needs {k}); lifetime value {ltv}"
        rule = "purchases_in_window"
    elif tier == SEED:
        text, rule = f"A loyalty member with {f.order_count} order(s); lifetime value {ltv}", "loyalty_member"
    else:
        text, rule = f"{f.order_count} order(s), not a loyalty member; lifetime value {ltv}", "has_order"
    return {"tier": tier, "rule": rule, "text": text, "purchases_in_window": window}


def next_up(f: Figures, rules: TierRules) -> list[dict[str, Any]]:
    """The cheapest ways to a higher tier: a lifetime-value gap (one purchase of that amount, which
    also adds an order and a purchase in the window), and the purchases-in-window route to Sprout."""
    window = f.in_window(rules)
    tier = tier_of(f.ltv_cents, f.order_count, len(window), f.loyalty, rules)
    out: list[dict[str, Any]] = []
    step = spend_step(tier, f.ltv_cents, f.order_count, len(window), f.loyalty, rules)
    if step is not None:
        gap, reached = step
        out.append({"tier": reached, "kind": "spend", "amount_cents": gap,
                    "text": f"${format_cents(gap)} more to {reached}"})
    if RANK[tier] < RANK[SPROUT] and tier != NO_TIER:
        need = rules.sprout_min_purchases_in_window - len(window)
        if window:
            by = window[0] + rules.window_us  # the oldest counted one still counts until then
            out.append({"tier": SPROUT, "kind": "purchases", "purchases": need, "by": _date(by),
                        "text": f"{need} more purchase(s) before {_day(by)} to {SPROUT}"})
        else:
            out.append({"tier": SPROUT, "kind": "purchases", "purchases": need, "by": None,
                        "text": f"{need} purchases within {rules.window_days} days to {SPROUT}"})
    if tier == NO_TIER:
        first = SEED if f.loyalty else FIRST_TIME_BUYER
        out.append({"tier": first, "kind": "first_purchase", "text": f"A first purchase makes them {first}"})
    return out


def spend_step(tier: str, ltv_cents: int, orders: int, window_count: int, loyalty: bool,
               rules: TierRules) -> tuple[int, str] | None:
    """The smallest purchase (cents) that lifts ``tier`` by the lifetime-value route, and the tier it
    reaches; None at the top. One home for "what next", used by the page and the till text."""
    for target, threshold in ((SPROUT, rules.sprout_min_cents), (BLOOM, rules.bloom_min_cents),
                              (EVERGREEN, rules.evergreen_min_cents)):
        if RANK[target] <= RANK[tier]:
            continue
        gap = max(threshold - ltv_cents, 1)
        reached = tier_of(ltv_cents + gap, orders + 1, window_count + 1, loyalty, rules)
        if RANK[reached] > RANK[tier]:
            return gap, reached
    return None


def progress_text(tier: str, ltv_cents: int, orders: int, window_count: int, loyalty: bool,
                  rules: TierRules) -> str:
    """The short text for the till (issue 18): ``Bloom · $42.10 to Evergreen``, ``Evergreen · top tier``."""
    if tier == NO_TIER:
        return f"No tier yet · first purchase to {SEED if loyalty else FIRST_TIME_BUYER}"
    step = spend_step(tier, ltv_cents, orders, window_count, loyalty, rules)
    if step is None:
        return f"{tier} · top tier"
    return f"{tier} · ${format_cents(step[0])} to {step[1]}"


def keeps(f: Figures, rules: TierRules) -> dict[str, Any] | None:
    """When the tier rests on the purchases in the window alone: the last instant it holds if the
    customer buys nothing more, and what it drops to after."""
    window = f.in_window(rules)
    tier = tier_of(f.ltv_cents, f.order_count, len(window), f.loyalty, rules)
    capped = min(len(window), rules.sprout_min_purchases_in_window - 1)
    after = tier_of(f.ltv_cents, f.order_count, capped, f.loyalty, rules)
    if after == tier:
        return None
    until = window_drop_us(window, f.as_of_us, rules)
    if until is None:
        return None
    return {"tier": tier, "until": _date(until), "drops_to": after,
            "text": f"One more purchase by {_day(until)} keeps {tier} (else {after})"}


def drops(f: Figures, rules: TierRules) -> dict[str, Any] | None:
    """The smallest return that lowers the tier: a return lowers the lifetime value and is not an
    order, so only a tier that rests on the lifetime value can fall this way."""
    window = len(f.in_window(rules))
    tier = tier_of(f.ltv_cents, f.order_count, window, f.loyalty, rules)
    for threshold in (rules.evergreen_min_cents, rules.bloom_min_cents, rules.sprout_min_cents):
        if f.ltv_cents < threshold:
            continue
        amount = f.ltv_cents - threshold + 1
        to = tier_of(f.ltv_cents - amount, f.order_count, window, f.loyalty, rules)
        if RANK[to] < RANK[tier]:
            return {"return_cents": amount, "drops_to": to,
                    "text": f"A return of ${format_cents(amount)} would drop them to {to}"}
        return None  # the next rule down holds anyway (e.g. Sprout by purchases)
    return None


def explain(f: Figures, rules: TierRules) -> dict[str, Any]:
    """Everything the customer view says about the tier."""
    return {"because": because(f, rules), "next_up": next_up(f, rules), "keeps": keeps(f, rules),
            "drops": drops(f, rules)}


def figures(ltv_cents: int, order_count: int, purchases_us: Iterable[int], loyalty: bool, as_of: datetime) -> Figures:
    as_of_us = int((as_of - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1))
    return Figures(int(ltv_cents), int(order_count), tuple(int(d) for d in purchases_us), bool(loyalty), as_of_us)
