"""Why a customer is in their tier and what would change it (include/tier_sync/explain.py, issue 18).

Every "what next" is checked against the independent oracle (tests/oracle.py) on planted stores:
the amount it names reaches the other tier and one cent less does not; the date it names is the
last as_of at which the tier holds; the purchases it asks for are enough and one fewer is not.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from include.tier_sync import explain
from include.tier_sync.rules import TierRules
from tests import oracle

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RULES = TierRules()


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class Planted:
    """One customer and their sales, as the simulator would hold them."""

    def __init__(self, loyalty: bool, *sales: tuple[int, datetime]) -> None:
        self.loyalty = loyalty
        self.sales: dict[str, dict[str, Any]] = {}
        for cents, when in sales:
            self.add(cents, when)

    def add(self, cents: int, when: datetime) -> Planted:
        sid = f"s{len(self.sales)}"
        sign = "-" if cents < 0 else ""
        amount = f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"
        self.sales[sid] = {"id": sid, "customer_id": "c1", "status": "CLOSED", "sale_date": iso(when),
                           "total_price_incl": amount, "deleted_at": None}
        return self

    def copy(self) -> Planted:
        out = Planted(self.loyalty)
        out.sales = {k: dict(v) for k, v in self.sales.items()}
        return out

    def expected(self, as_of: datetime = AS_OF) -> oracle.Expected:
        customers = {"c1": {"id": "c1", "enable_loyalty": self.loyalty, "deleted_at": None}}
        return oracle.expected_tiers(customers, self.sales, as_of)["c1"]

    def figures(self, as_of: datetime = AS_OF) -> explain.Figures:
        e = self.expected(as_of)
        purchases = [int((parse(s["sale_date"]) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1))
                     for s in self.sales.values()
                     if not s["total_price_incl"].startswith("-") and parse(s["sale_date"]) < as_of]
        return explain.figures(e.ltv_cents, e.orders, purchases, self.loyalty, as_of)


CASES = {
    "sprout by value, $42.10 short of Bloom": Planted(False, (70790, AS_OF - 60 * DAY)),
    "evergreen at the threshold": Planted(True, (100000, AS_OF - 90 * DAY), (50000, AS_OF - 70 * DAY)),
    "bloom one cent over": Planted(True, (75001, AS_OF - 200 * DAY)),
    "sprout by three purchases": Planted(True, (1000, AS_OF - 29 * DAY), (1500, AS_OF - 10 * DAY), (900, AS_OF - DAY)),
    "sprout by purchases, oldest at the window's edge": Planted(
        False, (500, AS_OF - 30 * DAY), (700, AS_OF - 2 * DAY), (800, AS_OF - timedelta(hours=1))),
    "sprout by value and purchases": Planted(False, (9000, AS_OF - 5 * DAY), (9000, AS_OF - 4 * DAY), (9000, AS_OF - 3 * DAY)),
    "seed with one purchase in the window": Planted(True, (4000, AS_OF - 3 * DAY)),
    "first time buyer with a return": Planted(False, (12000, AS_OF - 40 * DAY), (-2000, AS_OF - 35 * DAY)),
    "no purchase yet": Planted(True),
}


@pytest.mark.parametrize("name", CASES)
def test_the_explanation_names_the_oracles_tier(name: str) -> None:
    case = CASES[name]
    out = explain.explain(case.figures(), RULES)
    assert out["because"]["tier"] == case.expected().tier


@pytest.mark.parametrize("name", CASES)
def test_the_spend_named_reaches_the_next_tier_and_a_cent_less_does_not(name: str) -> None:
    case = CASES[name]
    here = case.expected().tier
    for step in explain.explain(case.figures(), RULES)["next_up"]:
        if step["kind"] != "spend":
            continue
        when = AS_OF - timedelta(hours=2)
        assert case.copy().add(step["amount_cents"], when).expected().tier == step["tier"]
        if step["amount_cents"] > 1:
            assert case.copy().add(step["amount_cents"] - 1, when).expected().tier != step["tier"]
        assert explain.RANK[step["tier"]] > explain.RANK[here]


def test_the_gap_is_to_the_cent() -> None:
    out = explain.explain(CASES["sprout by value, $42.10 short of Bloom"].figures(), RULES)
    assert out["next_up"][0]["text"] == "$42.10 more to Bloom"


@pytest.mark.parametrize("name", CASES)
def test_the_return_named_drops_the_tier_and_a_cent_less_does_not(name: str) -> None:
    case = CASES[name]
    found = explain.explain(case.figures(), RULES)["drops"]
    if found is None:
        return
    when = AS_OF - timedelta(hours=2)
    assert case.copy().add(-found["return_cents"], when).expected().tier == found["drops_to"]
    if found["return_cents"] > 1:
        assert case.copy().add(-(found["return_cents"] - 1), when).expected().tier == case.expected().tier


def test_drops_at_the_threshold_take_one_cent_and_purchases_hold_sprout() -> None:
    at = explain.explain(CASES["evergreen at the threshold"].figures(), RULES)["drops"]
    assert at == {"return_cents": 1, "drops_to": "Bloom", "text": "A return of $0.01 would drop them to Bloom"}
    # Sprout by value and by three purchases: no return can take Sprout away
    assert explain.explain(CASES["sprout by value and purchases"].figures(), RULES)["drops"] is None
    assert explain.explain(CASES["seed with one purchase in the window"].figures(), RULES)["drops"] is None


@pytest.mark.parametrize("name", ["sprout by three purchases", "sprout by purchases, oldest at the window's edge"])
def test_keeps_names_the_last_as_of_at_which_the_tier_holds(name: str) -> None:
    case = CASES[name]
    found = explain.explain(case.figures(), RULES)["keeps"]
    assert found is not None
    until = parse(found["until"])
    assert case.expected(until).tier == found["tier"] == "Sprout"
    assert case.expected(until + timedelta(seconds=1)).tier == found["drops_to"]
    # one more purchase just before then keeps it past that date
    assert case.copy().add(100, until - timedelta(seconds=1)).expected(until + timedelta(seconds=1)).tier == "Sprout"


def test_the_window_edge_counts_the_oldest_purchase_today_and_drops_tomorrow() -> None:
    case = CASES["sprout by purchases, oldest at the window's edge"]
    found = explain.explain(case.figures(), RULES)["keeps"]
    assert found is not None and parse(found["until"]) == AS_OF  # its oldest purchase is exactly 30 days old


def test_purchases_to_sprout_are_enough_and_one_fewer_is_not() -> None:
    case = CASES["seed with one purchase in the window"]
    step = next(s for s in explain.explain(case.figures(), RULES)["next_up"] if s["kind"] == "purchases")
    assert step["purchases"] == 2
    by = parse(step["by"])
    enough = case.copy().add(100, by - timedelta(seconds=2)).add(100, by - timedelta(seconds=1))
    assert enough.expected(by).tier == "Sprout"
    assert case.copy().add(100, by - timedelta(seconds=1)).expected(by).tier != "Sprout"


def test_no_purchase_and_first_time_buyer() -> None:
    none = explain.explain(CASES["no purchase yet"].figures(), RULES)
    assert none["because"]["rule"] == "no_order" and none["next_up"][-1]["tier"] == "Seed"
    ftb = explain.explain(CASES["first time buyer with a return"].figures(), RULES)
    assert ftb["because"]["tier"] == "First Time Buyer"
    assert ftb["next_up"][0] == {"tier": "Sprout", "kind": "spend", "amount_cents": 15000, "text": "$150.00 more to Sprout"}
