"""The run ledger: the data dir's layout and the rules of "latest", "baseline" and "published".

Every path under the data dir is defined here (`RunPaths`, the file-name constants), and so is
every rule that compares runs:

- **Future dates.** A run whose `as_of` lies later than now (plus `CLOCK_SKEW`) is refused before
  it reads or writes anything (`refuse_future`). A future date met in the data dir (a run folder,
  `latest.json`, a stable file's `as_of`) is never obeyed: it is ignored with a loud warning.
- **Published.** A run is published once its validated master has been recorded by `publish`:
  `runs/<key>/published.json` plus a copy of that master under `runs/<key>/published/`. The copy
  survives a later re-run of the same day, which rewrites the run folder's own master.
- **Baseline.** What the data-quality gate compares a run with: the newest published run up to
  this one, *a published run of the same as_of included* (a re-run is compared with what was
  published for its day). **Previous run** (the master's Previous Tier) is the newest published
  run strictly before this one.
- **Latest.** A run is the latest when no published run has a later as_of; only the latest run
  replaces the stable copies (master, changes, `latest.json`, the latest validation report and
  sync log), commits a new master to git, or writes to the POS.
- **One writer at a time.** `publishing()` serializes every write of the stable copies and the
  tier history: an exclusive lock file on a local data dir, a leased lock object on S3
  (`object_lock`); the DAG also runs `publish_run` one instance at a time
  (`max_active_tis_per_dag=1`), which is the only guard on gs / az.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from include.tier_sync import fileio
from include.tier_sync.fileio import join
from include.tier_sync.runtime import iso, to_utc

log = logging.getLogger(__name__)

RUN_KEY_FORMAT = "%Y%m%dT%H%M%SZ"
# How far ahead of this machine's clock a date may be before it counts as "in the future"
# (clock skew between workers, the scheduler and the POS).
CLOCK_SKEW = timedelta(minutes=10)

# -- the data dir's file names (the only place they are spelled) -------------------------------
STORE_DIR = "store"
MASTER_FILE = "customer_analytics_master.csv"
HISTORY_FILE = "tier_history.csv"
SYNC_HISTORY_FILE = "sync_history.csv"  # the counts of pruned runs (retention.py)
CHANGES_FILE = "tier_changes.csv"
SYNC_LOG_FILE = "tier_sync_log.json"
LATEST_FILE = "latest.json"
VALIDATION_DIR = "validation"
DATA_DOCS_DIR = "data_docs"
GIT_DIR = "git"
RUNS_DIR = "runs"
# inside runs/<key>/
RUN_FILE = "run.json"
VALIDATION_FILE = "validation.json"
SYNC_PLAN_DIR = "sync_plan"
GROUP_CHECK_FILE = "group_check.json"
LIVE_CUSTOMERS_FILE = "live_customers.json.gz"  # sync/live.py: each customer's live group at a cursor
PUBLISHED_FILE = "published.json"
PUBLISHED_DIR = "published"
PUBLISH_LOCK_FILE = ".publish.lock"


class FutureRunError(ValueError):
    """A run asked to compute a day that has not happened yet."""


def run_key(as_of: datetime) -> str:
    return to_utc(as_of).strftime(RUN_KEY_FORMAT)


def is_run_key(name: str) -> bool:
    """A run folder name (YYYYMMDDTHHMMSSZ); anything else under runs/ is ignored."""
    try:
        datetime.strptime(name, RUN_KEY_FORMAT)
    except ValueError:
        return False
    return True


def key_as_of(key: str) -> datetime:
    return datetime.strptime(key, RUN_KEY_FORMAT).replace(tzinfo=UTC)


def _now(now: datetime | None) -> datetime:
    return to_utc(now) if now is not None else to_utc(datetime.now(tz=UTC))


def is_future(as_of: datetime, now: datetime | None = None) -> bool:
    return to_utc(as_of) > _now(now) + CLOCK_SKEW


def refuse_future(as_of: datetime, now: datetime | None = None) -> None:
    """Raise FutureRunError when `as_of` lies in the future: such a run must read and write nothing."""
    current = _now(now)
    if is_future(as_of, current):
        raise FutureRunError(
            f"Refusing a run as of {iso(as_of)}: that is later than now ({iso(current)}), a day that has "
            "not happened yet. Check the logical date of the run (a typo in a year?) and trigger it "
            "again with a date in the past; nothing was read or written."
        )


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
        return self._p(STORE_DIR)

    @property
    def master_csv(self) -> str:
        return self._p(MASTER_FILE)

    @property
    def tier_history(self) -> str:
        return self._p(HISTORY_FILE)

    @property
    def sync_history(self) -> str:
        return self._p(SYNC_HISTORY_FILE)

    @property
    def tier_changes(self) -> str:
        return self._p(CHANGES_FILE)

    @property
    def sync_log(self) -> str:
        return self._p(SYNC_LOG_FILE)

    @property
    def latest_json(self) -> str:
        return self._p(LATEST_FILE)

    @property
    def validation_dir(self) -> str:
        return self._p(VALIDATION_DIR)

    @property
    def latest_validation_json(self) -> str:
        return self._p(VALIDATION_DIR, LATEST_FILE)

    @property
    def data_docs_dir(self) -> str:
        return self._p(VALIDATION_DIR, DATA_DOCS_DIR)

    @property
    def git_dir(self) -> str:
        return self._p(GIT_DIR)

    @property
    def runs_dir(self) -> str:
        return self._p(RUNS_DIR)

    @property
    def publish_lock(self) -> str:
        return self._p(PUBLISH_LOCK_FILE)

    # Per-run artifacts.
    @property
    def run_dir(self) -> str:
        return self.run_dir_for_key(self.key)

    @property
    def run_json(self) -> str:
        return join(self.run_dir, RUN_FILE)

    @property
    def run_master_csv(self) -> str:
        return join(self.run_dir, MASTER_FILE)

    @property
    def run_tier_changes(self) -> str:
        return join(self.run_dir, CHANGES_FILE)

    @property
    def run_validation_json(self) -> str:
        return join(self.run_dir, VALIDATION_FILE)

    @property
    def run_sync_plan_dir(self) -> str:
        return join(self.run_dir, SYNC_PLAN_DIR)

    @property
    def run_sync_log(self) -> str:
        return join(self.run_dir, SYNC_LOG_FILE)

    @property
    def run_group_check(self) -> str:
        return join(self.run_dir, GROUP_CHECK_FILE)

    @property
    def run_live_customers(self) -> str:
        return join(self.run_dir, LIVE_CUSTOMERS_FILE)

    def run_dir_for(self, as_of: datetime) -> str:
        return self.run_dir_for_key(run_key(as_of))

    def run_dir_for_key(self, key: str) -> str:
        return run_dir(self.data_dir, key)

    def published_json_for(self, key: str) -> str:
        return join(self.run_dir_for_key(key), PUBLISHED_FILE)

    def published_master_for(self, key: str) -> str:
        return join(self.run_dir_for_key(key), PUBLISHED_DIR, MASTER_FILE)


# -- listing runs ------------------------------------------------------------------------------


def run_dir(data_dir: str, key: str) -> str:
    """`<data_dir>/runs/<key>`."""
    return join(data_dir, RUNS_DIR, key)


def list_run_keys(data_dir: str, now: datetime | None = None) -> list[str]:
    """Every run folder's key, oldest first; a folder dated in the future is ignored, loudly."""
    current = _now(now)
    keys = []
    for name in fileio.listdir(join(data_dir, RUNS_DIR)):
        if not is_run_key(name):
            continue
        if is_future(key_as_of(name), current):
            log.warning(
                "Ignoring run folder %s: it is dated in the future (now %s); it is never a baseline or "
                "the latest run. Remove it (README: recovering from a future date).",
                run_dir(data_dir, name),
                iso(current),
            )
            continue
        keys.append(name)
    return sorted(keys)


