"""One customer's tier per run and what the sync did to them, from the run folders (issue 18).

Per kept run folder (runs/<key>/, newest first): the tier the run computed for the customer, its
change if any (tier_changes.csv) and the sync's action on them, read from where the sync keeps
per-customer outcomes (include/tier_sync/sync/, docs/contracts.md "The sync"):

- the batch files (`moves`: who was planned into which group, from which group);
- the batch results (`changed_in_pos_ids`, `deleted_ids`, `already_in_target_ids`,
  `error_details`, through `sync.log.load_batch_results`, which turns a batch that never finished
  into per-customer errors as the sync log does);
- `left_alone.json` (protected, deleted, missing, deferred by the limit, left out by an approval);
- plan.json (dry run, back-fill, superseded, circuit breaker: planned but not written).

The tier of a run without a change row is carried from the run before (a run's changes are its
differences from the newest published run before it, ledger.previous_run). Runs pruned by
retention keep counts only (sync_history.csv), so they are not listed here. Each run's
per-customer index is built once per version of its plan.json (dashboard_cache).
"""

from __future__ import annotations

from typing import Any

from include.tier_sync import fileio, ledger
from include.tier_sync.dashboard_cache import cached, read_json, run_keys, signature
from include.tier_sync.dashboard_runs import changes_frame, classify_move
from include.tier_sync.ledger import CHANGES_FILE, RunPaths
from include.tier_sync.rules import NO_TIER
from include.tier_sync.runtime import iso

# Why a run planned but wrote nothing (plan.json's skipped_reason), in words.
NOT_WRITTEN = {
    "dry_run": "dry run",
    "circuit_breaker": "the circuit breaker stopped the run (a mass change waiting for, or refused, approval)",
}

LEFT_ALONE_WORDS = {
    "deleted": "left alone: deleted in the POS",
    "missing": "left alone: not in the POS's customer data",
    "deferred_by_limit": "not moved: deferred, the run's limit was reached",
    "left_out_by_approval": "not moved: the approval applied upgrades only",
}


def customer_runs(data_dir: str, customer_id: str, current_tier: str | None, limit_runs: int = 400) -> list[dict[str, Any]]:
    """Per kept run, newest first: tier, change and the sync's action on the customer."""
    keys = run_keys(data_dir)[-limit_runs:]
    rows = [_run_row(data_dir, key, customer_id) for key in keys]
    _fill_tiers(rows, current_tier)
    for row in rows:
        row["sync"] = _action(data_dir, row, customer_id)
    return list(reversed(rows))


def _run_row(data_dir: str, key: str, customer_id: str) -> dict[str, Any]:
    from include.tier_sync.sync.batches import plan_path

    run_dir = ledger.run_dir(data_dir, key)
    paths = RunPaths(data_dir, ledger.key_as_of(key))
    frame = changes_frame(fileio.join(run_dir, CHANGES_FILE))
    change = None
    if frame is not None and customer_id in frame.index:
        hit = frame.loc[[customer_id]].iloc[-1]
        old, new = str(hit["From"]), str(hit["To"])
        change = {"from": old or None, "to": new, "kind": classify_move(old, new)}
    return {
        "run_key": key,
        "as_of": iso(paths.as_of),
        "published": ledger.published_master(paths, key) is not None,
        "change": change,
        # the run got as far as its tier changes (or a sync plan, made from its master)
        "computed": frame is not None or signature(plan_path(paths)) is not None,
        "tier": None,
    }


def _fill_tiers(rows: list[dict[str, Any]], current_tier: str | None) -> None:
    """Each run's tier: its change's `to`, else the tier of the newest published run before it.

    Before the first change the tier is that change's `from` (None when it was new then: the
    customer was not in those runs' masters); with no change at all, the latest master's tier.
    A run that never got to its tier changes has no tier.
    """
    first = next((r["change"] for r in rows if r["change"] is not None), None)
    carried: str | None = (first["from"] if first is not None else current_tier) if rows else None
    for row in rows:
        if row["change"] is not None:
            row["tier"] = row["change"]["to"]
            if row["published"]:
                carried = row["change"]["to"]
        elif row["computed"]:
            row["tier"] = carried


# -- the sync's action --------------------------------------------------------------------------


