"""Retention: run folders older than `tier_sync_retention_days` are pruned by the pipeline itself.

Each `runs/<key>/` keeps a full master with names, emails and phones, so it must not live forever.
The `prune_runs` task (after `write_sync_log`) removes the folders whose run is older than the
setting, counted back from **this run's as_of** (never from file times or this machine's clock, so
a re-run or a back-fill prunes exactly the same way, and tests control every date):

- never the current run's folder, nor the one the ledger's "latest" rule points to (a re-run of
  that day is compared with what it published), nor anything but run folders under `runs/`
  (`ledger.list_run_keys`: other names and folders dated in the future are not run folders);
- never a folder without a sync log (a run still in progress, e.g. a concurrent back-fill of an
  old day, or one that never finished): it is reported as kept, with the reason;
- never a folder whose `run.json` names another as_of than its key: that is not a run folder the
  ledger wrote, so it is left for a person;
- before anything is deleted, the run's day is in `tier_history.csv` (restored from what the run
  published when it is missing) and its counts are in `sync_history.csv` at the data dir root: tier
  moves (`upgrades`, `downgrades`, `new`, `other`, `transitions`), the sync log's counts (`updated`,
  `errors`, `protected`, ...), and whether it validated. Those aggregates are what the page's
  history and moves views need once the folder is gone; they hold no customer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from include.tier_sync import fileio, ledger, spreadsheet
from include.tier_sync.dashboard_runs import classify_move
from include.tier_sync.ledger import (
    CHANGES_FILE,
    PUBLISHED_FILE,
    RUN_FILE,
    SYNC_HISTORY_FILE,
    SYNC_LOG_FILE,
    RunPaths,
)
from include.tier_sync.rules import ALL_TIERS
from include.tier_sync.runtime import iso, to_utc
from include.tier_sync.sync.log import PLAN_COUNTS

log = logging.getLogger(__name__)

MOVE_KINDS = ("upgrades", "downgrades", "new", "other")
SYNC_COUNTS = ("updated", "skipped", "changed_in_pos", "errors", "failed_batches", "batches")
SYNC_HISTORY_COLUMNS: tuple[str, ...] = (
    "key",
    "as_of",
    "run_id",
    "validation_passed",
    "published",
    "synced",
    "dry_run",
    *MOVE_KINDS,
    "changes",
    "transitions",
    *PLAN_COUNTS,
    *SYNC_COUNTS,
    "group_counts_match",
)
_NUMERIC = (*MOVE_KINDS, "changes", *PLAN_COUNTS, *SYNC_COUNTS)


# -- the decision (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneDecision:
    """Which run folders go, and why each old one that stays is kept."""

    cutoff: datetime
    prune: list[str] = field(default_factory=list)
    kept_old: dict[str, str] = field(default_factory=dict)


def decide_prune(
    keys: Iterable[str],
    *,
    reference: datetime,
    retention_days: int,
    protected: Mapping[str, str],
    finished: Iterable[str],
    manifest_as_of: Mapping[str, str | None],
) -> PruneDecision:
    """Run keys older than `reference - retention_days`, minus the protected and unsafe ones.

    `protected` maps key -> why it must stay (current run, latest run); `finished` are the keys
    whose folder holds a sync log; `manifest_as_of` is each folder's run.json as_of (None: none).
    """
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1, got {retention_days}")
    cutoff = to_utc(reference) - timedelta(days=retention_days)
    done = set(finished)
    decision = PruneDecision(cutoff=cutoff)
    for key in sorted(keys):
        as_of = ledger.key_as_of(key)
        if as_of >= cutoff:
            continue
        recorded = manifest_as_of.get(key)
        if key in protected:
            decision.kept_old[key] = protected[key]
        elif recorded is not None and _key_of(recorded) != key:
            decision.kept_old[key] = f"run.json names as_of {recorded}, not the folder's {iso(as_of)}"
        elif key not in done:
            decision.kept_old[key] = "no sync log: the run is in progress or never finished"
        else:
            decision.prune.append(key)
    return decision


def _key_of(as_of: str) -> str | None:
    try:
        return ledger.run_key(to_utc(as_of))
    except (TypeError, ValueError):
        return None


def summary_row(
    key: str,
    *,
    run: Mapping[str, Any] | None,
    sync_log: Mapping[str, Any] | None,
    changes: Sequence[tuple[str, str]],
    validation_passed: bool,
    published: bool,
) -> dict[str, str]:
    """The run's aggregates as one sync_history row (every cell text; "" when unknown)."""
    kinds = dict.fromkeys(MOVE_KINDS, 0)
    transitions: dict[str, int] = {}
    for old, new in changes:
        kind = classify_move(old, new)
        kinds["upgrades" if kind == "upgrade" else "downgrades" if kind == "downgrade" else kind] += 1
        name = f"{old or '(new)'} -> {new}"
        transitions[name] = transitions.get(name, 0) + 1
    sync = dict(sync_log or {})
    run_id = (run or {}).get("run_id") or sync.get("run_id") or ""
    row = {
        "key": key,
        "as_of": iso(ledger.key_as_of(key)),
        "run_id": str(run_id),
        "validation_passed": _flag(validation_passed),
        "published": _flag(published),
        "synced": _flag(sync.get("synced")) if sync else "",
        "dry_run": _flag(sync.get("dry_run")) if sync else "",
        **{k: str(v) for k, v in kinds.items()},
        "changes": str(len(changes)),
        "transitions": json.dumps(dict(sorted(transitions.items())), sort_keys=True),
    }
    for name in (*PLAN_COUNTS, *SYNC_COUNTS):
        row[name] = str(int(sync.get(name) or 0)) if sync else ""
    match = sync.get("group_counts_match")
    row["group_counts_match"] = "" if match is None else _flag(match)
    return row


