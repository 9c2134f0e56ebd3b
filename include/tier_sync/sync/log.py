"""The sync log: every batch's result collected (files first, XCom second) into one `SyncLog`.

A batch that never finished, or whose last attempt failed, is reported per customer as an error.
Only the latest run replaces the data dir's stable ``tier_sync_log.json``; that rule is the run
ledger's (`ledger.write_latest`), not this module's.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio, ledger
from include.tier_sync.runtime import iso, to_utc
from include.tier_sync.sync.batches import read_plan_doc, result_path
from include.tier_sync.sync.contracts import (
    FORMAT_VERSION,
    ApiCounts,
    BatchResult,
    ErrorDetail,
    GroupCheck,
    PlanDoc,
    batch_result_from_json,
    format_version_of,
    sum_api,
)
from include.tier_sync.sync.write import new_result

if TYPE_CHECKING:
    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.sync.contracts import SyncLog

log = logging.getLogger(__name__)

# Plan counts the log copies from the plan summary (0 when absent).
PLAN_COUNTS = (
    "total_customers",
    "managed",
    "planned_moves",
    "protected",
    "deleted",
    "no_tier",
    "missing",
    "unchanged",
    "deferred_by_limit",
)


class SyncFailed(RuntimeError):
    """Some customers could not be synced; raised after the sync log is written."""


# -- collecting results ------------------------------------------------------------------------


def _failed_result(ref: str, found: Mapping[str, Any] | None) -> BatchResult:
    """A batch with no result, or whose last attempt failed: each of its customers is an error."""
    raw = fileio.read_json(ref)
    batch: Mapping[str, Any] = raw if isinstance(raw, dict) and raw else {"moves": []}
    format_version_of(batch, ref)
    reason = (found or {}).get("error") or "batch did not finish"
    failed = new_result(ref, batch)
    failed["status"] = "failed"
    failed["error"] = reason
    failed["api"] = sum_api((found or {}).get("api"))
    failed["error_details"] = [
        {"customer_id": m["customer_id"], "error": f"batch failed: {reason}"} for m in batch.get("moves", [])
    ]
    failed["errors"] = len(failed["error_details"])
    return failed


def _result_for(ref: str, plan_id: str | None, from_xcom: Mapping[str, Mapping[str, Any]]) -> BatchResult:
    """The batch's result file of this plan, else its XCom, else a failed result."""
    found = fileio.read_json(result_path(ref))
    if not (isinstance(found, dict) and found.get("plan_id") == plan_id):
        found = from_xcom.get(ref)
    if found is not None and found.get("status", "done") == "done":
        return batch_result_from_json(found, ref)
    return _failed_result(ref, found)


def load_batch_results(
    paths: RunPaths, xcom_results: Iterable[Mapping[str, Any] | None] = ()
) -> tuple[PlanDoc | None, list[BatchResult]]:
    """The current plan.json and one result per dispatched batch, from files first, XCom second.

    A batch with no result, or whose last attempt failed, is turned into a result that reports
    each of its customers as an error (its writes may be partial; the next run re-plans them).
    """
    doc = read_plan_doc(paths)
    if doc is None:
        return None, [batch_result_from_json(r, "XCom") for r in xcom_results if r]
    plan_id = doc.get("plan_id")
    from_xcom = {
        str(r.get("ref")): dict(r) for r in xcom_results if r and r.get("plan_id") in (None, plan_id)
    }
    if not doc.get("dispatched", True):
        return doc, []
    return doc, [_result_for(str(ref["ref"]), plan_id, from_xcom) for ref in doc.get("refs") or []]


def left_alone_ids(paths: RunPaths) -> list[str]:
    """Customers the batches left alone, found deleted, or failed on (out of the group-count check)."""
    _, results = load_batch_results(paths)
    out = [c for r in results for c in r["changed_in_pos_ids"]]
    out += [c for r in results for c in r["deleted_ids"]]
    out += [str(d.get("customer_id")) for r in results for d in r["error_details"]]
    return sorted(set(out))


# -- building the log --------------------------------------------------------------------------


@dataclass
class _Outcome:
    """Every batch's result added up."""

    updated: int = 0
    size: int = 0
    written: bool = False
    failed_batches: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    applied: Counter[str] = field(default_factory=Counter)
    changed: list[str] = field(default_factory=list)
    errors: list[ErrorDetail] = field(default_factory=list)


