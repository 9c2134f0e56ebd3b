"""Pure tests of the sync planning: who moves, the circuit breaker, batches, the sync log.

No server, no Airflow: DataFrames in, plans and files out. The rules under test are
tier-rules.md "Which customers the sync may move".
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync import sync
from include.tier_sync.ledger import RunPaths
from include.tier_sync.rules import TIERS, TierRules
from include.tier_sync.sync.batches import write_plan_doc
from include.tier_sync.sync.groups import GroupListingError

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)
G = {
    "Evergreen": "g-ever",
    "Bloom": "g-bloom",
    "Sprout": "g-sprout",
    "Seed": "g-seed",
    "First Time Buyer": "g-ftb",
}
DEFAULT = "g-all"
STAFF = "g-staff"
WHOLESALE = "g-wholesale"
NAMES = {
    **{gid: name for tier, gid in G.items() for name in [TierRules().group_for(tier) or tier]},
    DEFAULT: "All Customers",
    STAFF: "Staff",
    WHOLESALE: "Wholesale",
}


def groups() -> sync.GroupMap:
    return sync.GroupMap(tier_groups=dict(G), default_group_id=DEFAULT, names=dict(NAMES))


def frames(rows: list[tuple[str, str, str | None, bool]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(id, tier, current group, deleted) -> master and live-customer frames."""
    master = pd.DataFrame({"Customer ID": [r[0] for r in rows], "Tier": [r[1] for r in rows]})
    current = pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "customer_group_id": [r[2] for r in rows],
            "deleted_at": [pd.Timestamp("2026-11-01", tz="UTC") if r[3] else pd.NaT for r in rows],
        }
    )
    return master, current


def test_every_rule_of_who_may_move() -> None:
    master, current = frames(
        [
            ("c01", "Evergreen", DEFAULT, False),  # default group -> moves
            ("c02", "Evergreen", STAFF, False),  # protected high spender
            ("c03", "Bloom", WHOLESALE, False),  # protected
            ("c04", "Evergreen", DEFAULT, True),  # deleted
            ("c05", "None", G["Bloom"], False),  # no tier: left where they are
            ("c06", "Sprout", G["Sprout"], False),  # unchanged
            ("c07", "Sprout", G["Bloom"], False),  # downgrade
            ("c08", "Seed", None, False),  # no group at all counts as default
            ("c09", "First Time Buyer", "g-unknown", False),  # unknown/other group: protected
            ("c10", "Bloom", G["First Time Buyer"], False),  # upgrade
        ]
    )
    master = pd.concat([master, pd.DataFrame({"Customer ID": ["c11"], "Tier": ["Bloom"]})])  # not live
    plan = sync.plan_moves(master, current, groups(), TierRules())
    moved = {m.customer_id: (m.from_group_id, m.to_group_id) for m in plan.moves}
    assert moved == {
        "c01": (DEFAULT, G["Evergreen"]),
        "c07": (G["Bloom"], G["Sprout"]),
        "c08": (None, G["Seed"]),
        "c10": (G["First Time Buyer"], G["Bloom"]),
    }
    assert (plan.protected, plan.deleted, plan.no_tier, plan.unchanged, plan.missing) == (3, 1, 1, 1, 1)
    assert plan.managed == 5
    assert plan.total_customers == 11
    assert plan.downgrades == 1
    assert plan.move_counts() == {
        "(no group)->Seed": 1,
        "All Customers->Evergreen": 1,
        "Bloom->Sprout": 1,
        "First Time Buyer->Bloom": 1,
    }
    assert plan.tier_breakdown == {
        "Evergreen": 3,
        "Bloom": 3,
        "Sprout": 2,
        "Seed": 1,
        "First Time Buyer": 1,
        "None": 1,
    }
    assert plan.expected_members["Evergreen"] == ["c01"]  # the protected c02 is not the sync's


