"""include/tier_sync/rules.py: the one tier table, its validation, and that the engine, the
data-quality gate and the page all follow it when the `tier_sync_rules` Variable changes it."""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from include.tier_sync import dashboard, fileio, settings
from include.tier_sync import validation as v
from include.tier_sync.clv import compute_customer_metrics
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import compute_tiers
from include.tier_sync.rules import (
    ALL_TIERS,
    DEFAULT_GROUP_NAMES,
    TIER_RANK,
    TIERS,
    TierRules,
    assign_tiers,
    describe,
    in_window,
    tier_for,
    tiers_after_window,
    window_drop_us,
)
from include.tier_sync.runtime import iso
from include.tier_sync.store import CUSTOMERS, CUSTOMERS_SCHEMA, SALES, SALES_SCHEMA, OrderStore
from tests.unit.test_clv import AS_OF, DAY
from tests.unit.test_dashboard import identity, the_customers, the_sales, to_table

pytestmark = pytest.mark.unit

US_DAY = 86_400_000_000


# -- the table ------------------------------------------------------------------------------------------


def test_tier_order_and_rank() -> None:
    assert TIERS == ("Evergreen", "Bloom", "Sprout", "Seed", "First Time Buyer")
    assert ALL_TIERS[:-1] == TIERS and ALL_TIERS[-1] == "None"
    assert [TIER_RANK[t] for t in ALL_TIERS] == [5, 4, 3, 2, 1, 0]  # highest first
    assert set(DEFAULT_GROUP_NAMES) == set(TIERS)


def test_rule_first_match_wins_and_no_order_is_no_tier() -> None:
    rules = TierRules(evergreen_min_cents=50_000, bloom_min_cents=50_000, sprout_min_cents=0)
    ltv = [50_000, 49_999, 0, 0, 90_000, -500]
    orders = [1, 1, 1, 0, 0, 2]
    window = [0, 0, 0, 5, 0, 0]
    loyal = [False, True, True, True, False, True]
    # Equal Evergreen/Bloom thresholds: Evergreen wins; a zero Sprout threshold still needs an order.
    assert assign_tiers(ltv, orders, window, loyal, rules).tolist() == [
        "Evergreen",
        "Sprout",
        "Sprout",
        "None",
        "None",
        "Seed",  # negative value (returns) is below a zero threshold
    ]


@pytest.mark.parametrize(
    "rules",
    [TierRules(), TierRules(evergreen_min_cents=50_000, bloom_min_cents=50_000, sprout_min_cents=0)],
)
def test_one_customer_without_numpy_gets_the_tier_of_the_vectorised_rule(rules: TierRules) -> None:
    edges = {rules.evergreen_min_cents, rules.bloom_min_cents, rules.sprout_min_cents, 0}
    ltvs = sorted({e + d for e in edges for d in (-1, 0, 1)} | {-500})
    windows = sorted({0, rules.sprout_min_purchases_in_window - 1, rules.sprout_min_purchases_in_window})
    grid = [(c, n, w, m) for c in ltvs for n in (0, 1, 2) for w in windows for m in (False, True)]
    vectorised = assign_tiers(*zip(*grid, strict=True), rules).tolist()
    assert [tier_for(c, n, w, m, rules) for c, n, w, m in grid] == vectorised
    unreachable = {"Bloom"} if rules.bloom_min_cents == rules.evergreen_min_cents else set()  # Evergreen wins
    assert set(vectorised) == set(ALL_TIERS) - unreachable  # the grid reaches every other row of the table


def test_rule_on_unparsed_floats_compares_false() -> None:
    tiers = assign_tiers([math.nan, 30_000.0], [1.0, math.nan], [0.0, 0.0], [True, True], TierRules())
    assert tiers.tolist() == ["Seed", "None"]  # the gate masks these rows itself


