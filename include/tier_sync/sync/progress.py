"""Progress at the till (issue 18, opt-in): a short text per customer in a custom field of the POS.

The retailer picks the field (`settings.progress_field`, Variable `tier_sync_progress_field`,
off by default). After the group sync, `plan_progress` computes every customer's text
(`explain.progress_text`, the page's "what next") and keeps only those whose text or record
changed since our last write; mapped `progress_batch` instances (same pool, client and request
budget as `sync_batch`; `progress_write.py`) write them; `finish_progress` (in write_sync_log)
adds the `progress` section to the sync log and updates the state file.

* **Only what changed.** The state file `till_progress_state.json` (data dir) holds, per customer,
  the text we last wrote and the record's version our write left. A customer is written again only
  when the wanted text differs, or the order store holds a newer version (a person edited the
  record, maybe the field). So a second run sends nothing, and our own write, which bumps the
  version, is recognised as ours (its version is the one we recorded).
* **Never a protected customer**: anyone whose live group the sync may not move (Staff, Wholesale,
  any non-tier group; `GroupMap.is_managed`) is skipped here and re-checked before each write.
* **Writes follow the sync's decision**: a dry run, back-fill, superseded run or an undispatched
  plan (breaker, refused approval) plans and logs but writes nothing.

Files (the only place their names are spelled): ``runs/<key>/till_progress/plan.json``,
``batch-NNNN.json`` with ``.result.json`` / ``.progress.json`` beside each. The plan takes the
master's columns and the live customers (`sync/live.py`) and imports no pandas (a DataFrame given
instead is read with it); the finish step imports none.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio
from include.tier_sync.runtime import iso
from include.tier_sync.sync.contracts import FORMAT_VERSION, format_version_of, sum_api
from include.tier_sync.sync.live import as_live

if TYPE_CHECKING:
    import pandas as pd

    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.rules import TierRules
    from include.tier_sync.sync.groups import GroupMap
    from include.tier_sync.sync.live import LiveState
    from include.tier_sync.sync.plan import Master

log = logging.getLogger(__name__)

DIR = "till_progress"
STATE_FILE = "till_progress_state.json"
PLAN_FILE = "plan.json"
BATCH_FILE_PATTERN = "batch-{index:04d}.json"
RESULT_SUFFIX = ".result.json"
PROGRESS_SUFFIX = ".progress.json"
BATCH_SIZE = 250  # customers per mapped instance: about 500 requests (GET + PUT each)
MAX_BATCHES = 256
COUNTS = ("written", "unchanged", "skipped_protected", "skipped_deleted", "failed")
# The master's columns `wanted_texts` reads (plan_progress reads only these).
MASTER_COLUMNS = ("Customer ID", "Tier", "Lifetime Value", "Order Count", "Purchases Last 30 Days", "Loyalty Member")


class ProgressFailed(RuntimeError):
    """Some progress texts could not be written; raised after the sync log is written."""


class NoSyncPlan(LookupError):
    """The group sync left no plan (it failed or never ran): the run has already failed upstream."""


# -- paths ---------------------------------------------------------------------------------------


def progress_dir(paths: RunPaths) -> str:
    return fileio.join(paths.run_dir, DIR)


def plan_file(paths: RunPaths) -> str:
    return fileio.join(progress_dir(paths), PLAN_FILE)


def state_file(paths: RunPaths) -> str:
    return fileio.join(paths.data_dir, STATE_FILE)


def beside(ref: str, suffix: str) -> str:
    """The result / progress file next to a batch file."""
    return ref[: -len(".json")] + suffix


# -- state ---------------------------------------------------------------------------------------


def read_state(paths: RunPaths, field: str) -> dict[str, dict[str, Any]]:
    """customer id -> {"text", "version"} of our last write into ``field`` ({} for another field)."""
    raw = fileio.read_json(state_file(paths))
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get("customers"), dict):
        raise ValueError(f"{state_file(paths)} is not a progress state file (no `customers` object)")
    format_version_of(raw, state_file(paths))
    if raw.get("field") != field:
        log.warning("Progress state is for %s, not %s: every customer is checked again", raw.get("field"), field)
        return {}
    return dict(raw["customers"])


def write_state(paths: RunPaths, field: str, customers: Mapping[str, Mapping[str, Any]]) -> None:
    fileio.write_json(
        state_file(paths),
        {"format_version": FORMAT_VERSION, "field": field, "customers": dict(sorted(customers.items()))},
    )


# -- plan ----------------------------------------------------------------------------------------


def wanted_texts(master: Master, rules: TierRules) -> dict[str, str]:
    """customer id -> progress text, from the master CSV's figures (its tier is checked, not trusted)."""
    from include.tier_sync.explain import progress_text
    from include.tier_sync.money import to_cents
    from include.tier_sync.rules import tier_for

    ids, tiers = [str(v) for v in master["Customer ID"]], [str(v) for v in master["Tier"]]
    ltv = [to_cents(v) for v in master["Lifetime Value"]]
    orders, window = [int(v) for v in master["Order Count"]], [int(v) for v in master["Purchases Last 30 Days"]]
    loyal = [str(v).strip().lower() == "true" for v in master["Loyalty Member"]]
    wrong = [cid for cid, t, c, n, w, m in zip(ids, tiers, ltv, orders, window, loyal, strict=True)
             if t != tier_for(c, n, w, m, rules)]
    if wrong:
        raise ValueError(f"master CSV: the tier of {len(wrong)} customers (e.g. {wrong[0]}) does not follow from their figures")
    rows = zip(ids, tiers, ltv, orders, window, loyal, strict=True)
    return {cid: progress_text(t, c, n, w, m, rules) for cid, t, c, n, w, m in rows}


