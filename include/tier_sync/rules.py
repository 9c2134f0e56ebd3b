"""The one home of the loyalty tier table: tier names and order, group names, which sales count
as closed, the thresholds (`TierRules`, parsed and validated from the `tier_sync_rules` Variable)
and the rule itself.

The engine (clv), the data-quality gate (validation) and the "Loyalty tiers" page (dashboard)
all call `assign_tiers` here (one customer without numpy: `tier_for`, the same table), so they
cannot disagree on any customer's tier. The page's "at risk"
list is the rule too: `tiers_after_window` is the tier a customer falls to once too few purchases
remain in the window, and `window_drop_us` is when that happens.

This module is imported at DAG parse time (through settings): it imports numpy only inside the
functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from include.tier_sync.money import MAX_AMOUNT_CENTS, format_cents, to_cents

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Tier names, highest first. "None" is the tier of a customer with no qualifying purchase: it has
# no group and the sync never touches such a customer.
EVERGREEN = "Evergreen"
BLOOM = "Bloom"
SPROUT = "Sprout"
SEED = "Seed"
FIRST_TIME_BUYER = "First Time Buyer"
NO_TIER = "None"
TIERS: tuple[str, ...] = (EVERGREEN, BLOOM, SPROUT, SEED, FIRST_TIME_BUYER)
ALL_TIERS: tuple[str, ...] = (*TIERS, NO_TIER)

# Higher is better; a change to a higher rank is an upgrade. NO_TIER ranks lowest (0).
TIER_RANK: Mapping[str, int] = {tier: len(ALL_TIERS) - 1 - i for i, tier in enumerate(ALL_TIERS)}

DEFAULT_GROUP_NAMES: Mapping[str, str] = {
    EVERGREEN: "GreenHaus Crew - Evergreen",
    BLOOM: "GreenHaus Crew - Bloom",
    SPROUT: "GreenHaus Crew - Sprout",
    SEED: "GreenHaus Crew - Seed",
    FIRST_TIME_BUYER: "First Time Buyer",
}

# Sale statuses that count as finished (tier-rules.md "Which sales count"); a sale that carries
# `state` instead counts when state == "closed".
CLOSED_STATUSES: frozenset[str] = frozenset(
    {
        "CLOSED",
        "ONACCOUNT_CLOSED",
        "LAYBY_CLOSED",
        "DISPATCHED_CLOSED",
        "PICKED_UP_CLOSED",
        "SERVICE_CLOSED",
    }
)
CLOSED_STATE = "closed"


def is_finished_sale(status: str | None, state: str | None) -> bool:
    """One sale's "finished" test (the engine's vectorised one in clv.qualifying_sales is the same):
    `status` in CLOSED_STATUSES, or, with no status, `state == "closed"`."""
    if status:
        return status in CLOSED_STATUSES
    return state == CLOSED_STATE


# What the engine does with a qualifying sale whose amount breaks `max_sale_amount_cents`.
IMPLAUSIBLE_FAIL = "fail"  # the run fails, naming the sales
IMPLAUSIBLE_QUARANTINE = "quarantine"  # the sales are left out of every figure and reported
IMPLAUSIBLE_AMOUNT_MODES: tuple[str, ...] = (IMPLAUSIBLE_FAIL, IMPLAUSIBLE_QUARANTINE)

US_PER_DAY = 86_400_000_000

_PREFIX = "tier_sync_rules: "
_DOLLAR_KEYS = {
    "evergreen_min": "evergreen_min_cents",
    "bloom_min": "bloom_min_cents",
    "sprout_min": "sprout_min_cents",
    "max_sale_amount": "max_sale_amount_cents",
    "max_lifetime_value": "max_lifetime_value_cents",
}
_CENTS_FIELDS = ("evergreen_min_cents", "bloom_min_cents", "sprout_min_cents")
_POSITIVE_INT_FIELDS = ("sprout_min_purchases_in_window", "window_days", "placeholder_email_min_customers")
_NON_NEGATIVE_INT_FIELDS = ("max_downgrades",)
_FRACTION_FIELDS = ("max_row_drop_fraction", "max_tier_change_fraction", "max_move_fraction")
_INT64_MAX = 2**63 - 1
# Whole-cent bounds >= 1 and their ceilings: no sale can exceed what money.py lets into the store,
# and a Lifetime Value bound must fit the gate's int64 range.
_BOUND_FIELDS = {"max_sale_amount_cents": MAX_AMOUNT_CENTS, "max_lifetime_value_cents": _INT64_MAX}


def _error(message: str) -> ValueError:
    return ValueError(_PREFIX + message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass


@dataclass(frozen=True)
class TierRules:
    """Business thresholds. Money is in integer cents so no float can move a customer across a line.

    Every instance is validated (`__post_init__`), whether built directly or by `from_mapping`:
    a bad value raises ValueError("tier_sync_rules: <setting> ...") naming the setting and value.
    """

    evergreen_min_cents: int = 150_000
    bloom_min_cents: int = 75_000
    sprout_min_cents: int = 25_000
    sprout_min_purchases_in_window: int = 3
    window_days: int = 30
    group_names: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GROUP_NAMES))
    default_group_name: str = "All Customers"
    default_group_code: str = "1111111111"
    # Data-quality and safety knobs (issues 4 and 6).
    max_row_drop_fraction: float = 0.05
    max_tier_change_fraction: float = 0.25
    placeholder_email_min_customers: int = 3  # one address on 3+ customers looks like a placeholder
    max_move_fraction: float = 0.20
    max_downgrades: int = 500
    # Amount plausibility (issue 13): a qualifying sale must be under max_sale_amount_cents either
    # way ($1,000,000.00); a bigger one fails the run or, with "quarantine", is left out and
    # reported. The gate fails a Lifetime Value at or beyond max_lifetime_value_cents either way.
    max_sale_amount_cents: int = 100_000_000
    implausible_amounts: str = IMPLAUSIBLE_FAIL
    max_lifetime_value_cents: int = 1_000_000_000

    def __post_init__(self) -> None:
        for name in (*_CENTS_FIELDS, *_POSITIVE_INT_FIELDS, *_NON_NEGATIVE_INT_FIELDS, *_BOUND_FIELDS):
            value = getattr(self, name)
            if not _is_int(value):
                raise _error(f"{name} must be a whole number, got {value!r}")
        for name in _CENTS_FIELDS + _NON_NEGATIVE_INT_FIELDS:
            if getattr(self, name) < 0:
                raise _error(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in _POSITIVE_INT_FIELDS:
            if getattr(self, name) < 1:
                raise _error(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.evergreen_min_cents >= self.bloom_min_cents >= self.sprout_min_cents:
            raise _error(
                "thresholds must satisfy evergreen >= bloom >= sprout, got "
                f"evergreen_min_cents={self.evergreen_min_cents}, bloom_min_cents={self.bloom_min_cents}, "
                f"sprout_min_cents={self.sprout_min_cents}"
            )
        for name in _FRACTION_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise _error(f"{name} must be a number between 0 and 1, got {value!r}")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise _error(f"{name} must be between 0 and 1, got {value!r}")
        self._check_amount_bounds()
        self._check_groups()

    def _check_amount_bounds(self) -> None:
        for name, ceiling in _BOUND_FIELDS.items():
            value = getattr(self, name)
            if not 1 <= value <= ceiling:
                raise _error(f"{name} must be between 1 and {ceiling} cents, got {value!r}")
        if self.max_lifetime_value_cents <= self.evergreen_min_cents:
            raise _error(
                f"max_lifetime_value_cents must be above evergreen_min_cents ({self.evergreen_min_cents}), "
                f"else every Evergreen customer fails the gate; got {self.max_lifetime_value_cents!r}"
            )
        if self.implausible_amounts not in IMPLAUSIBLE_AMOUNT_MODES:
            raise _error(
                f"implausible_amounts must be one of {list(IMPLAUSIBLE_AMOUNT_MODES)}, got {self.implausible_amounts!r}"
            )

    def _check_groups(self) -> None:
        if not isinstance(self.group_names, Mapping):
            raise _error(f"group_names must be an object of tier -> group name, got {self.group_names!r}")
        unknown = sorted(str(t) for t in set(self.group_names) - set(TIERS))
        if unknown:
            raise _error(f"group_names has unknown tiers {unknown}; tiers with a group: {list(TIERS)}")
        absent = [t for t in TIERS if t not in self.group_names]
        if absent:
            raise _error(f"group_names lacks tiers {absent}")
        named = [(f"group_names[{t!r}]", self.group_names[t]) for t in TIERS]
        named.append(("default_group_name", self.default_group_name))
        for label, value in [*named, ("default_group_code", self.default_group_code)]:
            if not isinstance(value, str) or not value.strip():
                raise _error(f"{label} must be a non-empty string, got {value!r}")
        seen: dict[str, str] = {}
        for label, value in named:
            if value in seen:
                raise _error(f"{label} and {seen[value]} are the same group {value!r}; each needs its own")
            seen[value] = label

    def group_for(self, tier: str) -> str | None:
        """Lightspeed group name of a tier; None for the no-tier state."""
        return self.group_names.get(tier)

    @property
    def window_us(self) -> int:
        """The purchases window (`window_days`) in microseconds."""
        return self.window_days * US_PER_DAY

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> TierRules:
        """Defaults updated with a mapping (e.g. the JSON of the `tier_sync_rules` Variable).

        Unknown keys are an error: a typo in a threshold must not silently fall back to a default.
        Money may be given in dollars (`evergreen_min`: 1500) or cents (`evergreen_min_cents`);
        `group_names` overrides only the tiers it names.
        """
        if not isinstance(overrides, Mapping):
            raise _error(f"must be a JSON object of settings, got {type(overrides).__name__}")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in _DOLLAR_KEYS:
                target = _DOLLAR_KEYS[key]
                if target in overrides:
                    raise _error(f"{key} and {target} are both given; give one")
                try:
                    cents = to_cents(value)
                except (ValueError, TypeError, ArithmeticError):
                    raise _error(f"{key} must be an amount in dollars, got {value!r}") from None
                if cents < 0:
                    raise _error(f"{key} must be >= 0, got {value!r}")
                values[target] = cents
            elif key == "group_names":
                if not isinstance(value, Mapping):
                    raise _error(f"group_names must be an object of tier -> group name, got {value!r}")
                unknown = sorted(str(t) for t in set(value) - set(TIERS))
                if unknown:
                    raise _error(f"group_names has unknown tiers {unknown}; tiers with a group: {list(TIERS)}")
                values[key] = {**DEFAULT_GROUP_NAMES, **value}
            elif key in known:
                values[key] = value
            else:
                raise _error(f"unknown setting {key!r}; known: {sorted(known | set(_DOLLAR_KEYS))}")
        return replace(cls(), **values)


def describe(rules: TierRules) -> str:
    """The effective rules in one line (for the task log), settings that differ from the default marked."""
    default = TierRules()
    changed = [f.name for f in fields(TierRules) if getattr(rules, f.name) != getattr(default, f.name)]
    groups = ", ".join(f"{t}={rules.group_names[t]!r}" for t in TIERS)
    return (
        f"tiers (first match wins): {EVERGREEN} LTV >= {format_cents(rules.evergreen_min_cents)}; "
        f"{BLOOM} LTV >= {format_cents(rules.bloom_min_cents)}; "
        f"{SPROUT} LTV >= {format_cents(rules.sprout_min_cents)} or >= {rules.sprout_min_purchases_in_window} "
        f"purchases in {rules.window_days} days; {SEED} loyalty member with an order; "
        f"{FIRST_TIME_BUYER} an order; else {NO_TIER} | groups: {groups}; "
        f"default {rules.default_group_name!r} ({rules.default_group_code}) | "
        f"gate: row drop <= {rules.max_row_drop_fraction:.0%}, tier changes <= {rules.max_tier_change_fraction:.0%}, "
        f"placeholder email >= {rules.placeholder_email_min_customers} customers, "
        f"Lifetime Value under {format_cents(rules.max_lifetime_value_cents)} either way | "
        f"sync: moves <= {rules.max_move_fraction:.0%}, downgrades <= {rules.max_downgrades} | "
        f"sale amounts: under {format_cents(rules.max_sale_amount_cents)} either way, else {rules.implausible_amounts} | "
        f"overrides: {', '.join(changed) if changed else 'none'}"
    )


# -- the rule ---------------------------------------------------------------------------------------


def assign_tiers(
    ltv_cents: npt.ArrayLike,
    order_count: npt.ArrayLike,
    purchases_in_window: npt.ArrayLike,
    loyalty: npt.ArrayLike,
    rules: TierRules,
) -> np.ndarray[Any, np.dtype[np.object_]]:
    """The tier table, first match wins, over whole arrays (one entry per customer):

    1. None when Order Count < 1 (even with a zero threshold, no purchase means no group);
    2. Evergreen: lifetime value >= evergreen_min_cents;
    3. Bloom: lifetime value >= bloom_min_cents;
    4. Sprout: lifetime value >= sprout_min_cents, or >= sprout_min_purchases_in_window purchases
       in the last window_days days;
    5. Seed: a loyalty member (with an order); 6. First Time Buyer: an order.

    Numbers may be float with NaN (a NaN compares false everywhere: the caller masks those rows).
    """
    import numpy as np

    table = _tier_table(
        np.asarray(ltv_cents), np.asarray(order_count), np.asarray(purchases_in_window),
        np.asarray(loyalty, dtype=bool), rules,
    )
    conditions = [condition for condition, _ in table]
    choices = [tier for _, tier in table]
    out: np.ndarray[Any, np.dtype[np.object_]] = np.select(conditions, choices, default=NO_TIER).astype(object)
    return out


def tier_for(ltv_cents: int, order_count: int, purchases_in_window: int, loyalty: bool, rules: TierRules) -> str:
    """`assign_tiers` of one customer, without numpy (the till texts of plan_progress, the page's
    explanations): the same table, read top down."""
    table = _tier_table(ltv_cents, order_count, purchases_in_window, bool(loyalty), rules)
    return next((tier for condition, tier in table if condition), NO_TIER)


def _tier_table(ltv: Any, orders: Any, window: Any, loyal: Any, rules: TierRules) -> list[tuple[Any, str]]:
    """The tier table as (condition, tier), first match wins. Written once for numbers and numpy
    arrays alike (`x ^ True` is "not" for a bool and for a bool array, where `~` is not)."""
    has_order = orders >= 1
    return [
        (has_order ^ True, NO_TIER),
        (ltv >= rules.evergreen_min_cents, EVERGREEN),
        (ltv >= rules.bloom_min_cents, BLOOM),
        ((ltv >= rules.sprout_min_cents) | (window >= rules.sprout_min_purchases_in_window), SPROUT),
        (loyal, SEED),
        (has_order, FIRST_TIME_BUYER),
    ]


def tiers_after_window(
    ltv_cents: npt.ArrayLike,
    order_count: npt.ArrayLike,
    purchases_in_window: npt.ArrayLike,
    loyalty: npt.ArrayLike,
    rules: TierRules,
) -> np.ndarray[Any, np.dtype[np.object_]]:
    """The tier each customer has once fewer than `sprout_min_purchases_in_window` of its purchases
    remain in the window, if it buys nothing more (time alone changes nothing else: lifetime value
    and order count stay). Where this differs from `assign_tiers`, the tier is held only by the
    purchases-in-window condition: the customer is "at risk"."""
    import numpy as np

    capped = np.minimum(np.asarray(purchases_in_window), rules.sprout_min_purchases_in_window - 1)
    return assign_tiers(ltv_cents, order_count, capped, loyalty, rules)


def in_window(purchase_us: npt.ArrayLike, as_of_us: int, rules: TierRules) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Which purchase instants (int microseconds UTC) count for `purchases_in_window` at `as_of_us`:
    the window is [as_of - window_days, as_of)."""
    import numpy as np

    dates = np.asarray(purchase_us, dtype=np.int64)
    out: np.ndarray[Any, np.dtype[np.bool_]] = (dates >= as_of_us - rules.window_us) & (dates < as_of_us)
    return out


def window_drop_us(purchase_us: Iterable[int], as_of_us: int, rules: TierRules) -> int | None:
    """The last instant at which the purchases-in-window condition still holds if the customer buys
    nothing more: the `sprout_min_purchases_in_window`-th newest purchase in the window plus the
    window length (a purchase at d counts while as_of <= d + window). None when it does not hold
    at `as_of_us`."""
    import numpy as np

    dates = np.fromiter(purchase_us, dtype=np.int64)
    counted = np.sort(dates[in_window(dates, as_of_us, rules)])[::-1]  # newest first
    k = rules.sprout_min_purchases_in_window
    if len(counted) < k:
        return None
    return int(counted[k - 1]) + rules.window_us
