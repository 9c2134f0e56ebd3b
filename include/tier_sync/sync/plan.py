"""Who moves where (the plan), and the circuit breaker that stops a mass change before any write.

* **Who may move** follows tier-rules.md "Which customers the sync may move" exactly. A customer is
  *managed* when not deleted, tier not None, and currently in one of the five tier groups or the
  default group (or in no group at all, which the POS shows as the default). Everyone else is left
  exactly where they are and counted (protected / deleted / no_tier / missing).
* **Current group comes from the live data** (the newest extracted version of each customer),
  never from the CSV.
* **Circuit breaker**: too many real changes (share of managed customers) or too many downgrades
  stop the run before any write, unless ``allow_mass_change``.

The inputs are plain columns and the live customers (`sync/live.py`), so the plan_sync task needs no
pandas; DataFrames are accepted too (`live.as_live` imports pandas for those only).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeAlias

from include.tier_sync.rules import ALL_TIERS, NO_TIER, TIERS
from include.tier_sync.sync.live import as_live

if TYPE_CHECKING:
    import pandas as pd

    from include.tier_sync.rules import TierRules
    from include.tier_sync.sync.contracts import BatchMove, CircuitStatus, PlanSummary
    from include.tier_sync.sync.groups import GroupMap
    from include.tier_sync.sync.live import LiveState

    # The master CSV as the plan reads it: column -> cells, or a DataFrame (indexed the same way).
    Master: TypeAlias = Mapping[str, Sequence[Any]] | pd.DataFrame

log = logging.getLogger(__name__)

MASTER_ID = "Customer ID"
MASTER_TIER = "Tier"


class MassChangeError(RuntimeError):
    """The circuit breaker tripped: the plan would change too many customers at once.

    ``changes`` are the plan's real changes, so whoever asks a person about them (the approval
    request) can show a sample without planning again.
    """

    def __init__(self, message: str, details: Mapping[str, Any], changes: Sequence[Move] = ()) -> None:
        super().__init__(message)
        self.details = dict(details)
        self.changes = list(changes)


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
    def is_upgrade(self) -> bool:
        """A real change that is not a downgrade (into a tier from the default group included)."""
        return self.is_change and not self.is_downgrade

    @property
    def key(self) -> str:
        return f"{self.from_label}->{self.tier}"

    def as_dict(self) -> BatchMove:
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
    # What an "upgrades only" approval left out of this plan (None: nothing was left out).
    left_out: dict[str, Any] | None = None
    # Customer id -> (why, current group id) of every customer the plan leaves alone for a reason
    # the master cannot tell: protected, deleted, missing, deferred_by_limit, left_out_by_approval
    # (sync_plan/left_alone.json, what the page's customer view reads).
    left_alone: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def changes(self) -> list[Move]:
        return [m for m in self.moves if m.is_change]

    @property
    def downgrades(self) -> int:
        return sum(1 for m in self.moves if m.is_downgrade)

    def move_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(m.key for m in self.moves).items()))

    def summary(self) -> PlanSummary:
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
            **({"left_out_by_approval": dict(self.left_out)} if self.left_out is not None else {}),
        }

    def upgrades_only(self) -> Plan:
        """The same plan keeping only its upgrades (what an "apply upgrades only" approval writes).

        Downgrades and re-asserts are left out and counted in ``left_out`` (by transition), so the
        plan and the sync log say exactly what was not written. A customer whose downgrade is left
        out is expected to stay in the tier group they are in (so the group-count check compares
        with what this plan writes, not with the complete sync).
        """
        kept = [m for m in self.moves if m.is_upgrade]
        dropped = [m for m in self.moves if not m.is_upgrade]
        expected = {tier: set(ids) for tier, ids in self.expected_members.items()}
        for m in dropped:
            if m.is_downgrade:
                expected.setdefault(m.tier, set()).discard(m.customer_id)
                expected.setdefault(m.from_label, set()).add(m.customer_id)
        left_out = {
            "reason": "approved: upgrades only",
            "downgrades": sum(1 for m in dropped if m.is_downgrade),
            "reasserts": sum(1 for m in dropped if not m.is_change),
            "moves": dict(sorted(Counter(m.key for m in dropped).items())),
        }
        alone = dict(self.left_alone)
        alone.update({m.customer_id: ("left_out_by_approval", m.from_group_id) for m in dropped})
        return replace(
            self,
            moves=kept,
            left_out=left_out,
            left_alone=alone,
            expected_members={tier: sorted(ids) for tier, ids in expected.items()},
        )

    def retargeted(self, groups: GroupMap) -> Plan:
        """The same plan aimed at ``groups``' tier groups (placeholders replaced by created groups).

        Who moves, and every count, depend only on the customers' current groups, which a group
        created after planning cannot hold; only each move's target id changes.
        """
        moves = [replace(m, to_group_id=groups.tier_groups[m.tier]) for m in self.moves]
        return replace(self, moves=moves)


def current_groups(current: pd.DataFrame | Mapping[str, LiveState]) -> dict[str, tuple[str | None, bool]]:
    """id -> (customer_group_id or None, deleted) of the live customers (`live.as_live`)."""
    return {cid: (group, deleted) for cid, (group, deleted, _) in as_live(current).items()}


def _master_rows(master: Master, limit: int | None) -> tuple[list[str], list[str]]:
    """(ids, tiers) of the master CSV, refusing anything the plan cannot be exact about."""
    if MASTER_ID not in master or MASTER_TIER not in master:
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
    return ids, tiers


def _fate(state: tuple[str | None, bool] | None, tier: str, groups: GroupMap) -> str:
    """The first matching rule: missing, deleted, no_tier, protected, else managed."""
    if state is None:
        return "missing"
    group_id, deleted = state
    if deleted:
        return "deleted"
    if tier == NO_TIER:
        return "no_tier"
    if not groups.is_managed(group_id):
        return "protected"
    return "managed"


def plan_moves(
    master: Master,
    current: pd.DataFrame | Mapping[str, LiveState],
    groups: GroupMap,
    rules: TierRules,
    *,
    force_resync: bool = False,
    limit: int | None = None,
) -> Plan:
    """Every customer's fate, per tier-rules.md "Which customers the sync may move".

    ``master`` is the run's master CSV, column -> cells (`spreadsheet.read_raw_columns`) or a frame
    read with ``keep_default_na=False`` (tier "None" stays a string); ``current`` holds the live
    customers (`live.LiveCustomers`, or a frame: ``id``, ``customer_group_id``, ``deleted_at``,
    optionally ``version``; the newest version per id is used). Checks, first match wins:
    not in live data -> missing; deleted -> deleted; tier None -> no_tier; current group not
    managed -> protected; current group is the tier's group -> unchanged (a move when
    ``force_resync``, re-asserting it); else a move. Moves are ordered by target tier (highest
    first) then customer id, so ``limit`` (keep the first N) is reproducible.
    """
    ids, tiers = _master_rows(master, limit)
    live = current_groups(current)
    counts = Counter[str]()
    moves: list[Move] = []
    expected: dict[str, list[str]] = {t: [] for t in TIERS}
    alone: dict[str, tuple[str, str | None]] = {}
    for cid, tier in zip(ids, tiers, strict=True):
        state = live.get(cid)
        fate = _fate(state, tier, groups)
        counts[fate] += 1
        if fate in ("protected", "deleted", "missing"):
            alone[cid] = (fate, state[0] if state is not None else None)
        if fate != "managed" or state is None:
            continue
        group_id = state[0]
        target = groups.tier_groups[tier]
        expected[tier].append(cid)
        if group_id == target:
            counts["unchanged"] += 1  # with force_resync still unchanged in substance: re-asserted
            if not force_resync:
                continue
        moves.append(Move(cid, tier, target, group_id, groups.label(group_id)))

    moves.sort(key=lambda m: (TIERS.index(m.tier), m.customer_id))
    deferred = 0
    if limit is not None and len(moves) > limit:
        deferred = len(moves) - limit
        alone.update({m.customer_id: ("deferred_by_limit", m.from_group_id) for m in moves[limit:]})
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
        left_alone=alone,
    )
    _log_plan(plan)
    return plan


def _log_plan(plan: Plan) -> None:
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


# -- circuit breaker ---------------------------------------------------------------------------


def circuit_status(plan: Plan, rules: TierRules) -> CircuitStatus:
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
        plan.changes,
    )