def _sort(texts: Mapping[str, str], live: Mapping[str, tuple[str | None, bool, int]], groups: GroupMap,
          state: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Who needs a write (customer_id, text), and the counts of everyone else."""
    counts = dict.fromkeys(("unchanged", "skipped_protected", "skipped_deleted", "missing"), 0)
    todo: list[dict[str, str]] = []
    for cid, text in sorted(texts.items()):
        found = live.get(cid)
        if found is None:
            counts["missing"] += 1
            continue
        group, deleted, version = found
        if deleted:
            counts["skipped_deleted"] += 1
        elif not groups.is_managed(group):
            counts["skipped_protected"] += 1
        elif (ours := state.get(cid)) and ours.get("text") == text and version <= int(ours.get("version") or -1):
            counts["unchanged"] += 1
        else:
            todo.append({"customer_id": cid, "text": text})
    return todo, counts


def _sync_decision(paths: RunPaths) -> tuple[Mapping[str, Any], bool, str | None]:
    """The group sync's plan.json, whether this run writes to the POS, and why not."""
    from include.tier_sync.sync.batches import read_plan_doc

    doc = read_plan_doc(paths)
    if doc is None or not doc.get("groups"):
        raise NoSyncPlan("no sync plan for this run (plan_sync did not finish): nothing is shown at the till")
    writes = bool(doc.get("writes_allowed")) and bool(doc.get("dispatched", True))
    reason = None if writes else str(doc.get("skipped_reason") or "the group sync did not write")
    return doc, writes, reason


def plan_progress(paths: RunPaths, master: Master, current: pd.DataFrame | Mapping[str, LiveState], rules: TierRules, *,
                  field: str, dry_run: bool = False) -> list[dict[str, Any]]:
    """The plan_progress step: texts, who changed, batch files and plan.json; refs to map over
    ([] when nothing is to be written or this run may not write)."""
    from include.tier_sync.sync.groups import GroupMap

    doc, writes, reason = _sync_decision(paths)
    groups = GroupMap.from_dict(doc["groups"])
    todo, counts = _sort(wanted_texts(master, rules), as_live(current), groups, read_state(paths, field))
    plan_id = uuid.uuid4().hex
    size = max(BATCH_SIZE, math.ceil(len(todo) / MAX_BATCHES))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)] if writes else []
    refs = [_write_batch(paths, plan_id, field, groups, chunk, i + 1, len(chunks), writes)
            for i, chunk in enumerate(chunks)]
    fileio.write_json(plan_file(paths), {
        "format_version": FORMAT_VERSION, "plan_id": plan_id, "field": field, "as_of": iso(paths.as_of),
        "started_at": iso(datetime.now(UTC)), "dry_run": bool(dry_run), "writes_allowed": writes,
        "skipped_reason": reason, "planned": len(todo), "counts": counts, "refs": refs,
    })
    log.info("Progress at the till (%s): %s to write in %s batches, %s unchanged, %s protected%s",
             field, len(todo), len(refs), counts["unchanged"], counts["skipped_protected"],
             "" if writes else f"; nothing is written: {reason}")
    return refs


