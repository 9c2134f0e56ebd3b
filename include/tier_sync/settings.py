"""The one place that reads deployment configuration (Airflow Variables, environment).

Everything here is read lazily, inside functions, so importing this module at DAG parse time
touches neither the metadata DB nor the environment. The tier table itself (names, thresholds,
their validation, the rule) lives in `include.tier_sync.rules`; this module only reads the
`tier_sync_rules` Variable and hands it to `TierRules.from_mapping`.
"""

from __future__ import annotations

import json
import logging
import os

from include.tier_sync.rules import TierRules, describe

log = logging.getLogger(__name__)

LIGHTSPEED_CONN_ID = "lightspeed_default"
GIT_CONN_ID = "git_default"
SYNC_POOL = "lightspeed_api"
SYNC_POOL_DEFAULT_SLOTS = 2

VAR_DATA_DIR = "tier_sync_data_dir"
VAR_GIT_REMOTE = "tier_sync_git_remote"
VAR_GIT_BRANCH = "tier_sync_git_branch"
VAR_RULES = "tier_sync_rules"


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
    """The `tier_sync_rules` Variable as validated TierRules (defaults when unset); logged once."""
    raw = variable(VAR_RULES)
    if not raw or not raw.strip():
        rules = TierRules()
    else:
        try:
            overrides = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{VAR_RULES}: the Variable is not valid JSON: {exc}") from exc
        rules = TierRules.from_mapping(overrides)
    log.info("Tier rules in effect: %s", describe(rules))
    return rules


def airflow_home() -> str:
    return os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")


def data_dir() -> str:
    """Where the order store, master CSV, logs and reports live: a local path or an fsspec URL."""
    return variable(VAR_DATA_DIR) or os.path.join(airflow_home(), "tier_sync_data")


def git_remote_variable() -> str | None:
    """The `tier_sync_git_remote` Variable, or None when unset (git_remote.resolve_remote decides)."""
    return (variable(VAR_GIT_REMOTE) or "").strip() or None


def git_branch() -> str:
    return variable(VAR_GIT_BRANCH) or "main"
