"""Sync of loyalty tiers to Lightspeed customer groups: plan, batches, writes, sync log, group check.

This is the only code that changes the store's till, so it is built to be exact, idempotent and
hard to turn into a mass mistake:

* **Who may move** follows tier-rules.md "Which customers the sync may move" exactly. A customer is
  *managed* when not deleted, tier not None, and currently in one of the five tier groups or the
  default group (or in no group at all, which the POS shows as the default). Everyone else is left
  exactly where they are and counted (protected / deleted / no_tier / missing).
* **Current group comes from the live data** (the newest extracted version of each customer), never
  from the CSV, and is re-checked right before writing against the customers version feed since
  the plan's cursor: anyone a person moved meanwhile is left alone (``changed_in_pos``).
* **Circuit breaker**: too many real changes (share of managed customers) or too many downgrades
  stop the run before any write, unless ``allow_mass_change``.
* **Batches** are files under the run's ``sync_plan/`` folder; XCom carries only small refs. One
  batch targets one group and holds up to ``calls_per_batch`` membership calls of <= 100 ids; the
  batch size grows so that a run never maps more than ``max_batches`` (256, far below Airflow's
  ``max_map_length`` of 1024) instances at any store size.
* **Idempotent writes**: adding a customer to a group is naturally idempotent; before each call the
  batch records the ids it is about to send (``.progress.json``), so a retried batch recognises its
  own earlier, possibly unacknowledged, writes in the feed and reports them as ``updated`` without
  a second write. A customer a person put in the target group counts as ``skipped``.
* Every batch writes its result JSON next to its batch file, so the sync log can be aggregated from
  files even when an XCom is missing, and a batch that never finished is reported, per customer, as
  an error.

The functions take plain data, DataFrames and a client; nothing here imports Airflow.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from include.tier_sync import fileio
from include.tier_sync.runtime import is_newest_run, iso, newest_published_as_of, to_utc
from include.tier_sync.settings import ALL_TIERS, NO_TIER, TIERS

if TYPE_CHECKING:
    from include.tier_sync.lightspeed import LightspeedClient
    from include.tier_sync.runtime import RunPaths
    from include.tier_sync.settings import TierRules

log = logging.getLogger(__name__)

CALL_SIZE = 100  # Decision 4: at most 100 customer ids per membership call.
MAX_BATCHES = 256  # well under Airflow's max_map_length (1024)
CALLS_PER_BATCH = 5
PLACEHOLDER_PREFIX = "missing:"  # dry-run stand-in id for a tier group that does not exist yet
NO_GROUP_LABEL = "(no group)"
BATCH_FORMAT = "tier-sync-batch/1"
PLAN_FORMAT = "tier-sync-plan/1"
PLAN_FILE = "plan.json"
API_KEYS = ("requests", "rate_limited", "retries")

MASTER_ID = "Customer ID"
MASTER_TIER = "Tier"


class MassChangeError(RuntimeError):
    """The circuit breaker tripped: the plan would change too many customers at once."""

    def __init__(self, message: str, details: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.details = dict(details)


class SyncFailed(RuntimeError):
    """Some customers could not be synced; raised after the sync log is written."""


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "tier_groups": dict(self.tier_groups),
            "default_group_id": self.default_group_id,
            "aliases": dict(self.aliases),
            "created": list(self.created),
            "missing": list(self.missing),
        }


def _sort_key_group(group: Mapping[str, Any]) -> tuple[str, int, str]:
    """Oldest first: created_at, then version, then id (deterministic canonical pick)."""
    return (str(group.get("created_at") or ""), int(group.get("version") or 0), str(group.get("id")))


def resolve_groups(client: LightspeedClient, rules: TierRules, *, create_missing: bool) -> GroupMap:
    """Find the five tier groups and the default group by name (ids differ per store).

    A missing tier group is created when ``create_missing`` (a real, writing run); otherwise (dry
    run, superseded run) it is reported in ``missing`` and stands in as ``missing:<tier>`` so its
    moves can still be planned and shown. The default group is the live group named
    ``rules.default_group_name``, failing that the one with ``group_id == rules.default_group_code``
    (API Decision 5); when neither exists only customers with no group at all count as "default".
    """
    groups = [g for g in client.list_customer_groups() if not g.get("deleted_at")]
    groups.sort(key=_sort_key_group)
    names = {str(g["id"]): str(g.get("name") or "") for g in groups}
    by_name: dict[str, list[str]] = {}
    for g in groups:
        by_name.setdefault(str(g.get("name") or ""), []).append(str(g["id"]))

    tier_groups: dict[str, str] = {}
    aliases: dict[str, str] = {}
    created: list[str] = []
    missing: list[str] = []
    for tier in TIERS:
        name = rules.group_for(tier)
        if name is None:  # pragma: no cover - every tier in TIERS has a group
            continue
        ids = by_name.get(name, [])
        if ids:
            tier_groups[tier] = ids[0]
            for extra in ids[1:]:
                aliases[extra] = tier
            if len(ids) > 1:
                log.warning("Tier %s: %s live groups named %r; using the oldest", tier, len(ids), name)
        elif create_missing:
            group = client.create_customer_group(name)
            gid = str(group["id"])
            tier_groups[tier] = gid
            names[gid] = name
            created.append(tier)
            log.info("Created customer group %r for tier %s (id %s)", name, tier, gid)
        else:
            tier_groups[tier] = f"{PLACEHOLDER_PREFIX}{tier}"
            names[tier_groups[tier]] = name
            missing.append(tier)
            log.info("Customer group %r for tier %s is missing (not created: no writes)", name, tier)

    default_ids = by_name.get(rules.default_group_name) or [
        str(g["id"]) for g in groups if str(g.get("group_id") or "") == rules.default_group_code
    ]
    default_id = default_ids[0] if default_ids else None
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
        missing=tuple(missing),
    )


def is_placeholder(group_id: str) -> bool:
    return group_id.startswith(PLACEHOLDER_PREFIX)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """One customer to put into the group of ``tier``; ``from_group_id`` is the live group at plan time."""

    customer_id: str
    tier: str
    to_group_id: str
    from_group_id: str | None
    from_label: str

    @property
    def is_change(self) -> bool:
        """False for a force_resync re-assert of the group the customer is already in."""
        return self.from_group_id != self.to_group_id

    @property
    def is_downgrade(self) -> bool:
        """From a higher tier group to a lower one (moving out of the default group never is)."""
        if not self.is_change or self.from_label not in TIERS:
            return False
        return TIERS.index(self.tier) > TIERS.index(self.from_label)

    @property
    def key(self) -> str:
        return f"{self.from_label}->{self.tier}"

    def as_dict(self) -> dict[str, Any]:
        return {"customer_id": self.customer_id, "from_group_id": self.from_group_id, "from": self.from_label}


@dataclass
class Plan:
    """The exact set of moves of one run plus the counts the sync log reports."""

    moves: list[Move]
    total_customers: int
    managed: int
    protected: int
    deleted: int
    no_tier: int
    missing: int  # in the master CSV but absent from the live customer data
    unchanged: int
    deferred_by_limit: int
    tier_breakdown: dict[str, int]
    force_resync: bool = False
    limit: int | None = None
    # Tier -> ids that should be in that tier's group after a complete sync (managed customers
    # only, whether moved or already there); used by the group-count check.
    expected_members: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changes(self) -> list[Move]:
        return [m for m in self.moves if m.is_change]

    @property
    def downgrades(self) -> int:
        return sum(1 for m in self.moves if m.is_downgrade)

    def move_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(m.key for m in self.moves).items()))

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts (no customer ids): what plan.json and the sync log carry."""
        return {
            "total_customers": self.total_customers,
            "managed": self.managed,
            "planned_moves": len(self.moves),
            "changes": len(self.changes),
            "reasserts": len(self.moves) - len(self.changes),
            "downgrades": self.downgrades,
            "protected": self.protected,
            "deleted": self.deleted,
            "no_tier": self.no_tier,
            "missing": self.missing,
            "unchanged": self.unchanged,
            "deferred_by_limit": self.deferred_by_limit,
            "force_resync": self.force_resync,
            "limit": self.limit,
            "tier_breakdown": dict(self.tier_breakdown),
            "moves": self.move_counts(),
        }


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def live_customers(customers: pd.DataFrame) -> pd.DataFrame:
    """The newest version of each customer (the order store keeps every version it saw)."""
    if customers.empty:
        return customers.loc[:, [c for c in ("id", "customer_group_id", "deleted_at") if c in customers]]
    if "version" in customers.columns:
        customers = customers.sort_values(["id", "version"], kind="stable")
    return customers.drop_duplicates("id", keep="last").reset_index(drop=True)


