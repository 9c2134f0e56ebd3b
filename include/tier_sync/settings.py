"""The one place that reads deployment configuration (Airflow Variables, environment).

Everything here is read lazily, inside functions, so importing this module at DAG parse time
touches neither the metadata DB nor the environment. Defaults follow docs/tier-rules.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

LIGHTSPEED_CONN_ID = "lightspeed_default"
GIT_CONN_ID = "git_default"
SYNC_POOL = "lightspeed_api"
SYNC_POOL_DEFAULT_SLOTS = 2

VAR_DATA_DIR = "tier_sync_data_dir"
VAR_GIT_REMOTE = "tier_sync_git_remote"
VAR_GIT_BRANCH = "tier_sync_git_branch"
VAR_RULES = "tier_sync_rules"

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


@dataclass(frozen=True)
class TierRules:
    """Business thresholds. Money is in integer cents so no float can move a customer across a line."""

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

    def group_for(self, tier: str) -> str | None:
        """Lightspeed group name of a tier; None for the no-tier state."""
        return self.group_names.get(tier)

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> TierRules:
        """Defaults updated with a mapping (e.g. the JSON of the `tier_sync_rules` Variable).

        Unknown keys are an error: a typo in a threshold must not silently fall back to a default.
        Money may be given in dollars (`evergreen_min`: 1500) or cents (`evergreen_min_cents`).
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in {"evergreen_min", "bloom_min", "sprout_min"}:
                values[f"{key}_cents"] = _dollars_to_cents(value)
            elif key == "group_names":
                merged = dict(DEFAULT_GROUP_NAMES)
                unknown = set(value) - set(TIERS)
                if unknown:
                    raise ValueError(f"tier_sync_rules.group_names: unknown tiers {sorted(unknown)}")
                merged.update(value)
                values[key] = merged
            elif key in known:
                values[key] = value
            else:
                raise ValueError(f"tier_sync_rules: unknown setting {key!r}; known: {sorted(known)}")
        rules = replace(cls(), **values)
        if not rules.evergreen_min_cents >= rules.bloom_min_cents >= rules.sprout_min_cents >= 0:
            raise ValueError("tier_sync_rules: thresholds must satisfy evergreen >= bloom >= sprout >= 0")
        return rules


def _dollars_to_cents(value: Any) -> int:
    from include.tier_sync.money import to_cents

    return to_cents(value)


def variable(name: str, default: str | None = None) -> str | None:
    """An Airflow Variable, read only when called: env AIRFLOW_VAR_*, then the Task SDK (inside a
    task), then the metadata DB model (the api-server and CLI scripts, where the SDK cannot reach
    Variables stored in the DB), then `default` (unit tests, bench: no Airflow at all)."""
    env = os.environ.get(f"AIRFLOW_VAR_{name.upper()}")
    if env is not None:
        return env
    for read in (_sdk_variable, _model_variable):
        try:
            value = read(name)
        except Exception:  # this reader is not available in this process; try the next one
            continue
        if value is not None:
            return value
    return default


def _sdk_variable(name: str) -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(name, default=None)
    return None if value is None else str(value)


def _model_variable(name: str) -> str | None:
    from airflow.models import Variable

    value = Variable.get(name, default_var=None)  # noqa: AIR311 (the api-server's DB-backed accessor)
    return None if value is None else str(value)


def load_tier_rules() -> TierRules:
    raw = variable(VAR_RULES)
    if not raw:
        return TierRules()
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Variable {VAR_RULES} is not valid JSON: {exc}") from exc
    return TierRules.from_mapping(overrides)


def airflow_home() -> str:
    return os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")


def data_dir() -> str:
    """Where the order store, master CSV, logs and reports live: a local path or an fsspec URL."""
    return variable(VAR_DATA_DIR) or os.path.join(airflow_home(), "tier_sync_data")


def git_remote() -> str:
    """Remote for the master CSV commit; default: a bare repository under the data dir."""
    remote = variable(VAR_GIT_REMOTE)
    if remote:
        return remote
    base = data_dir()
    if "://" in base and not base.startswith("file://"):
        raise ValueError(
            f"Variable {VAR_GIT_REMOTE} must be set when {VAR_DATA_DIR} is object storage ({base})"
        )
    return os.path.join(base.removeprefix("file://"), "git", "tiers.git")


def git_branch() -> str:
    return variable(VAR_GIT_BRANCH) or "main"