def _action(data_dir: str, row: dict[str, Any], customer_id: str) -> dict[str, Any]:
    paths = RunPaths(data_dir, ledger.key_as_of(row["run_key"]))
    index = _plan_index(paths)
    if index is None:
        log = read_json(paths.run_sync_log)
        why = log.get("skipped_reason") if isinstance(log, dict) else None
        if why is None:
            why = "published, but plan_sync did not run" if row["published"] else "not published (validation failed or did not finish)"
        return {"kind": "no_plan", "text": f"no sync plan: {why}"}
    move = index["moves"].get(customer_id)
    if move is not None:
        return _moved(index, move, customer_id)
    alone = index["left_alone"]
    stopped = index["skipped_reason"] == "circuit_breaker" and not index["dispatched"]
    if stopped and not (alone and customer_id in alone) and row["tier"] not in (None, NO_TIER):
        # A tripped breaker writes no batch files: who would have moved is not on record.
        return {"kind": "not_written", "text": f"nothing written: {NOT_WRITTEN['circuit_breaker']}"}
    if alone is not None and customer_id in alone:
        entry = alone[customer_id]
        if entry["why"] == "protected":
            group = entry.get("group") or entry.get("group_id") or "a non-tier group"
            return {"kind": "protected", "text": f"protected: in {group} (not a tier group), never moved"}
        return {"kind": entry["why"], "text": LEFT_ALONE_WORDS.get(entry["why"], f"left alone: {entry['why']}")}
    if row["tier"] is None:
        return {"kind": "not_in_run", "text": "not a customer of this run yet"}
    if row["tier"] == NO_TIER:
        return {"kind": "no_tier", "text": "no tier: left where they are"}
    if alone is None and customer_id not in index["managed"]:
        return {"kind": "left_alone",
                "text": "left alone: protected, deleted or missing (this run predates left_alone.json)"}
    return {"kind": "unchanged", "text": f"already in the {row['tier']} group: nothing to do"}


def _moved(index: dict[str, Any], move: dict[str, Any], customer_id: str) -> dict[str, Any]:
    """A customer the plan moved: what happened to the move (written, skipped, failed, not sent)."""
    target = move["group"]
    planned = f"from {move['from']} to {target}"
    outcome = index["outcomes"].get(customer_id)
    if not index["dispatched"]:
        why = index["skipped_reason"] or "writes not allowed"
        return {"kind": "not_written", "text": f"planned {planned}; not written: {NOT_WRITTEN.get(why, why)}"}
    if outcome is not None and outcome[0] == "failed" and index["in_progress"]:
        return {"kind": "pending", "text": f"planned {planned}; the sync is still running"}
    if outcome is not None:
        kind, detail = outcome
        words = {
            "changed_in_pos": "left alone: a person changed their group in the POS after the plan",
            "deleted": "skipped: deleted in the POS meanwhile",
            "already_in_target": f"skipped: already in {target} (changed in the POS)",
            "failed": f"failed {planned}: {detail}",
        }
        return {"kind": kind, "text": words[kind]}
    written, ambiguous = index["batches"].get(move["batch"], (False, False))
    if not written:
        return {"kind": "not_written", "text": f"planned {planned}; not written: writes not allowed"}
    text = f"moved {planned}" + (" (or found already there: an older result file)" if ambiguous else "")
    return {"kind": "moved", "text": text}


def _plan_index(paths: RunPaths) -> dict[str, Any] | None:
    """Per-customer outcomes of the run's sync plan (cached per plan.json version); None: no plan."""
    from include.tier_sync.sync.batches import plan_path

    url = plan_path(paths)
    sig = signature(url)
    if sig is None:
        return None
    # The results are written after plan.json: key on the sync log too, written after them all.
    log_sig = signature(paths.run_sync_log)
    return cached("customer_plan_index", paths.run_sync_plan_dir, (sig, log_sig), lambda: _build_index(paths))


def _build_index(paths: RunPaths) -> dict[str, Any] | None:
    from include.tier_sync.sync.batches import read_batch, read_expected_members, read_left_alone
    from include.tier_sync.sync.log import load_batch_results

    doc, results = load_batch_results(paths)
    if doc is None:
        return None
    moves: dict[str, dict[str, Any]] = {}
    for ref in doc.get("refs") or []:
        batch = read_batch(ref)
        group = batch.get("group_name") or batch["tier"]
        for m in batch["moves"]:
            moves[str(m["customer_id"])] = {"batch": batch["index"], "from": m["from"], "group": group}
    outcomes: dict[str, tuple[str, str]] = {}
    batches: dict[Any, tuple[bool, bool]] = {}
    for r in results:
        for cid in r["changed_in_pos_ids"]:
            outcomes[str(cid)] = ("changed_in_pos", "")
        for cid in r["deleted_ids"]:
            outcomes[str(cid)] = ("deleted", "")
        for cid in r["already_in_target_ids"]:
            outcomes[str(cid)] = ("already_in_target", "")
        for d in r["error_details"]:
            outcomes[str(d.get("customer_id"))] = ("failed", str(d.get("error")))
        uncounted = int(r["skip_reasons"].get("already_in_target", 0)) > len(r["already_in_target_ids"])
        batches[r["index"]] = (bool(r["written"]), uncounted)
    alone = read_left_alone(paths)
    if alone is not None and alone["plan_id"] != doc.get("plan_id"):
        alone = None  # written by a plan_sync attempt whose plan.json never landed: not this plan's
    managed: set[str] = set()
    if alone is None:  # an older plan: who was managed tells unchanged from left alone
        for ids in (read_expected_members(paths) or {}).values():
            managed.update(ids)
    return {
        # No sync log yet: batches without a result may still be running (not failed).
        "in_progress": not fileio.exists(paths.run_sync_log),
        "dispatched": bool(doc.get("dispatched", True)) and bool(doc.get("writes_allowed", True)),
        "skipped_reason": doc.get("skipped_reason"),
        "moves": moves,
        "outcomes": outcomes,
        "batches": batches,
        "left_alone": alone["customers"] if alone is not None else None,
        "managed": managed,
    }

