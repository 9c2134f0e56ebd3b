"""The one place that reads deployment configuration (Airflow Variables, environment).

Everything here is read lazily, inside functions, so importing this module at DAG parse time
touches neither the metadata DB nor the environment. The DAG file calls `task_timeouts` and
`dagrun_timeout` at parse time: those read the environment only, never a Variable or the DB. The
tier table itself (names, thresholds, their validation, the rule) lives in `include.tier_sync.rules`;
this module only reads the `tier_sync_rules` Variable and hands it to `TierRules.from_mapping`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from datetime import time, timedelta
from typing import Any
from urllib.parse import urlsplit

from include.tier_sync.rules import TierRules, describe

log = logging.getLogger(__name__)

DAG_ID = "customer_tier_sync"
LIGHTSPEED_CONN_ID = "lightspeed_default"
GIT_CONN_ID = "git_default"
SYNC_POOL = "lightspeed_api"
SYNC_POOL_DEFAULT_SLOTS = 2

VAR_DATA_DIR = "tier_sync_data_dir"
VAR_GIT_REMOTE = "tier_sync_git_remote"
VAR_GIT_BRANCH = "tier_sync_git_branch"
VAR_RULES = "tier_sync_rules"
VAR_CUSTOMER_LOOKUPS = "tier_sync_customer_lookups_per_hour"
VAR_RETENTION_DAYS = "tier_sync_retention_days"
VAR_GIT_WITHOUT_CONTACTS = "tier_sync_git_without_contacts"
VAR_APPROVAL_TIMEOUT = "tier_sync_approval_timeout_hours"
VAR_APPROVERS = "tier_sync_approvers"
VAR_PROGRESS_FIELD = "tier_sync_progress_field"
PROGRESS_FIELDS = ("custom_field_1", "custom_field_2", "custom_field_3", "custom_field_4")
VAR_RETURN_WINDOW_DAYS = "tier_sync_return_window_days"
VAR_GROWING_DISTANCE = "tier_sync_growing_distance"

# The DAG's schedule (daily, UTC): each run's as_of is this time of day (docs/tier-rules.md "as_of").
SCHEDULE_AT = time(2, 0)

# Run folders (runs/<key>/) older than this many days are pruned by the prune_runs task. There is
# no "off": a typo must never turn into "delete everything" or "keep PII forever" silently; keep
# folders for longer with a larger number. The minimum keeps a week for a person to look into.
RETENTION_DAYS_DEFAULT = 90
RETENTION_DAYS_MIN = 7


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


# What the data dir may be besides an absolute local path: these fsspec protocols only. The
# api-server reads (and serves Data Docs) from it, so e.g. an http:// URL would turn the page into
# a proxy. "memory" is fsspec's in-process store, the unit tests' stand-in for object storage: in a
# deployment every process would see its own empty store.
DATA_DIR_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "abfss", "memory")
_AZURE_SCHEMES = ("az", "abfs", "abfss")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# adlfs's "container@account.dfs.core.windows.net": user-info syntax, but names no secret.
_AZURE_ACCOUNT = re.compile(r"[a-z0-9][a-z0-9-]*@[a-z0-9]+\.(?:dfs|blob)\.core\.windows\.net\Z")


def data_dir() -> str:
    """Where the order store, master CSV, logs and reports live (see `check_data_dir`)."""
    return check_data_dir(variable(VAR_DATA_DIR))


def check_data_dir(raw: str | None) -> str:
    """The data dir a `tier_sync_data_dir` value names, or ValueError naming the Variable.

    Unset or blank: `$AIRFLOW_HOME/tier_sync_data`. Otherwise an absolute local path or a URL of
    DATA_DIR_SCHEMES without credentials, query or fragment (an s3:// URL may name an Airflow
    connection: s3://<conn_id>@bucket/prefix, see storage_connection). The one validator: tasks (`data_dir`)
    and the page (`dashboard.resolve_data_dir`) both call it. Messages never echo the value.
    """
    if raw is None or not raw.strip():
        default = os.path.join(airflow_home(), "tier_sync_data")
        if not os.path.isabs(default):
            raise ValueError(
                f"Variable {VAR_DATA_DIR} is unset and its default ($AIRFLOW_HOME/tier_sync_data) is a "
                "relative path; set AIRFLOW_HOME or the Variable to an absolute path"
            )
        return default
    problem = _data_dir_problem(raw)
    if problem is not None:
        raise ValueError(f"Variable {VAR_DATA_DIR} is refused: {problem}")
    return raw


def _data_dir_problem(value: str) -> str | None:
    """Why `value` is not an allowed data dir, or None (the reason never quotes the value)."""
    if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it has leading/trailing whitespace or a control character; remove them"
    if "::" in value:
        return "chained fsspec URLs ('::') are not allowed; use one local path or one object-storage URL"
    if "://" not in value:
        if not os.path.isabs(value):
            return (
                "it is a relative path, which each worker would resolve against its own working "
                "directory; use an absolute path or an object-storage URL"
            )
        return None
    scheme = value.split("://", 1)[0]
    if not _SCHEME.match(scheme):
        return "it is neither an absolute local path nor a URL with a valid (lower-case) scheme"
    if scheme not in DATA_DIR_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in DATA_DIR_SCHEMES)
        return (
            f"scheme {scheme!r} is not allowed; use an absolute local path or one of {allowed} "
            "(memory:// is for tests only)"
        )
    return _url_problem(scheme, value)


def _url_problem(scheme: str, value: str) -> str | None:
    if "?" in value or "#" in value:
        return (
            f"the {scheme}:// URL has a query ('?') or fragment ('#'); storage options belong in "
            "the fsspec / cloud configuration, not in the Variable"
        )
    parts = urlsplit(value)
    if scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            return "a file:// URL must name an absolute path and no host: file:///absolute/path"
        return None
    netloc = parts.netloc
    if "@" in netloc:
        if scheme in _AZURE_SCHEMES and _AZURE_ACCOUNT.match(netloc):
            return None
        from include.tier_sync.storage_connection import connection_id_problem

        user, netloc = netloc.rsplit("@", 1)
        problem = connection_id_problem(scheme, user)
        if problem is not None:
            return problem
    if scheme != "memory" and not _BUCKET.match(netloc):
        return f"the {scheme}:// URL must start with a bucket or container name: {scheme}://bucket/prefix"
    return None


def git_remote_variable() -> str | None:
    """The `tier_sync_git_remote` Variable, or None when unset (git_remote.resolve_remote decides)."""
    return (variable(VAR_GIT_REMOTE) or "").strip() or None


def git_branch() -> str:
    return variable(VAR_GIT_BRANCH) or "main"


# -- the Loyalty tiers page ------------------------------------------------------------------------------

CUSTOMER_LOOKUPS_PER_HOUR = 120  # one a minute for a whole shift, with room for a busy hour
MAX_CUSTOMER_LOOKUPS_PER_HOUR = 10_000


def check_customer_lookups_per_hour(raw: str | None) -> int:
    """Each user's limit of per-customer lookups per hour on the page (unset: the default); anything
    but a whole number from 1 to MAX_CUSTOMER_LOOKUPS_PER_HOUR is refused, never read as "no limit"."""
    if raw is None or not raw.strip():
        return CUSTOMER_LOOKUPS_PER_HOUR
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_CUSTOMER_LOOKUPS_PER_HOUR:
        raise ValueError(
            f"Variable {VAR_CUSTOMER_LOOKUPS} must be a whole number of lookups per user per hour "
            f"from 1 to {MAX_CUSTOMER_LOOKUPS_PER_HOUR}, got {text[:40]!r}"
        )
    return int(text)


# The page's "at risk" and "growing" lists (dashboard_growth.py).
RETURN_WINDOW_DAYS_DEFAULT = 30  # the store accepts returns this many days after a purchase
MAX_RETURN_WINDOW_DAYS = 3650
GROWING_DISTANCE_DEFAULT = "50.00"  # "near the next tier": at most this much spend short of it
_AMOUNT = re.compile(r"\d{1,9}(\.\d{1,2})?\Z")


def check_return_window_days(raw: str | None) -> int:
    """Days after a purchase in which the store takes it back (unset: 30); a whole number from 0
    (no returns) to MAX_RETURN_WINDOW_DAYS, else ValueError naming the Variable."""
    if raw is None or not raw.strip():
        return RETURN_WINDOW_DAYS_DEFAULT
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_RETURN_WINDOW_DAYS:
        raise ValueError(
            f"Variable {VAR_RETURN_WINDOW_DAYS} must be a whole number of days from 0 to "
            f"{MAX_RETURN_WINDOW_DAYS} (unset: {RETURN_WINDOW_DAYS_DEFAULT}), got {text[:40]!r}"
        )
    return int(text)


def check_growing_distance(raw: str | None) -> int:
    """How close to the next tier's threshold counts as "growing", in cents (unset: $50.00): an
    amount in the store's currency such as `50` or `42.10`, above zero; else ValueError naming the
    Variable (a zero would silently list nobody)."""
    text = (raw or "").strip() or GROWING_DISTANCE_DEFAULT
    if not (text.isascii() and _AMOUNT.match(text)) or not any(c in "123456789" for c in text):
        raise ValueError(
            f"Variable {VAR_GROWING_DISTANCE} must be an amount above 0 in the store's currency with at "
            f"most two decimals, e.g. 50 or 42.10 (unset: {GROWING_DISTANCE_DEFAULT}), got {text[:40]!r}"
        )
    whole, _, frac = text.partition(".")
    return int(whole) * 100 + int((frac + "00")[:2])


# -- privacy: retention, the git master ----------------------------------------------------------------


def retention_days() -> int:
    """The `tier_sync_retention_days` Variable (see `check_retention_days`)."""
    return check_retention_days(variable(VAR_RETENTION_DAYS))


def check_retention_days(raw: str | None) -> int:
    """Days run folders are kept: unset or blank means RETENTION_DAYS_DEFAULT; otherwise a whole
    number >= RETENTION_DAYS_MIN, else ValueError naming the Variable (no "off", no fractions)."""
    if raw is None or not raw.strip():
        return RETENTION_DAYS_DEFAULT
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < RETENTION_DAYS_MIN:
        raise ValueError(
            f"Variable {VAR_RETENTION_DAYS} must be a whole number of days >= {RETENTION_DAYS_MIN} "
            f"(unset: {RETENTION_DAYS_DEFAULT}), got {raw!r}; there is no 'off': to keep run folders "
            "longer, set a larger number"
        )
    return int(text)


def git_without_contacts() -> bool:
    """The `tier_sync_git_without_contacts` Variable (see `check_flag`)."""
    return check_flag(VAR_GIT_WITHOUT_CONTACTS, variable(VAR_GIT_WITHOUT_CONTACTS))


def check_flag(name: str, raw: str | None) -> bool:
    """A boolean Variable: unset or blank is False; `true` / `false` (any case); else ValueError."""
    text = (raw or "").strip().lower()
    if text in ("", "false"):
        return False
    if text == "true":
        return True
    raise ValueError(f"Variable {name} must be true or false (unset: false), got {raw!r}")


def progress_field() -> str | None:
    """The `tier_sync_progress_field` Variable (see `check_progress_field`)."""
    return check_progress_field(variable(VAR_PROGRESS_FIELD))


def check_progress_field(raw: str | None) -> str | None:
    """The customer field that shows progress at the till: unset or blank is off (None); else one of
    PROGRESS_FIELDS, anything else ValueError naming the Variable (never another field of the record)."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text not in PROGRESS_FIELDS:
        raise ValueError(
            f"Variable {VAR_PROGRESS_FIELD} must be one of {', '.join(PROGRESS_FIELDS)} (unset: off), "
            f"got {text[:40]!r}"
        )
    return text


# -- the approval of a mass change (approve_sync) --------------------------------------------------

APPROVAL_TIMEOUT_HOURS = 12.0
_USER_ID = re.compile(r"[^\s,]{1,200}\Z")


def approval_timeout() -> timedelta:
    """The `tier_sync_approval_timeout_hours` Variable (see `check_approval_timeout`)."""
    return check_approval_timeout(variable(VAR_APPROVAL_TIMEOUT))


def check_approval_timeout(raw: str | None) -> timedelta:
    """How long a mass change waits for a person: unset or blank is APPROVAL_TIMEOUT_HOURS; else a
    number of hours > 0 (fractions allowed, e.g. 0.5), anything else ValueError naming the Variable."""
    if raw is None or not raw.strip():
        return timedelta(hours=APPROVAL_TIMEOUT_HOURS)
    try:
        hours = float(raw.strip())
    except ValueError:
        hours = math.nan
    if not math.isfinite(hours) or hours <= 0:
        raise ValueError(
            f"Variable {VAR_APPROVAL_TIMEOUT} must be a number of hours > 0 (unset: "
            f"{APPROVAL_TIMEOUT_HOURS:g}), got {raw.strip()[:40]!r}"
        )
    return timedelta(hours=hours)


def approvers() -> list[str]:
    """The `tier_sync_approvers` Variable (see `check_approvers`)."""
    return check_approvers(variable(VAR_APPROVERS))


def check_approvers(raw: str | None) -> list[str]:
    """The Airflow user ids who may answer an approval request: comma-separated (or a JSON list);
    unset or blank means no list (whoever the auth manager lets answer the DAG's required actions).
    An empty entry or an id with whitespace is refused naming the Variable."""
    if raw is None or not raw.strip():
        return []
    text = raw.strip()
    items: list[Any]
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Variable {VAR_APPROVERS}: not a valid JSON list: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"Variable {VAR_APPROVERS} must be a list of user ids (strings)")
    else:
        items = text.split(",")
    ids = [str(i).strip() for i in items]
    bad = [i for i in ids if not _USER_ID.match(i)]
    if bad or not ids:
        raise ValueError(
            f"Variable {VAR_APPROVERS} must list Airflow user ids separated by commas (no empty entry, "
            f"no whitespace inside an id), got {len(bad)} bad entries"
        )
    return list(dict.fromkeys(ids))