def test_tiers_after_window_and_drop_instant() -> None:
    rules = TierRules()
    ltv = [1_000, 30_000, 1_000, 1_000]
    orders = [4, 3, 2, 5]
    window = [4, 3, 2, 3]
    loyal = [True, False, False, False]
    now = assign_tiers(ltv, orders, window, loyal, rules).tolist()
    after = tiers_after_window(ltv, orders, window, loyal, rules).tolist()
    assert now == ["Sprout", "Sprout", "First Time Buyer", "Sprout"]
    assert after == ["Seed", "Sprout", "First Time Buyer", "First Time Buyer"]  # only window-held drop

    cut = 1_000 * US_DAY
    dates = [cut - 1 * US_DAY, cut - 20 * US_DAY, cut - 12 * US_DAY, cut - 31 * US_DAY, cut]
    assert in_window(dates, cut, rules).tolist() == [True, True, True, False, False]
    assert in_window([cut - 30 * US_DAY], cut, rules).tolist() == [True]  # window start is inside
    assert window_drop_us(dates, cut, rules) == cut - 20 * US_DAY + 30 * US_DAY  # 3rd newest + window
    assert window_drop_us(dates[:2], cut, rules) is None


# -- validation of tier_sync_rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "setting", "value"),
    [
        ({"evergren_min": 1}, "evergren_min", "'evergren_min'"),
        ({"evergreen_min_cents": -1}, "evergreen_min_cents", "-1"),
        ({"sprout_min": -5}, "sprout_min", "-5"),
        ({"sprout_min": "lots"}, "sprout_min", "'lots'"),
        ({"bloom_min": True}, "bloom_min", "True"),
        ({"bloom_min_cents": 25_000.5}, "bloom_min_cents", "25000.5"),
        ({"bloom_min": 2000}, "evergreen >= bloom >= sprout", "bloom_min_cents=200000"),
        ({"sprout_min": 800}, "evergreen >= bloom >= sprout", "sprout_min_cents=80000"),
        ({"sprout_min": 10, "sprout_min_cents": 1000}, "sprout_min and sprout_min_cents", "both"),
        ({"window_days": 0}, "window_days", "0"),
        ({"window_days": -7}, "window_days", "-7"),
        ({"window_days": True}, "window_days", "True"),
        ({"window_days": 7.5}, "window_days", "7.5"),
        ({"window_days": "30"}, "window_days", "'30'"),
        ({"sprout_min_purchases_in_window": 0}, "sprout_min_purchases_in_window", "0"),
        ({"sprout_min_purchases_in_window": False}, "sprout_min_purchases_in_window", "False"),
        ({"placeholder_email_min_customers": 0}, "placeholder_email_min_customers", "0"),
        ({"max_downgrades": -1}, "max_downgrades", "-1"),
        ({"max_downgrades": True}, "max_downgrades", "True"),
        ({"max_row_drop_fraction": -0.01}, "max_row_drop_fraction", "-0.01"),
        ({"max_tier_change_fraction": 1.5}, "max_tier_change_fraction", "1.5"),
        ({"max_move_fraction": "0.2"}, "max_move_fraction", "'0.2'"),
        ({"max_move_fraction": True}, "max_move_fraction", "True"),
        ({"max_row_drop_fraction": float("nan")}, "max_row_drop_fraction", "nan"),
        ({"group_names": {"Platinum": "VIP"}}, "group_names", "'Platinum'"),
        ({"group_names": {"None": "Nobody"}}, "group_names", "'None'"),
        ({"group_names": ["Seed"]}, "group_names", "['Seed']"),
        ({"group_names": {"Seed": ""}}, "group_names['Seed']", "''"),
        ({"group_names": {"Seed": "  "}}, "group_names['Seed']", "'  '"),
        ({"group_names": {"Seed": 7}}, "group_names['Seed']", "7"),
        ({"group_names": {"Seed": "GreenHaus Crew - Bloom"}}, "group_names['Seed']", "'GreenHaus Crew - Bloom'"),
        ({"default_group_name": "First Time Buyer"}, "default_group_name", "'First Time Buyer'"),
        ({"default_group_name": ""}, "default_group_name", "''"),
        ({"default_group_code": None}, "default_group_code", "None"),
    ],
)
def test_bad_values_are_rejected_naming_setting_and_value(
    overrides: dict[str, Any], setting: str, value: str
) -> None:
    with pytest.raises(ValueError) as info:
        TierRules.from_mapping(overrides)
    message = str(info.value)
    assert message.startswith("tier_sync_rules: "), message
    assert setting in message and value in message, message