def _write_batch(paths: RunPaths, plan_id: str, field: str, groups: GroupMap, items: list[dict[str, str]],
                 index: int, total: int, writes: bool) -> dict[str, Any]:
    ref = fileio.join(progress_dir(paths), BATCH_FILE_PATTERN.format(index=index))
    fileio.write_json(ref, {"format_version": FORMAT_VERSION, "plan_id": plan_id, "index": index, "of": total,
                            "field": field, "groups": groups.as_dict(), "items": items})
    return {"ref": ref, "size": len(items), "writes_allowed": writes,
            "batch": f"progress {index}/{total} ({len(items)})"}


# -- finish (write_sync_log) ---------------------------------------------------------------------


def _result_of(ref: Mapping[str, Any], plan_id: str) -> dict[str, Any]:
    """A batch's result file; a missing or failed one counts every customer it did not finish as failed."""
    found = fileio.read_json(beside(str(ref["ref"]), RESULT_SUFFIX))
    result = dict(found) if isinstance(found, dict) and found.get("plan_id") == plan_id else {}
    if result.get("status") != "done":  # every customer it did not finish is a failure, by id
        error = f"batch failed: {result.get('error') or 'batch did not finish'}"
        batch = fileio.read_json(str(ref["ref"])) or {}
        done = set(result.get("done_ids") or [])
        left = [str(i["customer_id"]) for i in batch.get("items") or [] if str(i["customer_id"]) not in done]
        result["failed_details"] = [d for d in result.get("failed_details") or [] if d.get("customer_id") in done]
        result["failed_details"] += [{"customer_id": cid, "error": error} for cid in left]
        result["failed"] = len(result["failed_details"])
    return result


def finish_progress(paths: RunPaths) -> dict[str, Any]:
    """The sync log's `progress` section; saves what was written into the state file first."""
    doc = fileio.read_json(plan_file(paths))
    if not isinstance(doc, dict):
        return {"enabled": False, "reason": "no progress plan for this run (the setting is off, or plan_progress did not run)"}
    format_version_of(doc, plan_file(paths))
    results = [_result_of(ref, str(doc["plan_id"])) for ref in doc.get("refs") or []]
    counts = {k: int((doc.get("counts") or {}).get(k) or 0) for k in COUNTS if k != "written"}
    counts = {"written": 0, **counts, "failed": 0}
    for r in results:
        for k in COUNTS:
            counts[k] += int(r.get(k) or 0)
    if results:
        state = read_state(paths, str(doc["field"]))
        for r in results:
            state.update(r.get("versions") or {})
        write_state(paths, str(doc["field"]), state)
    details = [d for r in results for d in r.get("failed_details") or []]
    return {"enabled": True, "field": doc["field"], "dry_run": bool(doc.get("dry_run")),
            "writes_allowed": bool(doc.get("writes_allowed")), "skipped_reason": doc.get("skipped_reason"),
            "planned": int(doc.get("planned") or 0), **counts,
            "missing": int((doc.get("counts") or {}).get("missing") or 0), "batches": len(results),
            "failed_details": details[:50], "api": sum_api(*(r.get("api") for r in results))}


def raise_for_progress_errors(section: Mapping[str, Any]) -> None:
    """Fail the run (after the log is written) when any text could not be written."""
    if int(section.get("failed") or 0) > 0:
        sample = ", ".join(str(d.get("customer_id")) for d in list(section.get("failed_details") or [])[:5])
        raise ProgressFailed(f"{section['failed']} progress texts could not be written to {section.get('field')} "
                             f"(e.g. {sample}); see the progress section of tier_sync_log.json")
