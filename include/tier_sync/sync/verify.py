"""The group-count check: does each tier group in Lightspeed hold exactly its expected customers?"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from include.tier_sync import fileio
from include.tier_sync.rules import TIERS
from include.tier_sync.sync.contracts import (
    FORMAT_VERSION,
    GroupCheck,
    TierGroupCount,
    api_diff,
    api_stats,
    group_check_from_json,
    is_null,
)
from include.tier_sync.sync.groups import is_placeholder
from include.tier_sync.sync.plan import MASTER_ID, MASTER_TIER
from include.tier_sync.sync.write import GroupDeletedError

if TYPE_CHECKING:
    import pandas as pd

    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.lightspeed import LightspeedClient
    from include.tier_sync.sync.groups import GroupMap

log = logging.getLogger(__name__)


def _expected_from_master(master: pd.DataFrame) -> dict[str, list[str]]:
    """Tier -> every master row with that tier (when the plan's expected members are unknown)."""
    return {
        t: [str(c) for c, tier in zip(master[MASTER_ID], master[MASTER_TIER], strict=True) if str(tier) == t]
        for t in TIERS
    }


def _live_members(client: LightspeedClient, groups: GroupMap, tier: str) -> set[str]:
    """The group's live members; a tier group gone from the POS (404) is a clear error, not a count."""
    from include.tier_sync.lightspeed import LightspeedNotFound

    group_id = groups.tier_groups.get(tier)
    if group_id is None or is_placeholder(group_id):
        return set()
    try:
        members = client.list_group_members(group_id)
    except LightspeedNotFound as exc:
        raise GroupDeletedError(groups.names.get(group_id) or f"of tier {tier}", group_id) from exc
    return {str(c.get("id")) for c in members if is_null(c.get("deleted_at"))}


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
    }


def verify_group_counts(
    client: LightspeedClient,
    master: pd.DataFrame,
    groups: GroupMap,
    *,
    expected_members: Mapping[str, Iterable[str]] | None = None,
    left_alone: Iterable[str] = (),
) -> GroupCheck:
    """Compare each tier group's members (from the API) with what the CSV says.

    Expected members of a tier group: the customers the sync manages with that tier
    (``expected_members``, from the plan: protected, deleted and no-tier customers are not the
    sync's to place), or, without it, every master row with that tier. Customers left alone at
    write time (``left_alone``: changed in the POS, errors) are taken out of both sides. Members
    the sync does not manage with any tier (e.g. a no-tier customer left where they were) are
    counted as ``other_members`` and do not make a mismatch. Per tier: expected, actual (members
    that are expected-to-be-somewhere managed customers), missing, unexpected; the flag
    ``group_counts_match`` is true when every tier group holds exactly its expected customers.
    A tier group deleted in the POS since the plan raises `GroupDeletedError` (re-plan).
    """
    stats_before = api_stats(client)
    if expected_members is None:
        expected_members = _expected_from_master(master)
    excluded = {str(c) for c in left_alone}
    expected = {t: {str(c) for c in expected_members.get(t, ())} - excluded for t in TIERS}
    managed_anywhere: set[str] = set().union(*expected.values())
    out: dict[str, TierGroupCount] = {}
    for tier in TIERS:
        members = _live_members(client, groups, tier)
        out[tier] = _tier_count(groups.tier_groups.get(tier), members, expected[tier], managed_anywhere)
    match = all(v["match"] for v in out.values())
    if not match:
        log.warning(
            "Group counts do not match the CSV: %s", {t: (v["expected"], v["actual"]) for t, v in out.items()}
        )
    return {
        "group_counts": out,
        "group_counts_match": match,
        "api": api_diff(api_stats(client), stats_before),
    }


def write_group_check(paths: RunPaths, check: GroupCheck) -> GroupCheck:
    """Write ``runs/<key>/group_check.json`` (the check, or why there was none); returns what it wrote."""
    doc: GroupCheck = {**check, "format_version": FORMAT_VERSION}
    fileio.write_json(paths.run_group_check, doc)
    return doc


def read_group_check(paths: RunPaths) -> GroupCheck | None:
    return group_check_from_json(fileio.read_json(paths.run_group_check), paths.run_group_check)