# -- time bounds ---------------------------------------------------------------------------------------

# Each task's execution_timeout (minutes, per try) and the run's dagrun_timeout: a hung task fails
# (and alerts, and is retried) instead of holding the only active run (max_active_runs=1) forever.
# Sized at several times the run seen at 200,000 customers; sync_batch is per mapped batch.
TASK_TIMEOUT_MINUTES: dict[str, int] = {
    "extract_orders": 60,
    "compute_tiers": 30,
    "validate_tiers": 30,
    "publish_run": 10,
    "commit_csv": 15,
    "plan_sync": 20,
    "approve_sync": 20,  # per execution phase (ask; apply the answer); the wait itself is not counted
    "sync_batch": 30,
    "verify_group_counts": 15,
    "plan_progress": 20,
    "progress_batch": 30,  # per mapped batch
    "write_sync_log": 10,
    "prune_runs": 10,
    "run_outcome": 5,
}
# 6 h of work plus the default 12 h an approval may wait (approve_sync checks that its deadline
# fits in the run's), plus slack.
DAGRUN_TIMEOUT_HOURS = 20.0
ENV_TASK_TIMEOUTS = "TIER_SYNC_TASK_TIMEOUT_MINUTES"  # "extract_orders=120,sync_batch=45"
ENV_DAGRUN_TIMEOUT = "TIER_SYNC_DAGRUN_TIMEOUT_HOURS"  # "8" or "1.5"