def run_keys(paths: RunPaths, now: datetime | None = None) -> list[str]:
    """`list_run_keys` of this run's data dir."""
    return list_run_keys(paths.data_dir, now)


def run_passed_validation(run_dir: str) -> bool:
    """Whether a run folder's validation report says it passed (no report: it did not)."""
    report = fileio.read_json(join(run_dir, VALIDATION_FILE), default=None)
    return isinstance(report, dict) and bool((report.get("summary") or {}).get("success"))


def published_master(paths: RunPaths, key: str) -> str | None:
    """The master CSV a run published, or None when that run published nothing.

    A run folder from before the ledger kept published copies (validated, no published.json)
    counts as published with its own master.
    """
    if fileio.exists(paths.published_json_for(key)):
        copy = paths.published_master_for(key)
        return copy if fileio.exists(copy) else None
    legacy = join(paths.run_dir_for_key(key), MASTER_FILE)
    if run_passed_validation(paths.run_dir_for_key(key)) and fileio.exists(legacy):
        return legacy
    return None


def published_runs(paths: RunPaths, *, include_same: bool, now: datetime | None = None) -> list[tuple[str, str]]:
    """(key, published master) of published runs up to this one, newest first."""
    out = []
    for key in reversed(run_keys(paths, now)):
        if key > paths.key or (key == paths.key and not include_same):
            continue
        master = published_master(paths, key)
        if master is not None:
            out.append((key, master))
    return out