def test_not_an_object_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^tier_sync_rules: must be a JSON object"):
        TierRules.from_mapping([1, 2])  # type: ignore[arg-type]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match=r"^tier_sync_rules: window_days must be >= 1, got 0"):
        TierRules(window_days=0)
    with pytest.raises(ValueError, match=r"^tier_sync_rules: group_names lacks tiers \['Seed'\]"):
        TierRules(group_names={t: f"g {t}" for t in TIERS if t != "Seed"})


def test_accepted_forms() -> None:
    dollars = TierRules.from_mapping({"evergreen_min": 2000, "bloom_min": "999.995", "sprout_min": 0})
    assert (dollars.evergreen_min_cents, dollars.bloom_min_cents, dollars.sprout_min_cents) == (200_000, 100_000, 0)
    cents = TierRules.from_mapping({"evergreen_min_cents": 150_000, "bloom_min_cents": 150_000})
    assert cents.bloom_min_cents == cents.evergreen_min_cents == 150_000
    groups = TierRules.from_mapping({"group_names": {"Seed": "Crew Seed"}, "default_group_name": "Everyone"})
    assert groups.group_for("Seed") == "Crew Seed" and groups.group_for("Bloom") == DEFAULT_GROUP_NAMES["Bloom"]
    assert groups.group_for("None") is None and groups.default_group_name == "Everyone"
    edges = TierRules.from_mapping(
        {"max_row_drop_fraction": 0, "max_tier_change_fraction": 1, "max_move_fraction": 0.5, "max_downgrades": 0}
    )
    assert (edges.max_row_drop_fraction, edges.max_tier_change_fraction, edges.max_downgrades) == (0, 1, 0)
    assert TierRules.from_mapping({}) == TierRules()


def test_amount_settings_are_validated_and_accept_dollars() -> None:
    defaults = TierRules()
    assert (defaults.max_sale_amount_cents, defaults.implausible_amounts) == (100_000_000, "fail")
    assert defaults.max_lifetime_value_cents == 1_000_000_000  # $10,000,000.00
    dollars = TierRules.from_mapping(
        {"max_sale_amount": "25000.50", "max_lifetime_value": 2_000_000, "implausible_amounts": "quarantine"}
    )
    assert (dollars.max_sale_amount_cents, dollars.max_lifetime_value_cents) == (2_500_050, 200_000_000)
    assert dollars.implausible_amounts == "quarantine"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"max_sale_amount_cents": 0}, "max_sale_amount_cents must be between 1 and 10000000000000 cents, got 0"),
        ({"max_sale_amount_cents": 10**13 + 1}, "got 10000000000001"),  # beyond what the store accepts
        ({"max_sale_amount_cents": 1.5}, "max_sale_amount_cents must be a whole number, got 1.5"),
        ({"max_sale_amount_cents": True}, "max_sale_amount_cents must be a whole number, got True"),
        ({"max_sale_amount": "lots"}, "max_sale_amount must be an amount in dollars, got 'lots'"),
        ({"max_sale_amount": 5, "max_sale_amount_cents": 500}, "both given"),
        ({"implausible_amounts": "skip"}, "implausible_amounts must be one of ['fail', 'quarantine'], got 'skip'"),
        ({"implausible_amounts": None}, "implausible_amounts must be one of ['fail', 'quarantine'], got None"),
        ({"max_lifetime_value_cents": -1}, "max_lifetime_value_cents must be between 1 and"),
        ({"max_lifetime_value_cents": "1e9"}, "max_lifetime_value_cents must be a whole number, got '1e9'"),
        ({"max_lifetime_value": 1500}, "max_lifetime_value_cents must be above evergreen_min_cents (150000)"),
    ]
    for overrides, expected in bad:
        with pytest.raises(ValueError) as info:
            TierRules.from_mapping(overrides)
        assert str(info.value).startswith("tier_sync_rules: ") and expected in str(info.value), overrides
    text = describe(dollars)
    assert "Lifetime Value under 2000000.00 either way" in text
    assert "sale amounts: under 25000.50 either way, else quarantine" in text