def test_order_is_by_target_tier_then_id_and_limit_is_reproducible() -> None:
    rows = [(f"c{i:02d}", TIERS[i % 5], DEFAULT, False) for i in range(20)]
    master, current = frames(rows)
    plan = sync.plan_moves(master.sample(frac=1, random_state=3), current, groups(), TierRules())
    keys = [(TIERS.index(m.tier), m.customer_id) for m in plan.moves]
    assert keys == sorted(keys)
    limited = sync.plan_moves(master, current, groups(), TierRules(), limit=7)
    assert [m.customer_id for m in limited.moves] == [m.customer_id for m in plan.moves[:7]]
    assert limited.deferred_by_limit == 13


def test_force_resync_reasserts_without_tripping_the_breaker() -> None:
    rows = [(f"c{i:02d}", "Bloom", G["Bloom"], False) for i in range(10)] + [("x", "Bloom", STAFF, False)]
    master, current = frames(rows)
    plan = sync.plan_moves(master, current, groups(), TierRules(), force_resync=True)
    assert len(plan.moves) == 10 and not plan.changes
    assert plan.move_counts() == {"Bloom->Bloom": 10}
    sync.check_circuit(plan, TierRules(), allow_mass_change=False)  # re-asserts are not changes


def test_live_data_wins_over_csv_and_newest_version_counts() -> None:
    master = pd.DataFrame({"Customer ID": ["a"], "Tier": ["Bloom"], "Previous Tier": ["Bloom"]})
    current = pd.DataFrame(
        {
            "id": ["a", "a"],
            "customer_group_id": [G["Bloom"], STAFF],
            "deleted_at": [pd.NaT, pd.NaT],
            "version": [5, 9],
        }
    )
    plan = sync.plan_moves(master, current, groups(), TierRules())
    assert plan.protected == 1 and not plan.moves


def test_bad_master_is_refused() -> None:
    master, current = frames([("a", "Gold", DEFAULT, False)])
    with pytest.raises(ValueError, match="unknown tiers"):
        sync.plan_moves(master, current, groups(), TierRules())
    master, current = frames([("a", "Bloom", DEFAULT, False), ("a", "Seed", DEFAULT, False)])
    with pytest.raises(ValueError, match="more than once"):
        sync.plan_moves(master, current, groups(), TierRules())


