"""The group-count check: does each tier group in Lightspeed hold exactly its expected customers?

It does not re-list the tier groups (one request per page of members, every day, growing with the
store): it starts from each tier group's members at the plan's cursor and reads the customers
feed since, which shows every group change, the run's writes and a person's alike; a group is
listed only to confirm writes the feed does not show (see `_members_by_feed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from include.tier_sync import fileio
from include.tier_sync.rules import TIERS
from include.tier_sync.sync.batches import read_batch, read_group_members, read_plan_doc
from include.tier_sync.sync.contracts import (
    FORMAT_VERSION,
    FeedRecord,
    GroupCheck,
    PlanDoc,
    PlanGroupMembers,
    TierGroupCount,
    api_diff,
    api_stats,
    group_check_from_json,
    is_null,
)
from include.tier_sync.sync.groups import is_placeholder
from include.tier_sync.sync.plan import MASTER_ID, MASTER_TIER
from include.tier_sync.sync.write import GroupDeletedError, read_customer_changes

if TYPE_CHECKING:
    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.lightspeed import LightspeedClient
    from include.tier_sync.sync.groups import GroupMap
    from include.tier_sync.sync.plan import Master

log = logging.getLogger(__name__)


def _expected_from_master(master: Master) -> dict[str, list[str]]:
    """Tier -> every master row with that tier (when the plan's expected members are unknown)."""
    return {
        t: [str(c) for c, tier in zip(master[MASTER_ID], master[MASTER_TIER], strict=True) if str(tier) == t]
        for t in TIERS
    }


def _list_group(client: LightspeedClient, groups: GroupMap, group_id: str, tier: str) -> dict[str, int]:
    """A tier group's live members (id -> version); a group gone from the POS (404) is a clear error."""
    from include.tier_sync.lightspeed import LightspeedNotFound

    try:
        members = client.list_group_members(group_id)
    except LightspeedNotFound as exc:
        raise GroupDeletedError(groups.names.get(group_id) or f"of tier {tier}", group_id) from exc
    return {str(c.get("id")): int(c.get("version") or 0) for c in members if is_null(c.get("deleted_at"))}


def _real_tier_groups(groups: GroupMap) -> dict[str, str]:
    """Tier -> group id of the tier groups that exist (placeholders of a dry run left out)."""
    return {t: g for t, g in groups.tier_groups.items() if g is not None and not is_placeholder(g)}


def _members_by_listing(client: LightspeedClient, groups: GroupMap) -> tuple[dict[str, set[str]], list[str]]:
    """Every tier group listed in full (a plan without tier_group_members.json)."""
    real = _real_tier_groups(groups)
    members = {tier: set(_list_group(client, groups, gid, tier)) for tier, gid in real.items()}
    return members, sorted(real.values())


def _check_groups_live(client: LightspeedClient, groups: GroupMap) -> None:
    """One look at the group list: a tier group deleted in the POS since the plan raises `GroupDeletedError`."""
    live = {str(g.get("id")) for g in client.list_customer_groups()}
    for tier, gid in _real_tier_groups(groups).items():
        if gid not in live:
            raise GroupDeletedError(groups.names.get(gid) or f"of tier {tier}", gid)


def _sent_moves(paths: RunPaths, plan: PlanDoc, excluded: set[str]) -> dict[str, str]:
    """Customer id -> target group of every move this run may have written (re-asserts and the
    customers the batches left alone or failed on excluded): the writes the check must see landed."""
    if not plan.get("dispatched", True) or not plan.get("writes_allowed", True):
        return {}
    sent: dict[str, str] = {}
    for ref in plan.get("refs") or []:
        batch = read_batch(ref)
        target = str(batch["group_id"])
        for move in batch["moves"]:
            cid = str(move["customer_id"])
            if move.get("from_group_id") != target and cid not in excluded:
                sent[cid] = target
    return sent


def _members_by_feed(
    client: LightspeedClient,
    groups: GroupMap,
    paths: RunPaths,
    plan: PlanDoc,
    start: PlanGroupMembers,
    excluded: set[str],
) -> tuple[dict[str, set[str]], list[str]]:
    """Each tier group's members now, from what the run knows plus the feed since the plan.

    The state at the plan's cursor (``tier_group_members.json``) overlaid with the newest record of
    every customer changed since (the customers feed by version cursor, from the plan's newest
    saved view on): every group change since the plan shows there, the run's own writes and a
    person's alike. A write of this run that the feed does not show landed (a membership call
    that leaves the customer's version alone, or one that did not move them) sends the check to
    list that one target group; otherwise no group is listed at all, so a quiet day costs a
    handful of requests whatever the store's size.
    """
    _check_groups_live(client, groups)
    plan_dir, plan_id = paths.run_sync_plan_dir, str(plan["plan_id"])
    cursor = int(plan["customers_cursor"])
    consequence = "the group check cannot tell who is in which group"

    def current(records: Mapping[str, FeedRecord]) -> dict[str, str | None]:
        state: dict[str, str | None] = {c: gid for gid, ids in start["members"].items() for c in ids}
        for cid, rec in records.items():
            state[cid] = None if rec["deleted_at"] is not None else rec["customer_group_id"]
        return state

    view = read_customer_changes(client, cursor, plan_dir=plan_dir, plan_id=plan_id, consequence=consequence)
    state = current(view["records"])
    sent = _sent_moves(paths, plan, excluded)
    to_list = sorted({target for cid, target in sent.items() if state.get(cid) != target})
    if to_list:
        log.info("Group check: %s written groups to list (writes the feed does not show)", len(to_list))
        read_up_to = view["to"]
        tier_of = {gid: tier for tier, gid in groups.tier_groups.items()}
        listings = {gid: _list_group(client, groups, gid, tier_of.get(gid, "?")) for gid in to_list}
        # the feed again, from where it was: whatever changed while the groups were listed
        view = read_customer_changes(client, cursor, plan_dir=plan_dir, plan_id=plan_id, consequence=consequence)
        records = view["records"]
        state = current(records)
        for gid, listing in listings.items():
            for cid, version in listing.items():
                rec = records.get(cid)
                if rec is None or int(rec["version"]) <= version:
                    state[cid] = gid  # the listing is the newer word (or a write that kept the version)
            for cid in [c for c, g in state.items() if g == gid and c not in listing]:
                rec = records.get(cid)
                if rec is None or int(rec["version"]) <= read_up_to:
                    state[cid] = None  # not in the group when it was listed, and no change since
    by_group: dict[str | None, set[str]] = {}
    for cid, now_in in state.items():
        by_group.setdefault(now_in, set()).add(cid)
    members = {tier: by_group.get(gid, set()) for tier, gid in _real_tier_groups(groups).items()}
    return members, to_list


def _tier_count(
    group_id: str | None, members: set[str], expected: set[str], managed: set[str]
) -> TierGroupCount:
    relevant = members & managed
    missing = expected - members
    unexpected = relevant - expected
    return {
        "group_id": group_id,
        "expected": len(expected),
        "actual": len(relevant),
        "members": len(members),
        "other_members": len(members - managed),
        "missing": len(missing),
        "unexpected": len(unexpected),
        "match": not missing and not unexpected,
        "missing_ids": sorted(missing),
        "unexpected_ids": sorted(unexpected),
    }


def verify_group_counts(
    client: LightspeedClient,
    master: Master,
    groups: GroupMap,
    *,
    expected_members: Mapping[str, Iterable[str]] | None = None,
    left_alone: Iterable[str] = (),
    paths: RunPaths | None = None,
) -> GroupCheck:
    """Compare each tier group's members in the POS with what the CSV says.

    Expected members of a tier group: the customers the sync manages with that tier
    (``expected_members``, from the plan: protected, deleted and no-tier customers are not the
    sync's to place), or, without it, every master row with that tier. Customers left alone at
    write time (``left_alone``: changed in the POS, errors) are taken out of both sides. Members
    the sync does not manage with any tier (e.g. a no-tier customer left where they were) are
    counted as ``other_members`` and do not make a mismatch. Per tier: expected, actual (members
    that are expected-to-be-somewhere managed customers), missing, unexpected, and the ids of
    both; the flag ``group_counts_match`` is true when every tier group holds exactly its
    expected customers. A person's change in the POS after the plan is reported, not undone.

    With the run folder (``paths``) and its ``tier_group_members.json``, the members come from the
    plan's state plus the customers feed since the plan's cursor (`_members_by_feed`: requests
    grow with the changes, not with the store); otherwise every tier group is listed.
    A tier group deleted in the POS since the plan raises `GroupDeletedError` (re-plan).
    """
    stats_before = api_stats(client)
    if expected_members is None:
        expected_members = _expected_from_master(master)
    excluded = {str(c) for c in left_alone}
    expected = {t: {str(c) for c in expected_members.get(t, ())} - excluded for t in TIERS}
    managed_anywhere: set[str] = set().union(*expected.values())
    plan = read_plan_doc(paths) if paths is not None else None
    start = read_group_members(paths) if paths is not None else None
    if paths is not None and plan is not None and start is not None and start["plan_id"] == plan["plan_id"]:
        members, listed = _members_by_feed(client, groups, paths, plan, start, excluded)
        method = "feed"
    else:
        members, listed = _members_by_listing(client, groups)
        method = "listing"
    out: dict[str, TierGroupCount] = {}
    for tier in TIERS:
        out[tier] = _tier_count(
            groups.tier_groups.get(tier), members.get(tier, set()), expected[tier], managed_anywhere
        )
    match = all(v["match"] for v in out.values())
    if not match:
        log.warning(
            "Group counts do not match the CSV: %s", {t: (v["expected"], v["actual"]) for t, v in out.items()}
        )
    api = api_diff(api_stats(client), stats_before)
    log.info("Group check (%s, %s groups listed): %s requests", method, len(listed), api["requests"])
    return {
        "group_counts": out,
        "group_counts_match": match,
        "method": method,
        "listed_groups": listed,
        "api": api,
    }


def write_group_check(paths: RunPaths, check: GroupCheck) -> GroupCheck:
    """Write ``runs/<key>/group_check.json`` (the check, or why there was none); returns what it wrote."""
    doc: GroupCheck = {**check, "format_version": FORMAT_VERSION}
    fileio.write_json(paths.run_group_check, doc)
    return doc


def read_group_check(paths: RunPaths) -> GroupCheck | None:
    return group_check_from_json(fileio.read_json(paths.run_group_check), paths.run_group_check)
