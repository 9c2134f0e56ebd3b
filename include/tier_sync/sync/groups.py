"""The tier groups and the default group of one store (their ids differ per store).

A customer is *managed* (the sync may move them) when they are in one of the five tier groups,
the default group, or no group at all; see tier-rules.md "Which customers the sync may move".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from include.tier_sync.lightspeed_errors import LightspeedUnavailable
from include.tier_sync.rules import TIERS

if TYPE_CHECKING:
    from include.tier_sync.lightspeed import LightspeedClient
    from include.tier_sync.rules import TierRules
    from include.tier_sync.sync.contracts import GroupMapDoc

log = logging.getLogger(__name__)


class GroupListingError(LightspeedUnavailable):
    """The POS's group listing cannot be trusted right now; nothing was created.

    Raised before any write (the listing looks incomplete, or two reads disagree), so creating
    the tier groups never rests on an empty or odd page. Transient like any unusable answer
    (hence `LightspeedUnavailable`): Airflow retries the task, and a consistent listing lets the
    run go on.
    """


PLACEHOLDER_PREFIX = "missing:"  # dry-run stand-in id for a tier group that does not exist yet
NO_GROUP_LABEL = "(no group)"


@dataclass(frozen=True)
class GroupMap:
    """Tier -> group id, the default group, and every live group's name (for readable reports).

    ``aliases`` are further live groups that carry a tier group's name (e.g. two runs racing to
    create the same group): their members count as being in that tier group, and are moved to
    the canonical one (the oldest).
    """

    tier_groups: dict[str, str]
    default_group_id: str | None
    names: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # extra group id -> tier
    created: tuple[str, ...] = ()  # tiers whose group this run created
    missing: tuple[str, ...] = ()  # tiers whose group is absent (dry run: placeholder ids)
    # id -> name of every live group in the listing this map was read from (None: not known,
    # e.g. rebuilt from plan.json); a later creation step compares it with a fresh listing.
    listing: dict[str, str] | None = field(default=None, compare=False)

    def tier_of_group(self, group_id: str | None) -> str | None:
        """The tier a group stands for, or None for the default group / any other group."""
        if group_id is None:
            return None
        for tier, gid in self.tier_groups.items():
            if gid == group_id:
                return tier
        return self.aliases.get(group_id)

    def is_managed(self, group_id: str | None) -> bool:
        """A group the sync may move customers out of: a tier group, the default group, or none."""
        if group_id is None:
            return True
        return (
            group_id == self.default_group_id
            or group_id in self.tier_groups.values()
            or group_id in self.aliases
        )

    def label(self, group_id: str | None) -> str:
        """Human label of a current group: its tier name, else its group name."""
        if group_id is None:
            return NO_GROUP_LABEL
        tier = self.tier_of_group(group_id)
        if tier is not None:
            return tier
        return self.names.get(group_id, group_id)

    def as_dict(self) -> GroupMapDoc:
        return {
            "tier_groups": dict(self.tier_groups),
            "default_group_id": self.default_group_id,
            "aliases": dict(self.aliases),
            "created": list(self.created),
            "missing": list(self.missing),
        }

    @classmethod
    def from_dict(cls, doc: GroupMapDoc) -> GroupMap:
        """The GroupMap back from `as_dict` (as kept in plan.json; names are not kept)."""
        return cls(
            tier_groups=dict(doc["tier_groups"]),
            default_group_id=doc.get("default_group_id"),
            aliases=dict(doc.get("aliases") or {}),
            created=tuple(doc.get("created") or ()),
            missing=tuple(doc.get("missing") or ()),
        )


def is_placeholder(group_id: str) -> bool:
    return group_id.startswith(PLACEHOLDER_PREFIX)


def _sort_key_group(group: Mapping[str, Any]) -> tuple[str, int, str]:
    """Oldest first: created_at, then version, then id (deterministic canonical pick)."""
    return (str(group.get("created_at") or ""), int(group.get("version") or 0), str(group.get("id")))


def _live_groups_by_name(client: LightspeedClient) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Live (not deleted) groups oldest first, and group name -> their ids, oldest first."""
    groups = [g for g in client.list_customer_groups() if not g.get("deleted_at")]
    groups.sort(key=_sort_key_group)
    by_name: dict[str, list[str]] = {}
    for g in groups:
        by_name.setdefault(str(g.get("name") or ""), []).append(str(g["id"]))
    return groups, by_name


def _default_group_id(
    groups: list[dict[str, Any]], by_name: Mapping[str, list[str]], rules: TierRules
) -> str | None:
    default_ids = by_name.get(rules.default_group_name) or [
        str(g["id"]) for g in groups if str(g.get("group_id") or "") == rules.default_group_code
    ]
    return default_ids[0] if default_ids else None


def _listing(groups: list[dict[str, Any]]) -> dict[str, str]:
    return {str(g["id"]): str(g.get("name") or "") for g in groups}