def task_timeouts() -> dict[str, timedelta]:
    """Every task's execution_timeout: the defaults, overridden per task by env ENV_TASK_TIMEOUTS.

    Read at DAG parse time, so the environment only (a Variable would hit the DB on every parse).
    """
    minutes = dict(TASK_TIMEOUT_MINUTES)
    seen: set[str] = set()
    for item in os.environ.get(ENV_TASK_TIMEOUTS, "").split(","):
        if not item.strip():
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in minutes:
            raise ValueError(
                f"{ENV_TASK_TIMEOUTS}: each item must be task_id=minutes with a task of this DAG "
                f"({', '.join(TASK_TIMEOUT_MINUTES)}), got {item.strip()!r}"
            )
        if name in seen:
            raise ValueError(f"{ENV_TASK_TIMEOUTS}: {name} is given twice")
        seen.add(name)
        if not (value.isascii() and value.isdigit()) or int(value) <= 0:
            raise ValueError(
                f"{ENV_TASK_TIMEOUTS}: {name} must be a whole number of minutes > 0, got {value!r}"
            )
        minutes[name] = int(value)
    return {name: timedelta(minutes=m) for name, m in minutes.items()}


def dagrun_timeout() -> timedelta:
    """The run's dagrun_timeout: DAGRUN_TIMEOUT_HOURS or env ENV_DAGRUN_TIMEOUT (parse time, env only);
    refused when shorter than the longest task timeout, which it would silently cut short."""
    raw = os.environ.get(ENV_DAGRUN_TIMEOUT, "").strip()
    hours = DAGRUN_TIMEOUT_HOURS
    if raw:
        try:
            hours = float(raw)
        except ValueError:
            hours = math.nan
        if not math.isfinite(hours) or hours <= 0:
            raise ValueError(f"{ENV_DAGRUN_TIMEOUT} must be a number of hours > 0, got {raw!r}")
    timeout = timedelta(hours=hours)
    longest_name, longest = max(task_timeouts().items(), key=lambda kv: kv[1])
    if timeout < longest:
        raise ValueError(
            f"{ENV_DAGRUN_TIMEOUT}: {hours:g} h is shorter than the {longest_name} task's timeout "
            f"({longest}); raise it or lower {ENV_TASK_TIMEOUTS}"
        )
    return timeout


# -- the sync deadline -------------------------------------------------------------------------------

# "Tiers synced by 06:00 UTC", before the shops open: a run still going then alerts, naming the task
# it is in (a DeadlineAlert on the DAG). Parse time, so the environment only, like the timeouts.
SYNCED_BY_DEFAULT = "06:00"
ENV_SYNCED_BY = "TIER_SYNC_SYNCED_BY_UTC"  # "06:00", "05:30"


def synced_by() -> time:
    """The time of day (UTC) by which a scheduled run must have finished: env ENV_SYNCED_BY, else 06:00."""
    raw = os.environ.get(ENV_SYNCED_BY, "").strip() or SYNCED_BY_DEFAULT
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", raw)
    if not match:
        raise ValueError(f"{ENV_SYNCED_BY} must be a UTC time of day as HH:MM (e.g. 06:00), got {raw!r}")
    return time(int(match.group(1)), int(match.group(2)))