def _flag(value: Any) -> str:
    return "true" if bool(value) else "false"


# -- the task body -------------------------------------------------------------------------------


def prune_runs(paths: RunPaths, retention_days: int, *, now: datetime | None = None) -> dict[str, Any]:
    """Prune run folders older than `retention_days` before this run's as_of; returns the report.

    `now` only decides which folders are dated in the future (the ledger's rule; default: the
    clock). Serialized with publishing (the tier history and sync_history are read-modify-written).
    """
    with ledger.publishing(paths):
        keys = ledger.run_keys(paths, now)
        newest = ledger.newest_published_as_of(paths, now)
        protected = {paths.key: "the current run"}
        if newest is not None:
            protected.setdefault(ledger.run_key(to_utc(newest)), "the latest published run")
        manifests = {k: _read_json(fileio.join(paths.run_dir_for_key(k), RUN_FILE)) for k in keys}
        # A folder already summarised is one whose removal was cut short (object storage): finish it.
        summarised = {row["key"] for row in read_sync_history(paths.data_dir)}
        decision = decide_prune(
            keys,
            reference=paths.as_of,
            retention_days=retention_days,
            protected=protected,
            finished=[
                k
                for k in keys
                if k in summarised or fileio.exists(fileio.join(paths.run_dir_for_key(k), SYNC_LOG_FILE))
            ],
            manifest_as_of={k: (m or {}).get("as_of") for k, m in manifests.items()},
        )
        restored = _ensure_in_tier_history(paths, decision.prune)
        rows = [_summarise(paths, key, manifests.get(key)) for key in decision.prune if key not in summarised]
        if rows:
            _upsert_sync_history(paths.sync_history, rows)
        for key in decision.prune:
            fileio.remove_tree(paths.run_dir_for_key(key))
            log.info("Pruned run folder %s (older than %d days)", paths.run_dir_for_key(key), retention_days)
    for key, why in decision.kept_old.items():
        log.info("Kept run folder %s although it is older than %d days: %s", key, retention_days, why)
    report = {
        "retention_days": retention_days,
        "reference_as_of": iso(paths.as_of),
        "cutoff": iso(decision.cutoff),
        "pruned": decision.prune,
        "kept_old": decision.kept_old,
        "kept": len(keys) - len(decision.prune),
        "tier_history_restored": restored,
        "sync_history": paths.sync_history if rows else None,
    }
    log.info(
        "prune_runs: %d run folder(s) older than %s pruned (%s), %d kept (%d old ones kept: %s)",
        len(decision.prune),
        iso(decision.cutoff),
        ", ".join(decision.prune) or "none",
        report["kept"],
        len(decision.kept_old),
        ", ".join(decision.kept_old) or "none",
    )
    return report