def _differences(first: Mapping[str, str], second: Mapping[str, str]) -> list[str]:
    """Groups present in one read and not the other (or renamed between them), readable."""
    out: list[str] = []
    for gid in sorted(first.keys() | second.keys()):
        a, b = first.get(gid), second.get(gid)
        if a == b:
            continue
        if b is None:
            out.append(f"{a!r} ({gid}) only in the first read")
        elif a is None:
            out.append(f"{b!r} ({gid}) only in the second read")
        else:
            out.append(f"{gid} named {a!r}, then {b!r}")
    return out


def _check_before_creating(
    first: Mapping[str, str],
    second: Mapping[str, str],
    default_id: str | None,
    rules: TierRules,
    missing: list[str],
) -> None:
    """Refuse to create any group unless two reads agree and the default group is listed."""
    diff = _differences(first, second)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise GroupListingError(
            f"the customer group listing differs between two reads ({'; '.join(diff[:3])}{more}): "
            f"the POS listing is not trustworthy right now; nothing was created (tier groups that "
            f"looked missing: {', '.join(missing)}); retry later"
        )
    if default_id is None:
        raise GroupListingError(
            f"the group listing does not contain the store's default group ({rules.default_group_name!r} / "
            f"code {rules.default_group_code}): the listing looks incomplete; nothing was created "
            f"(tier groups that looked missing: {', '.join(missing)}). Retry later; if the store really "
            "has no default group, check default_group_name / default_group_code in tier_sync_rules"
        )


def _tier_ids(by_name: Mapping[str, list[str]], rules: TierRules) -> tuple[dict[str, list[str]], list[str]]:
    """Tier -> live group ids carrying its group name (oldest first), and the tiers with none."""
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for tier in TIERS:
        name = rules.group_for(tier)
        if name is None:  # pragma: no cover - every tier in TIERS has a group
            continue
        ids = by_name.get(name, [])
        if ids:
            found[tier] = ids
        else:
            missing.append(tier)
    return found, missing


def resolve_groups(
    client: LightspeedClient, rules: TierRules, *, create_missing: bool, planned: GroupMap | None = None
) -> GroupMap:
    """Find the five tier groups and the default group by name (ids differ per store).

    A missing tier group is created when ``create_missing`` (a real, writing run); otherwise (dry
    run, superseded run) it is reported in ``missing`` and stands in as ``missing:<tier>`` so its
    moves can still be planned and shown. The default group is the live group named
    ``rules.default_group_name``, failing that the one with ``group_id == rules.default_group_code``
    (API Decision 5); when neither exists only customers with no group at all count as "default".

    Creating is never done on one read: an empty or odd listing page would otherwise make every
    tier group look missing and be created again (duplicates in the POS). Before creating, a
    second listing is compared with the first: ``planned``'s (the map the plan was made from),
    else a fresh re-list. Any group in one read and not the other, or a listing without the
    default group (the store always has one, so the listing looks cut), raises
    `GroupListingError` and nothing is created; only tiers missing from both reads are created.
    """
    groups, by_name = _live_groups_by_name(client)
    listing = _listing(groups)
    default_id = _default_group_id(groups, by_name, rules)
    found, missing = _tier_ids(by_name, rules)
    if create_missing and missing:
        if planned is not None and planned.listing is not None:
            first = planned.listing
        else:  # this read is the first; re-list for the second
            first, listing = listing, _listing(_live_groups_by_name(client)[0])
        _check_before_creating(first, listing, default_id, rules, missing)

    names = dict(listing)
    tier_groups: dict[str, str] = {}
    aliases: dict[str, str] = {}
    created: list[str] = []
    for tier in TIERS:
        name = rules.group_for(tier)
        ids = found.get(tier)
        if name is None:  # pragma: no cover - every tier in TIERS has a group
            continue
        if ids:
            tier_groups[tier] = ids[0]
            aliases.update((extra, tier) for extra in ids[1:])
            if len(ids) > 1:
                log.warning("Tier %s: %s live groups named %r; using the oldest", tier, len(ids), name)
        elif create_missing:
            gid = str(client.create_customer_group(name)["id"])
            tier_groups[tier] = gid
            names[gid] = name
            created.append(tier)
            log.info("Created customer group %r for tier %s (id %s)", name, tier, gid)
        else:
            tier_groups[tier] = f"{PLACEHOLDER_PREFIX}{tier}"
            names[tier_groups[tier]] = name
            log.info("Customer group %r for tier %s is missing (not created: no writes)", name, tier)

    if default_id is not None and default_id in tier_groups.values():
        raise ValueError("the default customer group cannot also be a tier group; check tier_sync_rules")
    if default_id is None:
        log.warning(
            "No default customer group (name %r or group_id %r) found",
            rules.default_group_name,
            rules.default_group_code,
        )
    return GroupMap(
        tier_groups=tier_groups,
        default_group_id=default_id,
        names=names,
        aliases=aliases,
        created=tuple(created),
        missing=() if create_missing else tuple(missing),
        listing=listing,
    )
