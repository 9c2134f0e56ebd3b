"""What a run is about: its `as_of` instant, its key, and where its files live.

`as_of` is the end of the run's data interval (tier-rules.md). Airflow 3 gives manual runs no data
interval at all, so those fall back to the time the run was asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from include.tier_sync import fileio
from include.tier_sync.fileio import join

RUN_KEY_FORMAT = "%Y%m%dT%H%M%SZ"
VALIDATION_FILE = "validation.json"


def to_utc(value: Any) -> datetime:
    """A datetime (aware or naive-as-UTC) or ISO string as an aware UTC datetime, to the second."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):
        raise TypeError(f"not a datetime: {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # pendulum DateTime is a datetime subclass; normalise to the stdlib type.
    out = datetime.fromtimestamp(value.timestamp(), tz=UTC)
    return out.replace(microsecond=0)


def iso(value: datetime) -> str:
    return to_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_key(as_of: datetime) -> str:
    return to_utc(as_of).strftime(RUN_KEY_FORMAT)


def resolve_as_of(context: Mapping[str, Any]) -> datetime:
    """End of the data interval; for manual runs without one, the run's `run_after`."""
    start = context.get("data_interval_start")
    end = context.get("data_interval_end")
    if end is not None and (start is None or end >= start):
        return to_utc(end)
    dag_run = context.get("dag_run")
    run_after = getattr(dag_run, "run_after", None) if dag_run is not None else None
    if run_after is not None:
        return to_utc(run_after)
    return to_utc(datetime.now(tz=UTC))


def run_identity(context: Mapping[str, Any]) -> dict[str, Any]:
    """Small JSON-able description of the run, written into every artifact."""
    dag_run = context.get("dag_run")
    logical = context.get("logical_date")
    run_type = getattr(dag_run, "run_type", None)
    return {
        "dag_id": getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", None),
        "run_id": context.get("run_id") or getattr(dag_run, "run_id", None),
        "run_type": str(getattr(run_type, "value", run_type)) if run_type is not None else None,
        "logical_date": iso(logical) if logical is not None else None,
        "as_of": iso(resolve_as_of(context)),
    }


@dataclass(frozen=True)
class RunPaths:
    """Every file location of one run under the data dir (see docs/contracts.md)."""

    data_dir: str
    as_of: datetime

    @property
    def key(self) -> str:
        return run_key(self.as_of)

    def _p(self, *parts: str) -> str:
        return join(self.data_dir, *parts)

    # Shared, "latest" locations.
    @property
    def store(self) -> str:
        return self._p("store")

    @property
    def master_csv(self) -> str:
        return self._p("customer_analytics_master.csv")

    @property
    def tier_history(self) -> str:
        return self._p("tier_history.csv")

    @property
    def tier_changes(self) -> str:
        return self._p("tier_changes.csv")

    @property
    def sync_log(self) -> str:
        return self._p("tier_sync_log.json")

    @property
    def latest_json(self) -> str:
        return self._p("latest.json")

    @property
    def validation_dir(self) -> str:
        return self._p("validation")

    @property
    def data_docs_dir(self) -> str:
        return self._p("validation", "data_docs")

    @property
    def git_dir(self) -> str:
        return self._p("git")

    @property
    def runs_dir(self) -> str:
        return self._p("runs")

    # Per-run artifacts.
    @property
    def run_dir(self) -> str:
        return self._p("runs", self.key)

    @property
    def run_json(self) -> str:
        return join(self.run_dir, "run.json")

    @property
    def run_master_csv(self) -> str:
        return join(self.run_dir, "customer_analytics_master.csv")

    @property
    def run_tier_changes(self) -> str:
        return join(self.run_dir, "tier_changes.csv")

    @property
    def run_validation_json(self) -> str:
        return join(self.run_dir, "validation.json")

    @property
    def run_sync_plan_dir(self) -> str:
        return join(self.run_dir, "sync_plan")

    @property
    def run_sync_log(self) -> str:
        return join(self.run_dir, "tier_sync_log.json")

    def run_dir_for(self, as_of: datetime) -> str:
        return self._p("runs", run_key(as_of))

    def run_dir_for_key(self, key: str) -> str:
        return self._p("runs", key)


def is_run_key(name: str) -> bool:
    """A run folder name (YYYYMMDDTHHMMSSZ); anything else under runs/ is ignored."""
    try:
        datetime.strptime(name, RUN_KEY_FORMAT)
    except ValueError:
        return False
    return True


def run_passed_validation(run_dir: str) -> bool:
    """Whether a run folder's validation report says it passed (no report: it did not)."""
    report = fileio.read_json(join(run_dir, VALIDATION_FILE), default=None)
    return isinstance(report, dict) and bool((report.get("summary") or {}).get("success"))


def validated_runs_before(paths: RunPaths) -> list[str]:
    """Run folders older than this run whose data passed validation, newest first.

    "The previous run" means the previous *validated* run everywhere (Previous Tier, the
    validation baseline): a run that failed validation must not become anyone's reference.
    """
    keys = [k for k in fileio.listdir(paths.runs_dir) if is_run_key(k) and k < paths.key]
    return [paths.run_dir_for_key(k) for k in sorted(keys, reverse=True) if run_passed_validation(paths.run_dir_for_key(k))]


def newest_published_as_of(paths: RunPaths) -> str | None:
    """as_of (ISO 'Z') of the newest run published to the stable paths, from latest.json."""
    latest = fileio.read_json(paths.latest_json, default=None)
    value = latest.get("as_of") if isinstance(latest, dict) else None
    return iso(to_utc(value)) if value else None


def is_newest_run(paths: RunPaths) -> bool:
    """True unless a run with a later as_of has been published: only then may this run publish
    its files to the stable paths, or write to the POS (a backfill must not override today)."""
    newest = newest_published_as_of(paths)
    return newest is None or iso(paths.as_of) >= newest