def _current_groups(current: pd.DataFrame) -> dict[str, tuple[str | None, bool]]:
    """id -> (customer_group_id or None, deleted) from the live customers frame."""
    frame = live_customers(current) if "version" in current.columns else current
    out: dict[str, tuple[str | None, bool]] = {}
    deleted_col = frame["deleted_at"] if "deleted_at" in frame.columns else [None] * len(frame)
    for cid, gid, deleted_at in zip(frame["id"], frame["customer_group_id"], deleted_col, strict=True):
        group = None if _is_null(gid) else str(gid)
        out[str(cid)] = (group, not _is_null(deleted_at))
    return out


def plan_moves(
    master: pd.DataFrame,
    current: pd.DataFrame,
    groups: GroupMap,
    rules: TierRules,
    *,
    force_resync: bool = False,
    limit: int | None = None,
) -> Plan:
    """Every customer's fate, per tier-rules.md "Which customers the sync may move".

    ``master`` is the run's master CSV (read with ``keep_default_na=False`` so tier "None" stays a
    string); ``current`` holds the live customers (``id``, ``customer_group_id``, ``deleted_at``,
    optionally ``version``; the newest version per id is used). Checks, first match wins:
    not in live data -> missing; deleted -> deleted; tier None -> no_tier; current group not
    managed -> protected; current group is the tier's group -> unchanged (a move when
    ``force_resync``, re-asserting it); else a move. Moves are ordered by target tier (highest
    first) then customer id, so ``limit`` (keep the first N) is reproducible.
    """
    if MASTER_ID not in master.columns or MASTER_TIER not in master.columns:
        raise ValueError(f"master CSV needs columns {MASTER_ID!r} and {MASTER_TIER!r}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    ids = [str(v).strip() for v in master[MASTER_ID]]
    tiers = [str(v).strip() for v in master[MASTER_TIER]]
    bad = sorted({t for t in tiers if t not in ALL_TIERS})
    if bad:
        raise ValueError(f"master CSV has unknown tiers {bad}; known: {list(ALL_TIERS)}")
    dupes = [cid for cid, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ValueError(f"master CSV lists {len(dupes)} customer ids more than once (e.g. {dupes[0]})")
    if any(not cid for cid in ids):
        raise ValueError("master CSV has an empty Customer ID")

    live = _current_groups(current)
    counts = Counter[str]()
    moves: list[Move] = []
    expected: dict[str, list[str]] = {t: [] for t in TIERS}
    for cid, tier in zip(ids, tiers, strict=True):
        state = live.get(cid)
        if state is None:
            counts["missing"] += 1
            continue
        group_id, deleted = state
        if deleted:
            counts["deleted"] += 1
        elif tier == NO_TIER:
            counts["no_tier"] += 1
        elif not groups.is_managed(group_id):
            counts["protected"] += 1
        else:
            counts["managed"] += 1
            target = groups.tier_groups[tier]
            expected[tier].append(cid)
            if group_id == target and not force_resync:
                counts["unchanged"] += 1
                continue
            if group_id == target:
                counts["unchanged"] += 1  # still unchanged in substance; re-asserted below
            moves.append(Move(cid, tier, target, group_id, groups.label(group_id)))

    moves.sort(key=lambda m: (TIERS.index(m.tier), m.customer_id))
    deferred = 0
    if limit is not None and len(moves) > limit:
        deferred = len(moves) - limit
        moves = moves[:limit]
    breakdown = Counter(tiers)
    plan = Plan(
        moves=moves,
        total_customers=len(ids),
        managed=counts["managed"],
        protected=counts["protected"],
        deleted=counts["deleted"],
        no_tier=counts["no_tier"],
        missing=counts["missing"],
        unchanged=counts["unchanged"],
        deferred_by_limit=deferred,
        tier_breakdown={t: breakdown.get(t, 0) for t in ALL_TIERS},
        force_resync=force_resync,
        limit=limit,
        expected_members={t: sorted(v) for t, v in expected.items()},
    )
    log.info(
        "Sync plan: %s customers, %s managed, %s moves (%s changes, %s downgrades), %s protected, "
        "%s deleted, %s no tier, %s missing, %s deferred by limit",
        plan.total_customers,
        plan.managed,
        len(plan.moves),
        len(plan.changes),
        plan.downgrades,
        plan.protected,
        plan.deleted,
        plan.no_tier,
        plan.missing,
        plan.deferred_by_limit,
    )
    return plan


# --------------------------------------------------------------------------------------------
# Circuit breaker
# --------------------------------------------------------------------------------------------


def circuit_status(plan: Plan, rules: TierRules) -> dict[str, Any]:
    """What the breaker sees: real changes (re-asserts excluded) against the managed customers.

    Evaluated on the moves that would be written (after ``limit``): an explicit limit is the
    operator's own bound on the blast radius.
    """
    changes = len(plan.changes)
    allowed = rules.max_move_fraction * plan.managed
    reasons = []
    if changes > allowed:
        reasons.append(
            f"{changes} changes exceed {rules.max_move_fraction:.0%} of {plan.managed} managed customers"
        )
    if plan.downgrades > rules.max_downgrades:
        reasons.append(f"{plan.downgrades} downgrades exceed the maximum of {rules.max_downgrades}")
    return {
        "tripped": bool(reasons),
        "reasons": reasons,
        "changes": changes,
        "managed": plan.managed,
        "change_fraction": round(changes / plan.managed, 4) if plan.managed else 0.0,
        "max_move_fraction": rules.max_move_fraction,
        "downgrades": plan.downgrades,
        "max_downgrades": rules.max_downgrades,
    }


def check_circuit(plan: Plan, rules: TierRules, allow_mass_change: bool) -> None:
    """Raise MassChangeError when the plan is a mass change, unless explicitly allowed."""
    status = circuit_status(plan, rules)
    if not status["tripped"]:
        return
    message = "Sync circuit breaker: " + "; ".join(status["reasons"])
    if allow_mass_change:
        log.warning("%s; continuing because allow_mass_change=true", message)
        return
    raise MassChangeError(
        message + ". Nothing was written. Re-run with allow_mass_change=true if this is intended.",
        status,
    )


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _batch_count(sizes: Iterable[int], calls_per_batch: int) -> int:
    return sum(math.ceil(math.ceil(n / CALL_SIZE) / calls_per_batch) for n in sizes if n)


def batch_calls_needed(sizes: Sequence[int], *, max_batches: int, calls_per_batch: int) -> int:
    """Smallest calls-per-batch >= ``calls_per_batch`` that keeps the batch count <= ``max_batches``."""
    targets = sum(1 for n in sizes if n)
    if targets > max_batches:
        raise ValueError(f"max_batches={max_batches} is below the number of target groups ({targets})")
    cpb = max(1, calls_per_batch)
    while _batch_count(sizes, cpb) > max_batches:
        total_calls = sum(math.ceil(n / CALL_SIZE) for n in sizes)
        cpb = max(cpb + 1, math.ceil(total_calls / max(1, max_batches - targets)))
    return cpb


def _batch_path(paths: RunPaths, index: int, suffix: str = ".json") -> str:
    return fileio.join(paths.run_sync_plan_dir, f"batch-{index:04d}{suffix}")


def write_batches(
    plan: Plan,
    paths: RunPaths,
    *,
    customers_cursor: int,
    max_batches: int = MAX_BATCHES,
    calls_per_batch: int = CALLS_PER_BATCH,
    groups: GroupMap | None = None,
    plan_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write one JSON file per batch plus ``plan.json`` and return the small refs for XCom.

    A batch targets one group and holds up to ``calls_per_batch`` calls of <= 100 ids (grown when
    needed to stay within ``max_batches``). ``plan.json`` lists exactly this plan's refs under a
    fresh ``plan_id``; result files of an older plan of the same run (a cleared, re-run task) carry
    another ``plan_id`` and are ignored by the log. ``extra`` is merged into ``plan.json``.
    """
    plan_id = plan_id or uuid.uuid4().hex
    by_tier: dict[str, list[Move]] = {t: [] for t in TIERS}
    for move in plan.moves:
        by_tier[move.tier].append(move)
    cpb = batch_calls_needed(
        [len(v) for v in by_tier.values()], max_batches=max_batches, calls_per_batch=calls_per_batch
    )
    per_batch = cpb * CALL_SIZE
    total = sum(math.ceil(len(v) / per_batch) for v in by_tier.values())
    refs: list[dict[str, Any]] = []
    for tier in TIERS:
        for chunk in _chunks(by_tier[tier], per_batch):
            index = len(refs) + 1
            group_id = chunk[0].to_group_id
            ref_path = _batch_path(paths, index)
            batch = {
                "format": BATCH_FORMAT,
                "plan_id": plan_id,
                "index": index,
                "of": total,
                "tier": tier,
                "group_id": group_id,
                "group_name": groups.names.get(group_id) if groups is not None else None,
                "customers_cursor": int(customers_cursor),
                "as_of": iso(paths.as_of),
                "moves": [m.as_dict() for m in chunk],
            }
            fileio.write_json(ref_path, batch)
            refs.append(
                {
                    "ref": ref_path,
                    "tier": tier,
                    "group_id": group_id,
                    "size": len(chunk),
                    "batch": f"batch {index}/{total}: {tier} ({len(chunk)})",
                }
            )
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "plan_id": plan_id,
        "as_of": iso(paths.as_of),
        "customers_cursor": int(customers_cursor),
        "calls_per_batch": cpb,
        "summary": plan.summary(),
        "groups": groups.as_dict() if groups is not None else None,
        "refs": refs,
        "dispatched": True,
    }
    if extra:
        doc.update(extra)
    write_plan_doc(paths, doc)
    log.info(
        "Sync plan %s: %s moves in %s batches (<= %s calls each)", plan_id, len(plan.moves), len(refs), cpb
    )
    return refs


def write_plan_doc(paths: RunPaths, doc: Mapping[str, Any]) -> str:
    """Write ``sync_plan/plan.json`` (the commit point the sync log aggregates from)."""
    target = fileio.join(paths.run_sync_plan_dir, PLAN_FILE)
    fileio.write_json(target, dict(doc))
    return target


def read_plan_doc(paths: RunPaths) -> dict[str, Any] | None:
    doc = fileio.read_json(fileio.join(paths.run_sync_plan_dir, PLAN_FILE))
    return doc if isinstance(doc, dict) else None


def write_expected_members(plan: Plan, paths: RunPaths) -> str:
    """Tier -> customer ids the tier group should hold (for verify_group_counts), next to plan.json."""
    target = fileio.join(paths.run_sync_plan_dir, "expected_members.json")
    fileio.write_json(target, plan.expected_members)
    return target


# --------------------------------------------------------------------------------------------
# Writing one batch
# --------------------------------------------------------------------------------------------


def _stats(client: Any) -> dict[str, int]:
    stats = getattr(client, "stats", None)
    raw = stats.as_dict() if stats is not None else {}
    return {k: int(raw.get(k, 0)) for k in API_KEYS}


def _diff(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in API_KEYS}


def result_path(ref: str) -> str:
    return ref[: -len(".json")] + ".result.json" if ref.endswith(".json") else ref + ".result.json"


def progress_path(ref: str) -> str:
    return ref[: -len(".json")] + ".progress.json" if ref.endswith(".json") else ref + ".progress.json"


def _ref_path(ref: Mapping[str, Any] | str) -> str:
    return ref if isinstance(ref, str) else str(ref["ref"])


def recheck_customers(
    client: LightspeedClient, ids: Iterable[str], customers_cursor: int
) -> dict[str, dict[str, Any]]:
    """Newest state of ``ids`` among customers changed since the plan's cursor (deleted included).

    One pass over the version feed: cheap (only what changed since the extraction), complete
    (unlike search), and it sees our own earlier writes as well as a person's.
    """
    wanted = set(ids)
    seen: dict[str, dict[str, Any]] = {}
    for page in client.iter_pages("/customers", after=int(customers_cursor), params={"deleted": "true"}):
        for record in page.data:
            cid = str(record.get("id"))
            if cid not in wanted:
                continue
            version = int(record.get("version") or 0)
            if cid not in seen or version >= int(seen[cid].get("version") or 0):
                seen[cid] = record
    return seen


def sync_batch(
    ref: Mapping[str, Any] | str, client: LightspeedClient, *, writes_allowed: bool
) -> dict[str, Any]:
    """Write one batch: re-check, then membership calls (with per-customer PUT fallback).

    Per customer of the batch (``from`` = planned from-group, ``to`` = target):

    * not changed since the plan, or changed but still in ``from`` -> written;
    * now in ``to``: ``updated`` when an earlier attempt of this batch sent it (a retry after an
      unacknowledged write), else ``skipped`` (a person did it); no second write. A force_resync
      re-assert (``from == to``) is written again unless an earlier attempt sent it;
    * in any other group -> ``changed_in_pos``, left alone;
    * deleted meanwhile -> ``skipped``.

    A membership call refused with a 4xx other than 429 falls back to GET + PUT per customer of
    that call: a 404 or a refused PUT becomes an ``error_details`` entry and the others go on.
    5xx, resets and 429 are the client's to retry; when it gives up (or auth fails) this raises,
    after writing a ``failed`` result file, so Airflow retries the batch, idempotently.
    With ``writes_allowed=False`` nothing is sent at all (zero requests): every move is ``skipped``.
    """
    ref_path = _ref_path(ref)
    batch = fileio.read_json(ref_path)
    if not isinstance(batch, dict) or batch.get("format") != BATCH_FORMAT:
        raise ValueError(f"{ref_path} is not a sync batch file")
    group_id = str(batch["group_id"])
    moves: list[dict[str, Any]] = list(batch["moves"])
    result = _new_result(ref_path, batch)
    stats_before = _stats(client)
    try:
        if not writes_allowed:
            result["skipped"] = len(moves)
            result["skip_reasons"] = {"writes_not_allowed": len(moves)}
            result["written"] = False
        else:
            if is_placeholder(group_id):
                raise ValueError(f"batch {ref_path} targets a group that does not exist ({group_id})")
            _write_batch(client, batch, moves, result, ref_path)
            result["written"] = True
        result["status"] = "done"
    except Exception as exc:
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["api"] = _diff(_stats(client), stats_before)
        fileio.write_json(result_path(ref_path), result)
        raise
    result["api"] = _diff(_stats(client), stats_before)
    fileio.write_json(result_path(ref_path), result)
    log.info(
        "Batch %s of %s (%s, %s customers): %s updated, %s skipped, %s changed in POS, %s errors; %s requests",
        batch.get("index"),
        batch.get("of", "?"),
        batch.get("tier"),
        len(moves),
        result["updated"],
        result["skipped"],
        result["changed_in_pos"],
        result["errors"],
        result["api"]["requests"],
    )
    return result


def _new_result(ref_path: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "ref": ref_path,
        "plan_id": batch.get("plan_id"),
        "index": batch.get("index"),
        "tier": batch.get("tier"),
        "group_id": batch.get("group_id"),
        "size": len(batch.get("moves") or []),
        "status": "running",
        "written": False,
        "updated": 0,
        "skipped": 0,
        "changed_in_pos": 0,
        "errors": 0,
        "skip_reasons": {},
        "moves_applied": {},
        "changed_in_pos_ids": [],
        "deleted_ids": [],
        "error_details": [],
        "api": dict.fromkeys(API_KEYS, 0),
    }


def _write_batch(
    client: LightspeedClient,
    batch: Mapping[str, Any],
    moves: list[dict[str, Any]],
    result: dict[str, Any],
    ref_path: str,
) -> None:
    from include.tier_sync.lightspeed import LightspeedClientError, LightspeedNotFound

    group_id = str(batch["group_id"])
    tier = str(batch["tier"])
    plan_id = batch.get("plan_id")
    progress_file = progress_path(ref_path)
    progress = fileio.read_json(progress_file) or {}
    attempted: set[str] = (
        set(progress.get("attempted") or []) if progress.get("plan_id") == plan_id else set()
    )

    live = recheck_customers(client, (m["customer_id"] for m in moves), int(batch["customers_cursor"]))
    applied: Counter[str] = Counter()
    skip_reasons: Counter[str] = Counter()
    to_write: list[dict[str, Any]] = []
    for move in moves:
        cid = str(move["customer_id"])
        record = live.get(cid)
        if record is None:
            to_write.append(move)
            continue
        if not _is_null(record.get("deleted_at")):
            skip_reasons["deleted"] += 1
            result["deleted_ids"].append(cid)
            continue
        now_group = None if _is_null(record.get("customer_group_id")) else str(record["customer_group_id"])
        if now_group == group_id and cid in attempted:
            applied[f"{move['from']}->{tier}"] += 1  # our earlier, unacknowledged write landed
        elif now_group == group_id and move.get("from_group_id") != group_id:
            skip_reasons["already_in_target"] += 1
        elif now_group == move.get("from_group_id"):
            to_write.append(move)
        else:
            result["changed_in_pos_ids"].append(cid)

    for call in _chunks(to_write, CALL_SIZE):
        ids = [str(m["customer_id"]) for m in call]
        attempted.update(ids)
        fileio.write_json(progress_file, {"plan_id": plan_id, "attempted": sorted(attempted)})
        try:
            client.add_customers_to_group(group_id, ids)
        except (LightspeedClientError, LightspeedNotFound) as exc:
            status = getattr(exc, "status", 404)
            log.warning(
                "Membership call for %s customers refused (HTTP %s); falling back to one PUT each",
                len(ids),
                status,
            )
            _fallback_per_customer(client, group_id, tier, call, result, applied, skip_reasons)
            continue
        for move in call:
            applied[f"{move['from']}->{tier}"] += 1

    result["moves_applied"] = dict(sorted(applied.items()))
    result["updated"] = sum(applied.values())
    result["skip_reasons"] = dict(sorted(skip_reasons.items()))
    result["skipped"] = sum(skip_reasons.values())
    result["changed_in_pos"] = len(result["changed_in_pos_ids"])
    result["errors"] = len(result["error_details"])


def _fallback_per_customer(
    client: LightspeedClient,
    group_id: str,
    tier: str,
    call: Sequence[dict[str, Any]],
    result: dict[str, Any],
    applied: Counter[str],
    skip_reasons: Counter[str],
) -> None:
    """Decision 4: GET the customer, change customer_group_id, PUT the whole object back.

    The GET doubles as a last re-check: a customer who is no longer in the planned from-group
    (and not already in the target) is left alone.
    """
    from include.tier_sync.lightspeed import LightspeedClientError, LightspeedNotFound

    for move in call:
        cid = str(move["customer_id"])
        try:
            customer = dict(client.get_customer(cid))
            if not _is_null(customer.get("deleted_at")):
                skip_reasons["deleted"] += 1
                result["deleted_ids"].append(cid)
                continue
            now_group = (
                None if _is_null(customer.get("customer_group_id")) else str(customer["customer_group_id"])
            )
            if now_group == group_id and move.get("from_group_id") != group_id:
                applied[f"{move['from']}->{tier}"] += 1  # the refused call may have applied it
                continue
            if now_group != move.get("from_group_id"):
                result["changed_in_pos_ids"].append(cid)
                continue
            customer["customer_group_id"] = group_id
            client.put_customer(cid, customer)
            applied[f"{move['from']}->{tier}"] += 1
        except LightspeedNotFound:
            result["error_details"].append({"customer_id": cid, "error": "not found (HTTP 404)"})
        except LightspeedClientError as exc:
            status = getattr(exc, "status", None)
            result["error_details"].append({"customer_id": cid, "error": f"refused (HTTP {status})"})


# --------------------------------------------------------------------------------------------
# Collecting results, the sync log
# --------------------------------------------------------------------------------------------


def load_batch_results(
    paths: RunPaths, xcom_results: Iterable[Mapping[str, Any] | None] = ()
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The current plan.json and one result per dispatched batch, from files first, XCom second.

    A batch with no result, or whose last attempt failed, is turned into a result that reports
    each of its customers as an error (its writes may be partial; the next run re-plans them).
    """
    doc = read_plan_doc(paths)
    if doc is None:
        return None, [dict(r) for r in xcom_results if r]
    plan_id = doc.get("plan_id")
    from_xcom = {
        str(r.get("ref")): dict(r) for r in xcom_results if r and r.get("plan_id") in (None, plan_id)
    }
    results: list[dict[str, Any]] = []
    if not doc.get("dispatched", True):
        return doc, results
    for ref in doc.get("refs") or []:
        ref_path = str(ref["ref"])
        found = fileio.read_json(result_path(ref_path))
        if not (isinstance(found, dict) and found.get("plan_id") == plan_id):
            found = from_xcom.get(ref_path)
        if found is not None and found.get("status", "done") == "done":
            results.append(found)
            continue
        batch = fileio.read_json(ref_path) or {"moves": []}
        reason = (found or {}).get("error") or "batch did not finish"
        failed = _new_result(ref_path, batch)
        failed["status"] = "failed"
        failed["error"] = reason
        failed["api"] = dict((found or {}).get("api") or failed["api"])
        failed["error_details"] = [
            {"customer_id": m["customer_id"], "error": f"batch failed: {reason}"}
            for m in batch.get("moves", [])
        ]
        failed["errors"] = len(failed["error_details"])
        results.append(failed)
    return doc, results


def _sum_api(*parts: Mapping[str, Any] | None) -> dict[str, int]:
    total = dict.fromkeys(API_KEYS, 0)
    for part in parts:
        if not part:
            continue
        for key in API_KEYS:
            total[key] += int(part.get(key) or 0)
    return total


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
) -> dict[str, Any]:
    """The sync log: run identity, plan counts, aggregated batch outcomes, API use, group check.

    ``synced`` is forced to False when no batch wrote (dry run, superseded run, breaker). Only
    customer ids appear, never names, emails or tokens. ``api`` adds the plan step's
    ``api_totals``, every batch's and the group check's.
    """
    summary = dict(plan_summary or {})
    errors = [d for r in batch_results for d in r.get("error_details") or []]
    changed = [c for r in batch_results for c in r.get("changed_in_pos_ids") or []]
    skip_reasons: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    for r in batch_results:
        skip_reasons.update(r.get("skip_reasons") or {})
        applied.update(r.get("moves_applied") or {})
    planned = int(summary.get("planned_moves") or 0)
    # Planned moves that no batch was dispatched for (dry run, superseded run, breaker) are skipped.
    not_dispatched = max(0, planned - sum(int(r.get("size") or 0) for r in batch_results))
    if not_dispatched:
        skip_reasons["not_written"] += not_dispatched
    if planned and not any(r.get("written") for r in batch_results):
        synced = False
    started = iso(to_utc(started_at)) if started_at is not None else None
    log_doc: dict[str, Any] = {
        "dag_id": identity.get("dag_id"),
        "run_id": identity.get("run_id"),
        "run_type": identity.get("run_type"),
        "logical_date": _iso_or_none(identity.get("logical_date")),
        "as_of": _iso_or_none(identity.get("as_of")),
        "started_at": started,
        "finished_at": iso(datetime.now(UTC)),
        "dry_run": bool(dry_run),
        "synced": bool(synced),
        "skipped_reason": skipped_reason,
        "total_customers": int(summary.get("total_customers") or 0),
        "managed": int(summary.get("managed") or 0),
        "planned_moves": planned,
        "updated": sum(int(r.get("updated") or 0) for r in batch_results),
        "skipped": sum(skip_reasons.values()),
        "skip_reasons": dict(sorted(skip_reasons.items())),
        "protected": int(summary.get("protected") or 0),
        "deleted": int(summary.get("deleted") or 0),
        "no_tier": int(summary.get("no_tier") or 0),
        "missing": int(summary.get("missing") or 0),
        "unchanged": int(summary.get("unchanged") or 0),
        "deferred_by_limit": int(summary.get("deferred_by_limit") or 0),
        "force_resync": bool(summary.get("force_resync")),
        "limit": summary.get("limit"),
        "changed_in_pos": len(changed),
        "changed_in_pos_ids": sorted(changed),
        "errors": len(errors),
        "failed_batches": sum(1 for r in batch_results if r.get("status") == "failed"),
        "batches": len(batch_results),
        "tier_breakdown": dict(summary.get("tier_breakdown") or {}),
        "moves": dict(summary.get("moves") or {}),
        "moves_applied": dict(sorted(applied.items())),
        "error_details": sorted(errors, key=lambda d: str(d.get("customer_id"))),
        "api": _sum_api(api_totals, *(r.get("api") for r in batch_results), (group_check or {}).get("api")),
    }
    if "circuit_breaker" in summary:
        log_doc["circuit_breaker"] = summary["circuit_breaker"]
    if group_check is not None:
        log_doc["group_counts_match"] = group_check.get("group_counts_match")
        log_doc["group_counts"] = group_check.get("group_counts")
    return log_doc


def _iso_or_none(value: Any) -> str | None:
    """Datetimes (and ISO strings) as ISO-8601 UTC 'Z'; None stays None."""
    return None if value is None else iso(to_utc(value))


def _newer_than(a: str | None, b: str | None) -> bool:
    """ISO-8601 UTC 'Z' strings compare chronologically as text; a missing one is oldest."""
    return (a or "") >= (b or "")


def write_sync_log(log_doc: Mapping[str, Any], paths: RunPaths) -> dict[str, str]:
    """Write the log into the run folder, and as the data dir's latest only if this run is newest.

    "Newest" = this run's as_of is not older than the as_of of ``latest.json`` (the newest
    computed run) nor of the current latest log, so a back-filled run never hides today's log.
    """
    fileio.write_json(paths.run_sync_log, dict(log_doc))
    written = {"run": paths.run_sync_log}
    current = fileio.read_json(paths.sync_log) or {}
    if is_newest_run(paths) and _newer_than(iso(paths.as_of), current.get("as_of")):
        fileio.write_json(paths.sync_log, dict(log_doc))
        written["latest"] = paths.sync_log
    return written


def raise_for_sync_errors(log_doc: Mapping[str, Any]) -> None:
    """Fail the run (after the log is written) when any customer could not be synced."""
    if int(log_doc.get("errors") or 0) > 0:
        sample = ", ".join(str(d.get("customer_id")) for d in list(log_doc.get("error_details") or [])[:5])
        raise SyncFailed(
            f"{log_doc['errors']} customers could not be synced "
            f"({log_doc.get('failed_batches', 0)} failed batches); e.g. {sample}. See tier_sync_log.json."
        )


# --------------------------------------------------------------------------------------------
# Group-count check
# --------------------------------------------------------------------------------------------


def verify_group_counts(
    client: LightspeedClient,
    master: pd.DataFrame,
    groups: GroupMap,
    *,
    expected_members: Mapping[str, Iterable[str]] | None = None,
    left_alone: Iterable[str] = (),
) -> dict[str, Any]:
    """Compare each tier group's members (from the API) with what the CSV says.

    Expected members of a tier group: the customers the sync manages with that tier
    (``expected_members``, from the plan: protected, deleted and no-tier customers are not the
    sync's to place), or, without it, every master row with that tier. Customers left alone at
    write time (``left_alone``: changed in the POS, errors) are taken out of both sides. Members
    the sync does not manage with any tier (e.g. a no-tier customer left where they were) are
    counted as ``other_members`` and do not make a mismatch. Per tier: expected, actual (members
    that are expected-to-be-somewhere managed customers), missing, unexpected; the flag
    ``group_counts_match`` is true when every tier group holds exactly its expected customers.
    """
    stats_before = _stats(client)
    if expected_members is None:
        expected_members = {
            t: [
                str(c)
                for c, tier in zip(master[MASTER_ID], master[MASTER_TIER], strict=True)
                if str(tier) == t
            ]
            for t in TIERS
        }
    excluded = {str(c) for c in left_alone}
    expected = {t: {str(c) for c in expected_members.get(t, ())} - excluded for t in TIERS}
    managed_anywhere = set().union(*expected.values())
    out: dict[str, Any] = {}
    match = True
    for tier in TIERS:
        group_id = groups.tier_groups.get(tier)
        if group_id is None or is_placeholder(group_id):
            members: set[str] = set()
        else:
            members = {
                str(c.get("id")) for c in client.list_group_members(group_id) if _is_null(c.get("deleted_at"))
            }
        relevant = members & managed_anywhere
        missing = expected[tier] - members
        unexpected = relevant - expected[tier]
        tier_match = not missing and not unexpected
        match = match and tier_match
        out[tier] = {
            "group_id": group_id,
            "expected": len(expected[tier]),
            "actual": len(relevant),
            "members": len(members),
            "other_members": len(members - managed_anywhere),
            "missing": len(missing),
            "unexpected": len(unexpected),
            "match": tier_match,
        }
    result = {"group_counts": out, "group_counts_match": match, "api": _diff(_stats(client), stats_before)}
    if not match:
        log.warning(
            "Group counts do not match the CSV: %s", {t: (v["expected"], v["actual"]) for t, v in out.items()}
        )
    return result


# --------------------------------------------------------------------------------------------
# Task-sized entry points (the DAG's task bodies call these)
# --------------------------------------------------------------------------------------------


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
    if not is_newest_run(paths):
        newest = newest_published_as_of(paths)
        return False, f"superseded: a newer run (as_of {newest}) exists; only the latest run writes"
    return True, None


def prepare_sync(
    client: LightspeedClient,
    master: pd.DataFrame,
    current: pd.DataFrame,
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
    max_batches: int = MAX_BATCHES,
    calls_per_batch: int = CALLS_PER_BATCH,
) -> list[dict[str, Any]]:
    """The plan_sync task: groups, plan, breaker, batch files, plan.json; returns refs to map over.

    Returns [] (so the mapped write task is skipped) when writes are not allowed; the batch files
    are still written, as the record of what would have been sent. When the breaker trips on a
    writing run, plan.json is written with ``dispatched: false`` first (so the log can report the
    plan), then MassChangeError is raised.
    """
    started_at = datetime.now(UTC)
    stats_before = _stats(client)
    writes_allowed = writes_allowed and not dry_run
    if dry_run and skipped_reason is None:
        skipped_reason = "dry_run"
    # Plan against placeholders first: creating a missing group is a write too, and nothing may be
    # written before the circuit breaker has had its say.
    groups = resolve_groups(client, rules, create_missing=False)
    plan = plan_moves(master, current, groups, rules, force_resync=force_resync, limit=limit)
    status = circuit_status(plan, rules)
    status["allowed_by_param"] = bool(allow_mass_change and status["tripped"])
    blocked = writes_allowed and status["tripped"] and not allow_mass_change
    if writes_allowed and not blocked:
        if status["tripped"]:
            check_circuit(plan, rules, allow_mass_change)  # allowed: logs the warning
        if groups.missing:
            groups = resolve_groups(client, rules, create_missing=True)
            plan = plan_moves(master, current, groups, rules, force_resync=force_resync, limit=limit)
    summary = {**plan.summary(), "circuit_breaker": status, "groups_created": list(groups.created)}
    write_expected_members(plan, paths)
    extra: dict[str, Any] = {
        "summary": summary,
        "started_at": iso(started_at),
        "dry_run": dry_run,
        "writes_allowed": writes_allowed and not blocked,
        "skipped_reason": "circuit_breaker" if blocked else skipped_reason,
        "dispatched": writes_allowed and not blocked,
        "groups": groups.as_dict(),
        "api": _diff(_stats(client), stats_before),
    }
    if blocked:
        write_plan_doc(
            paths,
            {
                "format": PLAN_FORMAT,
                "plan_id": uuid.uuid4().hex,
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
        extra=extra,
    )
    return refs if writes_allowed else []


def finish_sync(
    paths: RunPaths,
    identity: Mapping[str, Any],
    *,
    xcom_results: Iterable[Mapping[str, Any] | None] = (),
    group_check: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    no_plan_reason: str | None = None,
) -> dict[str, Any]:
    """The write_sync_log task: aggregate plan.json + every batch result, write the log, return it.

    Works when nothing was planned, when batches failed or left no XCom, and when plan_sync never
    finished (then the log says so). Does not raise for sync errors: call
    ``raise_for_sync_errors`` afterwards so the log is always written first.
    """
    doc, results = load_batch_results(paths, xcom_results)
    if doc is None:
        summary: dict[str, Any] = {}
        synced = False
        reason: str | None = no_plan_reason or "no sync plan: plan_sync did not complete"
        started: str | None = None
        api: Mapping[str, Any] | None = None
    else:
        summary = dict(doc.get("summary") or {})
        synced = bool(doc.get("writes_allowed")) and bool(doc.get("dispatched", True))
        reason = doc.get("skipped_reason")
        started = doc.get("started_at")
        api = doc.get("api")
        dry_run = dry_run or bool(doc.get("dry_run"))
    log_doc = build_sync_log(
        identity,
        summary,
        results,
        api,
        group_check,
        dry_run=dry_run,
        synced=synced,
        skipped_reason=reason,
        started_at=started,
    )
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


def read_expected_members(paths: RunPaths) -> dict[str, list[str]] | None:
    doc = fileio.read_json(fileio.join(paths.run_sync_plan_dir, "expected_members.json"))
    return doc if isinstance(doc, dict) else None


def left_alone_ids(paths: RunPaths) -> list[str]:
    """Customers the batches left alone, found deleted, or failed on (out of the group-count check)."""
    _, results = load_batch_results(paths)
    out = [c for r in results for c in r.get("changed_in_pos_ids") or []]
    out += [c for r in results for c in r.get("deleted_ids") or []]
    out += [str(d.get("customer_id")) for r in results for d in r.get("error_details") or []]
    return sorted(set(out))


def groups_from_plan(paths: RunPaths) -> GroupMap | None:
    """The GroupMap plan_sync resolved (so verify_group_counts needs no second lookup)."""
    doc = read_plan_doc(paths)
    if not doc or not doc.get("groups"):
        return None
    g = doc["groups"]
    return GroupMap(
        tier_groups=dict(g["tier_groups"]),
        default_group_id=g.get("default_group_id"),
        aliases=dict(g.get("aliases") or {}),
        created=tuple(g.get("created") or ()),
        missing=tuple(g.get("missing") or ()),
    )