def test_describe_names_thresholds_and_overrides() -> None:
    assert describe(TierRules()).endswith("overrides: none")
    text = describe(TierRules.from_mapping({"sprout_min": 100, "window_days": 7}))
    assert "Evergreen LTV >= 1500.00" in text and "Sprout LTV >= 100.00 or >= 3 purchases in 7 days" in text
    assert "'GreenHaus Crew - Seed'" in text and "overrides: sprout_min_cents, window_days" in text


def test_load_tier_rules_validates_and_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", json.dumps({"window_days": 7}))
    with caplog.at_level(logging.INFO, logger="include.tier_sync.settings"):
        rules = settings.load_tier_rules()
    assert rules.window_days == 7
    assert [r.getMessage() for r in caplog.records] == [f"Tier rules in effect: {describe(rules)}"]
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", "")
    assert settings.load_tier_rules() == TierRules()
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", "{window_days: 7}")
    with pytest.raises(ValueError, match=r"^tier_sync_rules: the Variable is not valid JSON"):
        settings.load_tier_rules()
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", json.dumps({"window_days": True}))
    with pytest.raises(ValueError, match=r"^tier_sync_rules: window_days must be a whole number, got True"):
        settings.load_tier_rules()


# -- engine, gate and page agree under perturbed rules -----------------------------------------------------

# (overrides, the engine's tiers by hand on tests/unit/test_dashboard.py's store, at-risk drop dates)
PERTURBED = [
    pytest.param(
        {"sprout_min": 0},
        # Every customer with an order is Sprout by value; c7 has none and stays None.
        {"c1": "Evergreen", "c2": "Sprout", "c3": "Sprout", "c4": "Sprout", "c5": "Sprout", "c6": "Sprout",
         "c7": "None", "c8": "Sprout"},
        {},
        id="sprout_min-0",
    ),
    pytest.param(
        {"window_days": 7, "sprout_min_purchases_in_window": 2, "bloom_min": 300},
        # c3: 2 purchases in 7 days (1 and 2 days old) -> drops when the 2-day-old one leaves (+5 d);
        # c8: 2 and 3 days old -> +4 d; c2 has one purchase in 7 days: Seed; c4/c6 Bloom at 300/330.
        {"c1": "Evergreen", "c2": "Seed", "c3": "Sprout", "c4": "Bloom", "c5": "Seed", "c6": "Bloom",
         "c7": "None", "c8": "Sprout"},
        {"c3": (AS_OF + 5 * DAY, "First Time Buyer"), "c8": (AS_OF + 4 * DAY, "First Time Buyer")},
        id="window_days-7-bloom-300",
    ),
    pytest.param(
        {"evergreen_min": 500, "bloom_min": 500, "sprout_min": 500},
        # Equal thresholds: no Bloom at all; c4 (300.00, 3 purchases, oldest 5 days) is now held by the
        # window and drops after +25 d.
        {"c1": "Evergreen", "c2": "Sprout", "c3": "Sprout", "c4": "Sprout", "c5": "Seed",
         "c6": "First Time Buyer", "c7": "None", "c8": "First Time Buyer"},
        {
            "c3": (AS_OF + 5 * DAY, "First Time Buyer"),
            "c2": (AS_OF + 10 * DAY, "Seed"),
            "c4": (AS_OF + 25 * DAY, "First Time Buyer"),
        },
        id="all-thresholds-500",
    ),
]  # fmt: skip


def _data_dir(root: Path, rules: TierRules) -> tuple[str, RunPaths]:
    """The store, the run's master CSV (compute_tiers) and the page's stable copies, under `rules`."""
    url = str(root)
    store = OrderStore(fileio.join(url, "store"))
    store.append(SALES, to_table(the_sales(), SALES_SCHEMA), cursor=100)
    store.append(CUSTOMERS, to_table(the_customers(), CUSTOMERS_SCHEMA), cursor=100)
    paths = RunPaths(url, AS_OF)
    compute_tiers(store, paths, identity(AS_OF), rules)
    fileio.copy(paths.run_master_csv, fileio.join(url, dashboard.MASTER_FILE))
    fileio.write_json(fileio.join(url, dashboard.LATEST_FILE), {"as_of": iso(AS_OF), "run_id": "perturbed"})
    return url, paths


