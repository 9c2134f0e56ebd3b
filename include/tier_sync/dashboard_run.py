"""The "Tier sync" tab of one DAG run in the Airflow UI: what that run planned, moved, synced,
validated and who approved it, read from the run's own folder (`runs/<key>/`, ledger.py).

A run is found by its run id in the folders' run.json / sync log, else through its `as_of` (the
api-server reads it off Airflow's DagRun: runtime.resolve_as_of's rule), else among the pruned
runs' rows of sync_history.csv. Every section says what it is when its file is missing (the run
did not reach the step, or retention removed the folder): never an empty box, never a made-up 0.
Pure functions over a data dir, no Airflow imports at module level (the plugin imports this).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from include.tier_sync import fileio, ledger
from include.tier_sync.dashboard import check_note
from include.tier_sync.dashboard_cache import read_json, run_keys
from include.tier_sync.dashboard_runs import changes_frame, classify_move
from include.tier_sync.ledger import CHANGES_FILE, RUN_FILE, SYNC_LOG_FILE, SYNC_PLAN_DIR, VALIDATION_FILE
from include.tier_sync.rules import ALL_TIERS
from include.tier_sync.runtime import iso
from include.tier_sync.settings import DAG_ID
from include.tier_sync.sync.batches import PLAN_FILE

MAX_FAILURES = 200  # failures listed on the tab; the count is always the whole number
DIRECTIONS = ("upgrade", "downgrade", "new tier", "re-assert")
PRUNED = (
    "retention removed this run's folder (tier_sync_retention_days); sync_history.csv keeps its counts only"
)


def missing(reason: str, state: str = "missing") -> dict[str, Any]:
    """A section that has nothing to show, and why."""
    return {"state": state, "reason": reason}


def tier_rows(per_tier: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """{tier: counts} as rows, highest tier first (the tier table's order)."""
    order = {t: i for i, t in enumerate(ALL_TIERS)}
    return [{"tier": t, **per_tier[t]} for t in sorted(per_tier, key=lambda t: order.get(t, len(order)))]


# -- finding the run ------------------------------------------------------------------------------


def _names_run(data_dir: str, key: str) -> str | None:
    """The run id the folder says wrote it (run.json, else its sync log); None when neither exists."""
    folder = ledger.run_dir(data_dir, key)
    for name in (RUN_FILE, SYNC_LOG_FILE):
        doc = read_json(fileio.join(folder, name))
        if isinstance(doc, dict) and doc.get("run_id"):
            return str(doc["run_id"])
    return None


def _pruned_row(data_dir: str, run_id: str, key: str | None) -> dict[str, str] | None:
    from include.tier_sync.retention import read_sync_history

    rows = read_sync_history(data_dir)
    return next((r for r in rows if r.get("run_id") == run_id), None) or next(
        (r for r in rows if key is not None and r.get("key") == key and not r.get("run_id")), None
    )


def locate(data_dir: str, run_id: str, as_of: datetime | None) -> dict[str, Any]:
    """{"found": "folder" | "pruned" | "other_run" | "not_found", "key", "note"/"row"/"owner"}."""
    keys = run_keys(data_dir)
    for folder in reversed(keys):
        if _names_run(data_dir, folder) == run_id:
            return {"found": "folder", "key": folder}
    key: str | None = ledger.run_key(as_of) if as_of is not None else None
    if key is not None and key in keys:
        owner = _names_run(data_dir, key)
        if owner is None:
            return {
                "found": "folder",
                "key": key,
                "note": "run.json is not written yet: the run is in "
                "progress, or stopped before commit_csv and write_sync_log",
            }
        return {"found": "other_run", "key": key, "owner": owner}
    row = _pruned_row(data_dir, run_id, key)
    if row is not None:
        return {"found": "pruned", "key": row["key"], "row": row}
    return {"found": "not_found", "key": key}


# -- sections from a run folder -------------------------------------------------------------------


def _by_direction(moves: dict[str, Any]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """A plan's "from->to" counts per direction, and per target tier and direction."""
    from include.tier_sync.approval import direction  # the plan's own rule of upgrade/downgrade/new

    totals = dict.fromkeys(DIRECTIONS, 0)
    per_tier: dict[str, dict[str, int]] = {}
    for key, count in moves.items():
        kind, target = direction(key), key.partition("->")[2]
        totals[kind] += int(count)
        row = per_tier.setdefault(target, dict.fromkeys(DIRECTIONS, 0))
        row[kind] += int(count)
    tiers = tier_rows(per_tier)
    return totals, tiers


def plan_section(doc: Any, no_plan: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        return missing(no_plan)
    summary: dict[str, Any] = doc["summary"] if isinstance(doc.get("summary"), dict) else {}
    moves = dict(summary.get("moves") or {})
    totals, tiers = _by_direction(moves)
    return {
        "state": "ok",
        "planned_moves": summary.get("planned_moves"),
        "managed": summary.get("managed"),
        "total_customers": summary.get("total_customers"),
        "by_direction": totals,
        "by_tier": tiers,
        "moves": moves,
        "circuit_breaker": summary.get("circuit_breaker"),
        "left_out_by_approval": summary.get("left_out_by_approval"),
        "dry_run": bool(doc.get("dry_run")),
        "writes_allowed": doc.get("writes_allowed"),
        "dispatched": doc.get("dispatched", True),
        "skipped_reason": doc.get("skipped_reason"),
        "batches": len(doc.get("refs") or []),
    }


def moves_section(data_dir: str, key: str) -> dict[str, Any]:
    """The run's tier changes (tier_changes.csv) by target tier and direction."""
    frame = changes_frame(fileio.join(ledger.run_dir(data_dir, key), CHANGES_FILE))
    if frame is None:
        return missing("no tier_changes.csv: the run did not finish compute_tiers")
    kinds = ("upgrade", "downgrade", "new", "other")
    totals = dict.fromkeys(kinds, 0)
    per_tier: dict[str, dict[str, int]] = {}
    if len(frame):
        for (old, new), n in frame.groupby(["From", "To"], observed=True).size().items():
            kind = classify_move(str(old), str(new))
            totals[kind] += int(n)
            row = per_tier.setdefault(str(new), dict.fromkeys(kinds, 0))
            row[kind] += int(n)
    tiers = tier_rows(per_tier)
    return {"state": "ok", "changes": int(len(frame)), "by_direction": totals, "by_tier": tiers}


def sync_section(doc: Any, why_not: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        return missing(why_not)
    failures = list(doc.get("error_details") or [])
    return {
        "state": "ok",
        "synced": doc.get("synced"),
        "dry_run": doc.get("dry_run"),
        "skipped_reason": doc.get("skipped_reason"),
        "planned_moves": doc.get("planned_moves"),
        "written": doc.get("updated"),
        "failed": doc.get("errors"),
        "skipped": doc.get("skipped"),
        "skip_reasons": doc.get("skip_reasons") or {},
        "protected": doc.get("protected"),
        "changed_in_pos": doc.get("changed_in_pos"),
        "failed_batches": doc.get("failed_batches"),
        "group_counts_match": doc.get("group_counts_match"),
        "api_requests": (doc.get("api") or {}).get("requests"),
        "finished_at": doc.get("finished_at"),
        "failures": [
            {"customer_id": d.get("customer_id"), "error": d.get("error")} for d in failures[:MAX_FAILURES]
        ],
        "failures_total": len(failures),
    }


def validation_section(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), dict):
        return missing("no validation.json: the run did not reach validate_tiers")
    s = doc["summary"]
    return {
        "state": "ok",
        "success": s.get("success"),
        "evaluated": s.get("evaluated"),
        "successful": s.get("successful"),
        "failed": list(s.get("failed") or []),
        "failed_details": [check_note(d) for d in list(s.get("failed_details") or [])[:20]],
        "warnings": [check_note(w) for w in list(s.get("warnings") or [])[:20]],
        "row_count": s.get("row_count"),
    }


def _not_needed(doc: dict[str, Any]) -> str:
    breaker = (doc.get("summary") or {}).get("circuit_breaker") or {}
    if doc.get("dry_run"):
        return "a dry run writes nothing, so it never asks"
    if breaker.get("allowed_by_param"):
        return "allow_mass_change=true: the plan was written without asking"
    if breaker.get("tripped") is False:
        return "the circuit breaker did not trip"
    if doc.get("writes_allowed") is False:
        return f"this run may not write ({doc.get('skipped_reason') or 'no reason recorded'})"
    return "the plan did not stop for an approval"


def approval_section(doc: Any, no_plan: str) -> dict[str, Any]:
    """plan.json's approval record (approval.py): asked, decided, timed out, or not needed."""
    if not isinstance(doc, dict):
        return missing(no_plan)
    record = doc.get("approval")
    if not isinstance(record, dict):
        return {"state": "ok", "status": "not_needed", "reason": _not_needed(doc)}
    who: dict[str, Any] = record["responded_by"] if isinstance(record.get("responded_by"), dict) else {}
    return {
        "state": "ok",
        "status": record.get("status"),
        "option": record.get("option"),
        "responded_by": who.get("name") or who.get("id"),
        "responded_at": record.get("responded_at"),
        "comment": record.get("comment"),
        "requested_at": record.get("requested_at"),
        "deadline": record.get("deadline"),
        "approvers": record.get("approvers"),
        "reason": record.get("reason"),
    }


def _folder_view(data_dir: str, key: str) -> dict[str, Any]:
    folder = ledger.run_dir(data_dir, key)
    run = read_json(fileio.join(folder, RUN_FILE))
    log = read_json(fileio.join(folder, SYNC_LOG_FILE))
    plan = read_json(fileio.join(folder, SYNC_PLAN_DIR, PLAN_FILE))
    report = read_json(fileio.join(folder, VALIDATION_FILE))
    if isinstance(log, dict) and log.get("skipped_reason") and plan is None:
        no_plan = f"no sync plan: {log['skipped_reason']}"
    else:
        no_plan = "no sync plan: the run did not reach plan_sync (in progress, or stopped before it)"
    identity = run if isinstance(run, dict) else log if isinstance(log, dict) else {}
    return {
        "run_type": identity.get("run_type"),
        "logical_date": identity.get("logical_date"),
        "plan": plan_section(plan, no_plan),
        "moves": moves_section(data_dir, key),
        "sync": sync_section(
            log, "no sync log: write_sync_log has not run (the run is in progress or stopped)"
        ),
        "validation": validation_section(report),
        "approval": approval_section(plan, no_plan),
    }


# -- sections of a pruned run (sync_history.csv) --------------------------------------------------


def _num(value: Any) -> int | None:
    text = str(value if value is not None else "").strip()
    return int(float(text)) if text else None


def _pruned_view(row: dict[str, str]) -> dict[str, Any]:
    gone = missing(f"{PRUNED}, not this section", state="pruned")
    kinds = {"upgrade": "upgrades", "downgrade": "downgrades", "new": "new", "other": "other"}
    totals = {k: _num(row.get(col)) for k, col in kinds.items()}
    per_tier: dict[str, dict[str, int]] = {}
    for pair, n in json.loads(row.get("transitions") or "{}").items():
        old, _, new = str(pair).partition(" -> ")
        kind = classify_move("" if old == "(new)" else old, new)
        per_tier.setdefault(new, dict.fromkeys(kinds, 0))[kind] += int(n)
    tiers = tier_rows(per_tier)
    has_sync = row.get("synced", "") != ""
    passed = {"true": True, "false": False}.get(str(row.get("validation_passed") or "").lower())
    return {
        "run_type": None,
        "logical_date": None,
        "plan": gone,
        "moves": {
            "state": "pruned",
            "reason": PRUNED,
            "changes": _num(row.get("changes")),
            "by_direction": totals,
            "by_tier": tiers,
        },
        "sync": {
            "state": "pruned",
            "reason": f"{PRUNED}: the failures are not kept",
            "synced": row.get("synced") == "true",
            "dry_run": row.get("dry_run") == "true",
            "planned_moves": _num(row.get("planned_moves")),
            "written": _num(row.get("updated")),
            "failed": _num(row.get("errors")),
            "skipped": _num(row.get("skipped")),
            "protected": _num(row.get("protected")),
            "changed_in_pos": _num(row.get("changed_in_pos")),
            "failed_batches": _num(row.get("failed_batches")),
            "group_counts_match": {"true": True, "false": False}.get(row.get("group_counts_match", "")),
        }
        if has_sync
        else missing(f"{PRUNED}; the run had no sync log", state="pruned"),
        "validation": {
            "state": "pruned",
            "reason": f"{PRUNED}: which expectations failed is not kept",
            "success": passed,
        }
        if passed is not None
        else gone,
        "approval": gone,
    }


# -- the tab --------------------------------------------------------------------------------------


def run_view(data_dir: str, dag_id: str, run_id: str, as_of: datetime | None = None) -> dict[str, Any]:
    """Everything the run tab shows; `as_of` is the run's own (None when Airflow does not know it)."""
    head: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "tier_sync_run": dag_id == DAG_ID}
    if dag_id != DAG_ID:
        return {
            **head,
            "found": "other_dag",
            "message": f"This is a run of the DAG {dag_id}, not a tier-sync "
            f"run ({DAG_ID}): this tab has nothing to show for it.",
        }
    where = locate(data_dir, run_id, as_of)
    key: str = where.get("key") or ""
    head.update(found=where["found"], key=key or None, as_of=iso(ledger.key_as_of(key)) if key else None)
    if where["found"] == "folder":
        return {**head, "message": where.get("note"), **_folder_view(data_dir, key)}
    if where["found"] == "pruned":
        return {
            **head,
            "message": f"The folder runs/{key}/ was pruned: {PRUNED}.",
            **_pruned_view(where["row"]),
        }
    if where["found"] == "other_run":
        return {
            **head,
            "message": f"The folder runs/{key}/ holds the files of run {where['owner']}, a later "
            "run of the same as_of that replaced this run's files: see that run's tab.",
        }
    at = f"runs/{key}/ does not exist" if key else "no run folder names this run id"
    return {
        **head,
        "message": f"Nothing of this run is in the data dir ({at}): it has not written any file yet, "
        "or it was removed without retention (no row in sync_history.csv).",
    }