def _read_json(url: str) -> dict[str, Any] | None:
    doc = fileio.read_json(url, default=None)
    return doc if isinstance(doc, dict) else None


def _summarise(paths: RunPaths, key: str, run: Mapping[str, Any] | None) -> dict[str, str]:
    folder = paths.run_dir_for_key(key)
    changes_url = fileio.join(folder, CHANGES_FILE)
    changes: list[tuple[str, str]] = []
    if fileio.exists(changes_url):
        frame = spreadsheet.read_raw_csv(fileio.read_bytes(changes_url), usecols=["From", "To"])
        changes = list(zip(frame["From"], frame["To"], strict=True))
    return summary_row(
        key,
        run=run,
        sync_log=_read_json(fileio.join(folder, SYNC_LOG_FILE)),
        changes=changes,
        validation_passed=ledger.run_passed_validation(folder),
        published=ledger.published_master(paths, key) is not None,
    )


def _ensure_in_tier_history(paths: RunPaths, keys: Sequence[str]) -> list[str]:
    """Put every published run of `keys` into tier_history.csv when its day is missing there
    (from published.json's breakdown, else counted off its published master); returns those keys."""
    from include.tier_sync.master_csv import read_csv_str, tier_breakdown, upsert_tier_history

    present: set[str] = set()
    if fileio.exists(paths.tier_history):
        present = set(read_csv_str(paths.tier_history, usecols=["as_of"])["as_of"])
    restored = []
    for key in keys:
        master = ledger.published_master(paths, key)
        as_of = ledger.key_as_of(key)
        if master is None or iso(as_of) in present:
            continue
        doc = _read_json(fileio.join(paths.run_dir_for_key(key), PUBLISHED_FILE)) or {}
        found = doc.get("tier_breakdown") or tier_breakdown(read_csv_str(master, usecols=["Tier"]))
        breakdown = {tier: int(found.get(tier, 0)) for tier in ALL_TIERS}  # the history's tier order
        upsert_tier_history(paths.tier_history, as_of, str(doc.get("run_id") or ""), breakdown)
        restored.append(key)
        log.warning("tier_history.csv lacked the published run %s; restored it before pruning", key)
    return restored


def _upsert_sync_history(url: str, rows: Sequence[Mapping[str, str]]) -> None:
    """Add rows to sync_history.csv (a key already there is replaced), sorted by key; spreadsheet-safe."""
    import pandas as pd

    new = pd.DataFrame(list(rows), columns=list(SYNC_HISTORY_COLUMNS))
    if fileio.exists(url):
        old = spreadsheet.read_raw_csv(fileio.read_bytes(url))
        old = old.loc[~old["key"].isin(new["key"])].reindex(columns=list(SYNC_HISTORY_COLUMNS), fill_value="")
        new = pd.concat([old, new], ignore_index=True)
    new = new.sort_values("key", kind="stable", ignore_index=True).astype(object)
    fileio.write_bytes(url, spreadsheet.to_safe_csv_bytes(new, numeric_columns=_NUMERIC))


def read_sync_history(data_dir: str) -> list[dict[str, str]]:
    """The kept rows of pruned runs, oldest first ([] when none was pruned yet)."""
    url = fileio.join(data_dir, SYNC_HISTORY_FILE)
    if not fileio.exists(url):
        return []
    return [dict(r) for r in spreadsheet.read_raw_csv(fileio.read_bytes(url)).to_dict("records")]