def baseline(paths: RunPaths, now: datetime | None = None) -> tuple[str, str] | None:
    """(key, master) the gate compares this run with: the newest published run up to this one,
    a published run of the same as_of included; None on the very first run."""
    found = published_runs(paths, include_same=True, now=now)
    return found[0] if found else None


def previous_run(paths: RunPaths, now: datetime | None = None) -> tuple[str, str] | None:
    """(key, master) of the newest published run strictly before this one (Previous Tier)."""
    found = published_runs(paths, include_same=False, now=now)
    return found[0] if found else None


# -- latest ------------------------------------------------------------------------------------


def _trusted_as_of(value: Any, where: str, now: datetime) -> str | None:
    """An `as_of` read from a file, or None when it is missing, unreadable or in the future."""
    if not value:
        return None
    try:
        parsed = to_utc(value)
    except (TypeError, ValueError):
        log.warning("Ignoring %s: its as_of %r is not a date", where, value)
        return None
    if is_future(parsed, now):
        log.warning(
            "Ignoring %s: its as_of %s lies in the future (now %s), so it cannot be the latest run. "
            "Remove or fix it (README: recovering from a future date).",
            where,
            iso(parsed),
            iso(now),
        )
        return None
    return iso(parsed)


def newest_published_as_of(paths: RunPaths, now: datetime | None = None) -> str | None:
    """as_of (ISO 'Z') of the newest published run: latest.json, unless it is not to be trusted,
    then the newest run folder holding a published master."""
    current = _now(now)
    latest = fileio.read_json(paths.latest_json, default=None)
    value = latest.get("as_of") if isinstance(latest, dict) else None
    trusted = _trusted_as_of(value, paths.latest_json, current)
    if trusted is not None:
        return trusted
    for key in reversed(run_keys(paths, current)):
        if published_master(paths, key) is not None:
            return iso(key_as_of(key))
    return None


def is_newest_run(paths: RunPaths, now: datetime | None = None) -> bool:
    """True unless a run with a later as_of has been published: only then may this run replace the
    stable copies, commit a new master, or write to the POS (a backfill must not override today)."""
    newest = newest_published_as_of(paths, now)
    return newest is None or iso(paths.as_of) >= newest


def may_replace_latest(paths: RunPaths, current_as_of: Any, where: str, now: datetime | None = None) -> bool:
    """Whether this run may overwrite a stable "latest" file whose content is dated `current_as_of`."""
    instant = _now(now)
    if not is_newest_run(paths, instant):
        return False
    current = _trusted_as_of(current_as_of, where, instant)
    return current is None or iso(paths.as_of) >= current


def write_latest(
    paths: RunPaths, url: str, doc: Mapping[str, Any], as_of_of: Callable[[Any], Any], now: datetime | None = None
) -> bool:
    """Write `doc` to the stable file `url` when this run is the latest; returns whether it did.

    `as_of_of` reads the as_of out of the file's current content (None when absent). Serialized
    with every other publishing write.
    """
    with publishing(paths):
        current = fileio.read_json(url, default=None)
        if not may_replace_latest(paths, as_of_of(current) if current is not None else None, url, now):
            return False
        fileio.write_json(url, doc)
        return True


# -- publishing --------------------------------------------------------------------------------


@contextlib.contextmanager
def publishing(paths: RunPaths) -> Iterator[None]:
    """Hold the data dir's publish lock (re-entrant within one process)."""
    held: set[str] = _HELD.__dict__.setdefault("dirs", set())
    if paths.data_dir in held:
        yield
        return
    held.add(paths.data_dir)
    try:
        with _publish_lock(paths.publish_lock):
            yield
    finally:
        held.discard(paths.data_dir)


def _publish_lock(url: str) -> contextlib.AbstractContextManager[None]:
    """An flock on a local data dir; on S3 a leased lock object of conditional writes (two hosts,
    `airflow dags test` and the erasure tool included); on gs / az / memory:// none, and the DAG's
    one-at-a-time publish_run task is the only guard."""
    if fileio.has_conditional_write(url):
        from include.tier_sync.object_lock import s3_lock

        return s3_lock(url)
    return fileio.exclusive_lock(url)


_HELD = threading.local()  # data dirs whose lock this thread holds (publishing() is re-entrant)


def record_published(paths: RunPaths, identity: Mapping[str, Any], breakdown: Mapping[str, int]) -> None:
    """Keep this run's validated master as what the run published (call inside `publishing`)."""
    fileio.copy(paths.run_master_csv, paths.published_master_for(paths.key))
    fileio.write_json(
        paths.published_json_for(paths.key),
        {
            "as_of": iso(paths.as_of),
            "run_id": identity.get("run_id"),
            "published_at": iso(datetime.now(tz=UTC)),
            "tier_breakdown": dict(breakdown),
        },
    )