def _add_up(results: Sequence[BatchResult]) -> _Outcome:
    out = _Outcome()
    for r in results:
        out.updated += r["updated"]
        out.size += r["size"]
        out.written = out.written or r["written"]
        out.failed_batches += int(r["status"] == "failed")
        out.skip_reasons.update(r["skip_reasons"])
        out.applied.update(r["moves_applied"])
        out.changed += r["changed_in_pos_ids"]
        out.errors += r["error_details"]
    return out


def _iso_or_none(value: Any) -> str | None:
    """Datetimes (and ISO strings) as ISO-8601 UTC 'Z'; None stays None."""
    return None if value is None else iso(to_utc(value))


def _plan_counts(summary: Mapping[str, Any]) -> dict[str, int]:
    return {key: int(summary.get(key) or 0) for key in PLAN_COUNTS}


def build_sync_log(
    identity: Mapping[str, Any],
    plan_summary: Mapping[str, Any] | None,
    batch_results: Sequence[Mapping[str, Any]],
    api_totals: Mapping[str, Any] | None,
    group_check: Mapping[str, Any] | None,
    *,
    dry_run: bool,
    synced: bool,
    skipped_reason: str | None,
    started_at: datetime | str | None,
    approval: Mapping[str, Any] | None = None,
) -> SyncLog:
    """The sync log: run identity, plan counts, aggregated batch outcomes, API use, group check.

    ``approval`` is plan.json's approval record (the request, and the decision: who, when, which
    option, the comment), copied as is; ``left_out_by_approval`` comes from the plan summary.

    ``synced`` is forced to False when no batch wrote (dry run, superseded run, breaker). Only
    customer ids appear, never names, emails or tokens. ``api`` adds the plan step's
    ``api_totals``, every batch's and the group check's.
    """
    summary = dict(plan_summary or {})
    counts = _plan_counts(summary)
    results = [batch_result_from_json(r, str(r.get("ref"))) for r in batch_results]
    outcome = _add_up(results)
    # Planned moves that no batch was dispatched for (dry run, superseded run, breaker) are skipped.
    not_dispatched = max(0, counts["planned_moves"] - outcome.size)
    if not_dispatched:
        outcome.skip_reasons["not_written"] += not_dispatched
    log_doc: SyncLog = {
        "format_version": FORMAT_VERSION,
        "dag_id": identity.get("dag_id"),
        "run_id": identity.get("run_id"),
        "run_type": identity.get("run_type"),
        "logical_date": _iso_or_none(identity.get("logical_date")),
        "as_of": _iso_or_none(identity.get("as_of")),
        "started_at": _iso_or_none(started_at),
        "finished_at": iso(datetime.now(UTC)),
        "dry_run": bool(dry_run),
        "synced": bool(synced) and (outcome.written or not counts["planned_moves"]),
        "skipped_reason": skipped_reason,
        "total_customers": counts["total_customers"],
        "managed": counts["managed"],
        "planned_moves": counts["planned_moves"],
        "updated": outcome.updated,
        "skipped": sum(outcome.skip_reasons.values()),
        "skip_reasons": dict(sorted(outcome.skip_reasons.items())),
        "protected": counts["protected"],
        "deleted": counts["deleted"],
        "no_tier": counts["no_tier"],
        "missing": counts["missing"],
        "unchanged": counts["unchanged"],
        "deferred_by_limit": counts["deferred_by_limit"],
        "force_resync": bool(summary.get("force_resync")),
        "limit": summary.get("limit"),
        "changed_in_pos": len(outcome.changed),
        "changed_in_pos_ids": sorted(outcome.changed),
        "errors": len(outcome.errors),
        "failed_batches": outcome.failed_batches,
        "batches": len(results),
        "tier_breakdown": dict(summary.get("tier_breakdown") or {}),
        "moves": dict(summary.get("moves") or {}),
        "moves_applied": dict(sorted(outcome.applied.items())),
        "error_details": sorted(outcome.errors, key=lambda d: str(d.get("customer_id"))),
        "api": _log_api(api_totals, results, group_check),
    }
    if "circuit_breaker" in summary:
        log_doc["circuit_breaker"] = summary["circuit_breaker"]
    if "left_out_by_approval" in summary:
        log_doc["left_out_by_approval"] = dict(summary["left_out_by_approval"])
    if approval is not None:
        log_doc["approval"] = dict(approval)
    if group_check is not None:
        log_doc["group_counts_match"] = group_check.get("group_counts_match")
        log_doc["group_counts"] = group_check.get("group_counts")
    return log_doc


