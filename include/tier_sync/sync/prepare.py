"""The plan_sync step: may this run write, and if so what: groups, plan, breaker, batch files.

Only the latest run writes to the POS; that rule is the run ledger's (`ledger.is_newest_run`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from include.tier_sync import ledger
from include.tier_sync.runtime import iso
from include.tier_sync.sync.batches import (
    CALLS_PER_BATCH,
    MAX_BATCHES,
    PLAN_FORMAT,
    write_batches,
    write_expected_members,
    write_group_members,
    write_left_alone,
    write_plan_doc,
)
from include.tier_sync.sync.contracts import api_diff, api_stats
from include.tier_sync.sync.groups import is_placeholder, resolve_groups
from include.tier_sync.sync.plan import check_circuit, circuit_status, current_groups, plan_moves

if TYPE_CHECKING:
    import pandas as pd

    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.lightspeed import LightspeedClient
    from include.tier_sync.rules import TierRules
    from include.tier_sync.sync.contracts import BatchRef, PlanSummary
    from include.tier_sync.sync.groups import GroupMap
    from include.tier_sync.sync.live import LiveState
    from include.tier_sync.sync.plan import Master


def decide_writes(
    paths: RunPaths, *, dry_run: bool, run_type: str | None = None, latest_interval: bool = False
) -> tuple[bool, str | None]:
    """Whether this run may write to the POS, and why not.

    Only the latest run writes: a dry run, a back-filled run of an older interval, or a run whose
    as_of is older than the newest published run (``latest.json``) plans and logs but skips the
    writes. A back-filled run of the newest interval that has ended (``latest_interval``: no
    later interval has closed yet) *is* the latest run, e.g. after the DAG was paused for days.
    """
    if dry_run:
        return False, "dry_run"
    if run_type is not None and str(run_type).lower() == "backfill" and not latest_interval:
        return False, "backfill run of an older interval: only the latest run writes to the POS"
    if not ledger.is_newest_run(paths):
        newest = ledger.newest_published_as_of(paths)
        return False, f"superseded: a newer run (as_of {newest}) exists; only the latest run writes"
    return True, None


def prepare_sync(
    client: LightspeedClient,
    master: Master,
    current: pd.DataFrame | Mapping[str, LiveState],
    rules: TierRules,
    paths: RunPaths,
    *,
    customers_cursor: int,
    writes_allowed: bool,
    skipped_reason: str | None = None,
    dry_run: bool = False,
    force_resync: bool = False,
    limit: int | None = None,
    allow_mass_change: bool = False,
    only_upgrades: bool = False,
    max_batches: int = MAX_BATCHES,
    calls_per_batch: int = CALLS_PER_BATCH,
) -> list[BatchRef]:
    """The plan_sync task: groups, plan, breaker, batch files, plan.json; returns refs to map over.

    ``master`` and ``current`` as `plan_moves` takes them (plain columns and live customers from
    the task; DataFrames from older callers and tests).

    Returns [] (so the mapped write task is skipped) when writes are not allowed; the batch files
    are still written, as the record of what would have been sent. When the breaker trips on a
    writing run, plan.json is written with ``dispatched: false`` first (so the log can report the
    plan), then MassChangeError is raised. A group listing that cannot be trusted (two reads
    disagree, or no default group) raises GroupListingError before any write and any file.
    """
    started_at = datetime.now(UTC)
    stats_before = api_stats(client)
    writes_allowed = writes_allowed and not dry_run
    if dry_run and skipped_reason is None:
        skipped_reason = "dry_run"
    # Plan once, against placeholders: creating a missing group is a write too, and nothing may be
    # written before the circuit breaker has had its say.
    groups = resolve_groups(client, rules, create_missing=False)
    plan = plan_moves(master, current, groups, rules, force_resync=force_resync, limit=limit)
    if only_upgrades:
        plan = plan.upgrades_only()
    status = circuit_status(plan, rules)
    status["allowed_by_param"] = bool(allow_mass_change and status["tripped"])
    blocked = writes_allowed and status["tripped"] and not allow_mass_change
    dispatched = writes_allowed and not blocked
    if dispatched:
        if status["tripped"]:
            check_circuit(plan, rules, allow_mass_change)  # allowed: logs the warning
        if groups.missing:
            # Create the missing groups, then aim the same plan at them (no second plan). The
            # creation re-lists and compares with the listing the plan was made from: a first
            # read that was empty or cut raises GroupListingError, before any write.
            groups = resolve_groups(client, rules, create_missing=True, planned=groups)
            plan = plan.retargeted(groups)
    summary: PlanSummary = {
        **plan.summary(),
        "circuit_breaker": status,
        "groups_created": list(groups.created),
    }
    plan_id = uuid.uuid4().hex
    write_expected_members(plan, paths)
    write_left_alone(plan, paths, plan_id, groups)
    write_group_members(paths, plan_id, customers_cursor, tier_group_members(current, groups))
    extra: dict[str, Any] = {
        "summary": summary,
        "started_at": iso(started_at),
        "dry_run": dry_run,
        "writes_allowed": dispatched,
        "skipped_reason": "circuit_breaker" if blocked else skipped_reason,
        "dispatched": dispatched,
        "groups": groups.as_dict(),
        "api": api_diff(api_stats(client), stats_before),
    }
    if blocked:
        write_plan_doc(
            paths,
            {
                "format": PLAN_FORMAT,
                "plan_id": plan_id,
                "as_of": iso(paths.as_of),
                "customers_cursor": int(customers_cursor),
                "refs": [],
                **extra,
            },
        )
        check_circuit(plan, rules, allow_mass_change)  # raises MassChangeError
    refs = write_batches(
        plan,
        paths,
        customers_cursor=customers_cursor,
        max_batches=max_batches,
        calls_per_batch=calls_per_batch,
        groups=groups,
        plan_id=plan_id,
        extra=extra,
    )
    return [{**ref, "writes_allowed": dispatched} for ref in refs] if writes_allowed else []


def tier_group_members(current: pd.DataFrame | Mapping[str, LiveState], groups: GroupMap) -> dict[str, list[str]]:
    """Tier group id -> its live members in the plan's customer data (the state at the plan's cursor).

    The group check starts from this and reads only the customers feed since the cursor, instead
    of listing every tier group again (verify.py). A group that does not exist yet (placeholder)
    has no entry; one created by this run has no members at the cursor.
    """
    wanted = {gid for gid in groups.tier_groups.values() if not is_placeholder(gid)}
    members: dict[str, list[str]] = {gid: [] for gid in wanted}
    for cid, (group_id, deleted) in current_groups(current).items():
        if group_id in wanted and not deleted:
            members[group_id].append(cid)
    return members