def _engine(rules: TierRules, as_of: datetime) -> dict[str, str]:
    metrics = compute_customer_metrics(the_sales(), the_customers(), as_of, rules)
    return dict(zip(metrics["customer_id"], metrics["tier"], strict=True))


@pytest.mark.parametrize(("overrides", "expected", "drops"), PERTURBED)
def test_engine_gate_and_page_agree_under_perturbed_rules(
    tmp_path: Path,
    overrides: dict[str, Any],
    expected: dict[str, str],
    drops: dict[str, tuple[datetime, str]],
) -> None:
    rules = TierRules.from_mapping(overrides)
    default = TierRules()
    dashboard.clear_cache()

    # The engine: the tiers worked out by hand, and different from the default rules' tiers.
    engine = _engine(rules, AS_OF)
    assert engine == expected
    assert engine != _engine(default, AS_OF)

    url, paths = _data_dir(tmp_path, rules)
    raw = v.read_master(paths.run_master_csv)
    csv_tiers = dict(zip(raw["Customer ID"], raw["Tier"], strict=True))
    assert csv_tiers == engine

    # The gate: its re-computation gives every customer the engine's tier, so the whole suite
    # passes under these rules; under the default rules the same master breaks the tier rule.
    frame = v.prepare_frame(raw, None, rules)
    assert dict(zip(frame[v.CUSTOMER_ID], frame[v.RULE_TIER], strict=True)) == engine
    by_default = v.prepare_frame(raw, None, default)
    assert (by_default[v.RULE_TIER] != by_default[v.TIER]).any()
    summary = v.validate_master(paths, rules)
    assert summary["success"] and summary["failed"] == []

    # The page: each customer's tier, and the at-risk list = exactly the customers whose tier the
    # engine drops once their window purchases age out, to the tier it drops to, at the instant it does.
    for cid, tier in engine.items():
        shown = dashboard.customer(url, cid, rules)
        assert shown is not None and shown["tier"] == tier, cid
    risk = dashboard.at_risk(url, rules, within_days=3650, limit=200)
    later = _engine(rules, AS_OF + timedelta(days=rules.window_days + 1))  # every window purchase gone
    assert {c["customer_id"] for c in risk["customers"]} == {c for c in engine if later[c] != engine[c]}
    assert {c["customer_id"]: (c["drops_after"], c["drops_to"]) for c in risk["customers"]} == {
        cid: (iso(when), to) for cid, (when, to) in drops.items()
    }
    assert risk["exact"] == risk["total"] == len(drops)
    assert risk["rule"]["window_days"] == rules.window_days
    for c in risk["customers"]:
        assert c["tier"] == engine[c["customer_id"]] and c["drops_to"] == later[c["customer_id"]]
        when, _ = drops[c["customer_id"]]
        assert _engine(rules, when)[c["customer_id"]] == engine[c["customer_id"]]  # still held at the instant
        assert _engine(rules, when + timedelta(seconds=1))[c["customer_id"]] == c["drops_to"]  # dropped after


def test_page_rule_on_the_master_matches_the_csv(tmp_path: Path) -> None:
    """The page computes at-risk with rules.assign_tiers on the master's own columns: it must give
    the CSV's tier back for every row (else a customer silently falls out of the list)."""
    rules = TierRules.from_mapping({"window_days": 7, "sprout_min_purchases_in_window": 2, "bloom_min": 300})
    dashboard.clear_cache()
    url, _ = _data_dir(tmp_path, rules)
    master = dashboard.load_master(url)
    assert master is not None
    page = assign_tiers(master.ltv_cents, master.orders, master.p30, master.loyal, rules)
    assert np.array_equal(page, master.df["Tier"].to_numpy(dtype=object))