def _log_api(
    api_totals: Mapping[str, Any] | None,
    results: Sequence[BatchResult],
    group_check: Mapping[str, Any] | None,
) -> ApiCounts:
    return sum_api(api_totals, *(r["api"] for r in results), (group_check or {}).get("api"))


# -- writing the log ---------------------------------------------------------------------------


def write_sync_log(log_doc: Mapping[str, Any], paths: RunPaths) -> dict[str, str]:
    """Write the log into the run folder, and as the data dir's latest log if this run is the latest.

    "Latest" is the run ledger's rule (`ledger.write_latest`): no published run has a later as_of,
    and the current latest log is not of a later as_of, so a back-filled run never hides today's log.
    """
    fileio.write_json(paths.run_sync_log, dict(log_doc))
    written = {"run": paths.run_sync_log}
    latest = ledger.write_latest(
        paths,
        paths.sync_log,
        dict(log_doc),
        as_of_of=lambda doc: doc.get("as_of") if isinstance(doc, dict) else None,
    )
    if latest:
        written["latest"] = paths.sync_log
    return written


def raise_for_sync_errors(log_doc: Mapping[str, Any]) -> None:
    """Fail the run (after the log is written) when any customer could not be synced."""
    if int(log_doc.get("errors") or 0) > 0:
        sample = ", ".join(str(d.get("customer_id")) for d in list(log_doc.get("error_details") or [])[:5])
        raise SyncFailed(
            f"{log_doc['errors']} customers could not be synced "
            f"({log_doc.get('failed_batches', 0)} failed batches); e.g. {sample}. "
            f"See {ledger.SYNC_LOG_FILE}."
        )


@dataclass(frozen=True)
class _FromPlan:
    """What the log takes from plan.json (or says when there is none)."""

    summary: Mapping[str, Any]
    synced: bool
    reason: str | None
    started: str | None
    api: Mapping[str, Any] | None
    dry_run: bool
    approval: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, doc: PlanDoc | None, *, no_plan_reason: str | None, dry_run: bool) -> _FromPlan:
        if doc is None:
            reason = no_plan_reason or "no sync plan: plan_sync did not complete"
            return cls(summary={}, synced=False, reason=reason, started=None, api=None, dry_run=dry_run)
        return cls(
            summary=dict(doc.get("summary") or {}),
            synced=bool(doc.get("writes_allowed")) and bool(doc.get("dispatched", True)),
            reason=doc.get("skipped_reason"),
            started=doc.get("started_at"),
            api=doc.get("api"),
            dry_run=dry_run or bool(doc.get("dry_run")),
            approval=doc.get("approval"),
        )


def finish_sync(
    paths: RunPaths,
    identity: Mapping[str, Any],
    *,
    xcom_results: Iterable[Mapping[str, Any] | None] = (),
    group_check: GroupCheck | Mapping[str, Any] | None = None,
    dry_run: bool = False,
    no_plan_reason: str | None = None,
    progress: Mapping[str, Any] | None = None,
) -> SyncLog:
    """The write_sync_log task: aggregate plan.json + every batch result, write the log, return it.

    ``progress`` is the till-progress section (`progress.finish_progress`), logged as is; its
    requests are added to ``api``.

    Works when nothing was planned, when batches failed or left no XCom, and when plan_sync never
    finished (then the log says so). Does not raise for sync errors: call
    ``raise_for_sync_errors`` afterwards so the log is always written first.
    """
    doc, results = load_batch_results(paths, xcom_results)
    plan = _FromPlan.of(doc, no_plan_reason=no_plan_reason, dry_run=dry_run)
    log_doc = build_sync_log(
        identity,
        plan.summary,
        results,
        plan.api,
        group_check,
        dry_run=plan.dry_run,
        synced=plan.synced,
        skipped_reason=plan.reason,
        started_at=plan.started,
        approval=plan.approval,
    )
    if progress is not None:
        log_doc["progress"] = dict(progress)
        log_doc["api"] = sum_api(log_doc["api"], progress.get("api"))
    write_sync_log(log_doc, paths)
    log.info(
        "Sync log: synced=%s planned=%s updated=%s skipped=%s changed_in_pos=%s errors=%s requests=%s",
        log_doc["synced"],
        log_doc["planned_moves"],
        log_doc["updated"],
        log_doc["skipped"],
        log_doc["changed_in_pos"],
        log_doc["errors"],
        log_doc["api"]["requests"],
    )
    return log_doc