def test_csv_read_with_keep_default_na_keeps_tier_none(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("Customer ID,Tier\na,None\nb,Seed\n")
    master = pd.read_csv(path, keep_default_na=False, dtype=str)
    _, current = frames([("a", "None", DEFAULT, False), ("b", "Seed", DEFAULT, False)])
    plan = sync.plan_moves(master, current, groups(), TierRules())
    assert plan.no_tier == 1 and [m.customer_id for m in plan.moves] == ["b"]


# -- circuit breaker ---------------------------------------------------------------------------


def test_breaker_trips_on_share_and_on_downgrades() -> None:
    rows = [(f"u{i:02d}", "Bloom", G["Bloom"], False) for i in range(8)]
    rows += [("m1", "Evergreen", DEFAULT, False), ("m2", "Evergreen", DEFAULT, False)]
    master, current = frames(rows)
    plan = sync.plan_moves(master, current, groups(), TierRules())
    sync.check_circuit(plan, TierRules(), allow_mass_change=False)  # 2/10 = 20 %: not more than
    rows.append(("m3", "Evergreen", DEFAULT, False))  # 3/11 > 20 %
    master, current = frames(rows)
    plan = sync.plan_moves(master, current, groups(), TierRules())
    with pytest.raises(sync.MassChangeError) as err:
        sync.check_circuit(plan, TierRules(), allow_mass_change=False)
    assert err.value.details["changes"] == 3 and err.value.details["managed"] == 11
    sync.check_circuit(plan, TierRules(), allow_mass_change=True)

    down = [(f"d{i}", "Seed", G["Evergreen"], False) for i in range(3)]
    down += [(f"k{i:02d}", "Seed", G["Seed"], False) for i in range(97)]
    master, current = frames(down)
    plan = sync.plan_moves(master, current, groups(), TierRules())
    with pytest.raises(sync.MassChangeError, match="downgrades"):
        sync.check_circuit(plan, TierRules(max_downgrades=2), allow_mass_change=False)
    sync.check_circuit(plan, TierRules(max_downgrades=3), allow_mass_change=False)


# -- batches -----------------------------------------------------------------------------------


def big_plan(n: int) -> sync.Plan:
    moves = [
        sync.Move(f"c{i:07d}", TIERS[i % 5], G[TIERS[i % 5]], DEFAULT, "All Customers") for i in range(n)
    ]
    moves.sort(key=lambda m: (TIERS.index(m.tier), m.customer_id))
    return sync.Plan(
        moves=moves,
        total_customers=n,
        managed=n,
        protected=0,
        deleted=0,
        no_tier=0,
        missing=0,
        unchanged=0,
        deferred_by_limit=0,
        tier_breakdown={},
    )


def test_batches_group_by_target_and_cap_calls(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    plan = big_plan(2_345)
    refs = sync.write_batches(plan, paths, customers_cursor=77)
    assert sum(r["size"] for r in refs) == 2_345
    assert all(r["size"] <= 500 for r in refs)
    seen: list[str] = []
    for ref in refs:
        assert set(ref) >= {"ref", "tier", "group_id", "size"}
        assert len(json.dumps(ref)) < 300  # XCom stays small
        batch = json.loads(Path(ref["ref"]).read_text())
        assert batch["customers_cursor"] == 77
        assert batch["group_id"] == G[batch["tier"]] == ref["group_id"]
        seen += [m["customer_id"] for m in batch["moves"]]
    assert sorted(seen) == sorted(m.customer_id for m in plan.moves) and len(set(seen)) == len(seen)
    doc = sync.read_plan_doc(paths)
    assert doc is not None and doc["refs"] == refs and doc["summary"]["planned_moves"] == 2_345


@pytest.mark.parametrize("n", [0, 1, 99_999, 1_000_000])
def test_batch_count_stays_under_the_mapping_limit(n: int) -> None:
    sizes = [n // 5 + (1 if i < n % 5 else 0) for i in range(5)]
    cpb = sync.batch_calls_needed(sizes, max_batches=256, calls_per_batch=5)
    assert sync._batch_count(sizes, cpb) <= 256
    if n <= 100_000:
        assert cpb == 5


# -- sync log ----------------------------------------------------------------------------------

IDENTITY = {
    "dag_id": "customer_tier_sync",
    "run_id": "r1",
    "logical_date": None,
    "as_of": "2026-11-25T02:00:00Z",
}
REQUIRED = {
    "dag_id",
    "run_id",
    "logical_date",
    "as_of",
    "started_at",
    "finished_at",
    "dry_run",
    "synced",
    "total_customers",
    "planned_moves",
    "updated",
    "skipped",
    "protected",
    "changed_in_pos",
    "errors",
    "tier_breakdown",
    "moves",
    "error_details",
    "api",
}


def test_log_of_a_dry_run_says_nothing_was_written() -> None:
    summary = {"planned_moves": 4, "total_customers": 10, "protected": 2, "moves": {"All Customers->Seed": 4}}
    doc = sync.build_sync_log(
        IDENTITY,
        summary,
        [],
        {"requests": 3},
        None,
        dry_run=True,
        synced=False,
        skipped_reason="dry_run",
        started_at=AS_OF,
    )
    assert set(doc) >= REQUIRED
    assert doc["synced"] is False and doc["skipped"] == 4 and doc["updated"] == 0
    assert doc["api"] == {"requests": 3, "rate_limited": 0, "retries": 0}
    json.dumps(doc)


def test_missing_and_stale_results_become_per_customer_errors(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    refs = sync.write_batches(big_plan(150), paths, customers_cursor=1, calls_per_batch=1)
    # batch 1 finished; batch 2 left a result from an older plan of the same run (must be ignored)
    first = sync._new_result(refs[0]["ref"], json.loads(Path(refs[0]["ref"]).read_text()))
    first.update(status="done", written=True, updated=refs[0]["size"])
    Path(sync.result_path(refs[0]["ref"])).write_text(json.dumps(first))
    Path(sync.result_path(refs[1]["ref"])).write_text(json.dumps({"plan_id": "old", "status": "done"}))
    doc, results = sync.load_batch_results(paths)
    assert doc is not None and len(results) == len(refs)
    failed = [r for r in results if r["status"] == "failed"]
    assert sum(r["errors"] for r in failed) == sum(r["size"] for r in refs[1:])
    log_doc = sync.build_sync_log(
        IDENTITY,
        doc["summary"],
        results,
        None,
        None,
        dry_run=False,
        synced=True,
        skipped_reason=None,
        started_at=None,
    )
    assert log_doc["errors"] == 150 - refs[0]["size"] and log_doc["failed_batches"] == len(refs) - 1
    with pytest.raises(sync.SyncFailed):
        sync.raise_for_sync_errors(log_doc)


def test_latest_log_only_from_the_newest_run(tmp_path: Path) -> None:
    new = RunPaths(str(tmp_path), AS_OF)
    old = RunPaths(str(tmp_path), datetime(2026, 11, 20, 2, tzinfo=UTC))
    (tmp_path / "latest.json").write_text(json.dumps({"as_of": "2026-11-25T02:00:00Z"}))
    assert "latest" in sync.write_sync_log({"as_of": "2026-11-25T02:00:00Z"}, new)
    assert "latest" not in sync.write_sync_log({"as_of": "2026-11-20T02:00:00Z"}, old)
    assert json.loads((tmp_path / "tier_sync_log.json").read_text())["as_of"] == "2026-11-25T02:00:00Z"
    assert Path(old.run_sync_log).exists()
    assert sync.decide_writes(old, dry_run=False)[0] is False
    assert sync.decide_writes(new, dry_run=False) == (True, None)
    assert sync.decide_writes(new, dry_run=True)[0] is False
    assert sync.decide_writes(new, dry_run=False, run_type="backfill")[0] is False
    # A back-fill of the newest closed interval is the latest run; of an older one it is not.
    assert sync.decide_writes(new, dry_run=False, run_type="backfill", latest_interval=True) == (True, None)
    assert sync.decide_writes(old, dry_run=False, run_type="backfill", latest_interval=True)[0] is False


# -- groups ------------------------------------------------------------------------------------


class FakeGroups:
    """Only what resolve_groups needs."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = groups
        self.created: list[str] = []

    def list_customer_groups(self) -> list[dict[str, Any]]:
        return list(self.groups)

    def create_customer_group(self, name: str) -> dict[str, Any]:
        group = {"id": f"new-{len(self.created)}", "name": name}
        self.created.append(name)
        self.groups.append(group)
        return group


def test_resolve_groups_creates_only_when_allowed_and_finds_default_by_code() -> None:
    rules = TierRules()
    base: list[dict[str, Any]] = [
        {"id": "d", "name": "Everyone", "group_id": "1111111111"},
        {"id": "e1", "name": rules.group_for("Evergreen"), "created_at": "2024-01-01T00:00:00Z"},
        {"id": "e0", "name": rules.group_for("Evergreen"), "created_at": "2023-01-01T00:00:00Z"},
        {"id": "gone", "name": rules.group_for("Bloom"), "deleted_at": "2025-01-01T00:00:00Z"},
    ]
    fake = FakeGroups(list(base))
    dry = sync.resolve_groups(fake, rules, create_missing=False)  # type: ignore[arg-type]
    assert fake.created == [] and set(dry.missing) == {"Bloom", "Sprout", "Seed", "First Time Buyer"}
    assert dry.default_group_id == "d" and dry.tier_groups["Evergreen"] == "e0"
    assert dry.is_managed("e1") and dry.tier_of_group("e1") == "Evergreen"
    assert sync.is_placeholder(dry.tier_groups["Bloom"])
    real = sync.resolve_groups(fake, rules, create_missing=True)  # type: ignore[arg-type]
    assert len(fake.created) == 4 and not real.missing and set(real.created) == set(dry.missing)


class FlakyGroups(FakeGroups):
    """A listing that answers each read from a script (a gateway's odd page, a cut list)."""

    def __init__(self, groups: list[dict[str, Any]], reads: list[list[str] | None]) -> None:
        super().__init__(groups)
        self.reads = reads  # per read: the ids it shows (None: all)

    def list_customer_groups(self) -> list[dict[str, Any]]:
        shown = self.reads.pop(0) if self.reads else None
        return [g for g in self.groups if shown is None or g["id"] in shown]


def test_resolve_groups_creates_nothing_on_a_listing_it_cannot_trust() -> None:
    rules = TierRules()
    base: list[dict[str, Any]] = [
        {"id": "d", "name": "All Customers", "group_id": "1111111111"},
        *({"id": f"t{i}", "name": rules.group_for(t)} for i, t in enumerate(TIERS) if t != "Seed"),
    ]
    # The first read is empty: every tier looks missing, but the second read disagrees.
    flaky = FlakyGroups(list(base), [[]])
    with pytest.raises(GroupListingError, match=r"'All Customers' \(d\) only in the second read"):
        sync.resolve_groups(flaky, rules, create_missing=True)  # type: ignore[arg-type]
    assert flaky.created == []
    # No default group in either read: the listing looks cut; nothing is created.
    no_default = FlakyGroups(list(base), [[g["id"] for g in base[1:]]] * 2)
    with pytest.raises(GroupListingError, match="does not contain the store's default group"):
        sync.resolve_groups(no_default, rules, create_missing=True)  # type: ignore[arg-type]
    assert no_default.created == []
    # The listing the plan was made from is the first read: one fresh read must agree with it.
    planned = sync.resolve_groups(FakeGroups(list(base)), rules, create_missing=False)  # type: ignore[arg-type]
    assert planned.missing == ("Seed",) and planned.listing is not None
    moved_on = FakeGroups([*base, {"id": "x", "name": "Wholesale"}])
    with pytest.raises(GroupListingError, match=r"'Wholesale' \(x\) only in the second read"):
        sync.resolve_groups(moved_on, rules, create_missing=True, planned=planned)  # type: ignore[arg-type]
    assert moved_on.created == []
    agreed = FakeGroups(list(base))
    real = sync.resolve_groups(agreed, rules, create_missing=True, planned=planned)  # type: ignore[arg-type]
    assert agreed.created == [rules.group_for("Seed")] and real.created == ("Seed",)
    # A dry run still tolerates a store without a default group (API reference §5.3).
    dry = sync.resolve_groups(FlakyGroups(list(base[1:]), []), rules, create_missing=False)  # type: ignore[arg-type]
    assert dry.default_group_id is None and dry.missing == ("Seed",)


def test_log_without_a_plan_says_why(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    doc = sync.finish_sync(paths, IDENTITY, no_plan_reason="validation failed")
    assert doc["synced"] is False and doc["skipped_reason"] == "validation failed"
    assert json.loads(Path(paths.run_sync_log).read_text()) == doc


# -- what an approval changes in the plan and the log ------------------------------------------


def test_breaker_error_carries_the_changes_for_the_approval_request() -> None:
    rows = [("m1", "Evergreen", DEFAULT, False), ("m2", "Seed", G["Bloom"], False), ("k1", "Seed", G["Seed"], False)]
    master, current = frames(rows)
    plan = sync.plan_moves(master, current, groups(), TierRules())
    with pytest.raises(sync.MassChangeError) as err:
        sync.check_circuit(plan, TierRules(), allow_mass_change=False)
    assert sorted(m.customer_id for m in err.value.changes) == ["m1", "m2"]


def test_upgrades_only_leaves_downgrades_and_reasserts_out_and_says_so() -> None:
    rows = [
        ("up1", "Evergreen", G["Bloom"], False),  # upgrade
        ("new1", "Seed", DEFAULT, False),  # into a tier from the default group: kept
        ("new2", "Sprout", None, False),  # no group at all: kept
        ("dn1", "Seed", G["Evergreen"], False),  # downgrade: left out
        ("dn2", "Sprout", G["Bloom"], False),  # downgrade: left out
        ("same", "Bloom", G["Bloom"], False),  # re-asserted under force_resync: left out
    ]
    master, current = frames(rows)
    full = sync.plan_moves(master, current, groups(), TierRules(), force_resync=True)
    assert len(full.moves) == 6 and full.downgrades == 2
    only = full.upgrades_only()
    assert sorted(m.customer_id for m in only.moves) == ["new1", "new2", "up1"]
    assert all(m.is_upgrade for m in only.moves) and only.downgrades == 0
    summary = only.summary()
    assert summary["planned_moves"] == 3 and summary["downgrades"] == 0
    assert summary["left_out_by_approval"] == {
        "reason": "approved: upgrades only",
        "downgrades": 2,
        "reasserts": 1,
        "moves": {"Bloom->Bloom": 1, "Bloom->Sprout": 1, "Evergreen->Seed": 1},
    }
    # A left-out downgrade is expected to stay in the group it is in (the group check compares
    # with what this plan writes), the rest as in the complete sync.
    assert "dn1" in only.expected_members["Evergreen"] and "dn1" not in only.expected_members["Seed"]
    assert "dn2" in only.expected_members["Bloom"] and "dn2" not in only.expected_members["Sprout"]
    assert "up1" in only.expected_members["Evergreen"] and "same" in only.expected_members["Bloom"]
    assert "left_out_by_approval" not in full.summary()  # the complete plan leaves nothing out


def test_log_carries_the_approval_decision_and_what_was_left_out(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    decision = {
        "status": "approved_upgrades_only",
        "option": "Apply upgrades only",
        "responded_by": {"id": "admin", "name": "admin"},
        "responded_at": "2026-11-25T03:00:00Z",
        "comment": "downgrades after the audit",
    }
    left_out = {"reason": "approved: upgrades only", "downgrades": 2, "reasserts": 0, "moves": {"Bloom->Seed": 2}}
    write_plan_doc(
        paths,
        {
            "format": "tier-sync-plan/1",
            "plan_id": "p1",
            "as_of": "2026-11-25T02:00:00Z",
            "customers_cursor": 1,
            "refs": [],
            "summary": {"planned_moves": 0, "left_out_by_approval": left_out},
            "groups": None,
            "dispatched": True,
            "writes_allowed": True,
            "approval": decision,
        },
    )
    doc = sync.finish_sync(paths, IDENTITY)
    assert doc["approval"] == decision and doc["left_out_by_approval"] == left_out
    assert json.loads(Path(paths.run_sync_log).read_text())["approval"]["comment"] == "downgrades after the audit"

    refused = {"status": "aborted", "option": "Abort", "responded_by": {"id": "ops", "name": "ops"}}
    write_plan_doc(
        paths,
        {
            "format": "tier-sync-plan/1",
            "plan_id": "p2",
            "as_of": "2026-11-25T02:00:00Z",
            "customers_cursor": 1,
            "refs": [],
            "summary": {"planned_moves": 5},
            "groups": None,
            "dispatched": False,
            "writes_allowed": False,
            "skipped_reason": "approval aborted",
            "approval": refused,
        },
    )
    doc = sync.finish_sync(paths, IDENTITY)
    assert doc["synced"] is False and doc["updated"] == 0 and doc["skipped_reason"] == "approval aborted"
    assert doc["approval"] == refused and doc["skip_reasons"] == {"not_written": 5}
