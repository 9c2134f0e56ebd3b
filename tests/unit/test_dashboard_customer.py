"""The customer view's sales (dashboard_customer.py) and tier history with the sync's actions
(dashboard_customer_runs.py), on planted cases checked against the independent oracle.

The sales: one customer with a sale of every kind that does not count (voided, parked, lay-by
open, on account open, deleted before as_of, dated after as_of, entered in the POS after as_of),
ones that count in a special way (a return, a $0 sale, a sale deleted after as_of, one edited after
as_of, shown as it was), a sale moved to another customer, and paging. The sync: real plan_sync and
sync_batch steps against the simulator, with a person moving customers in the POS between plan and
write, then a dry run the next day.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import dashboard, dashboard_customer, fileio, sync
from include.tier_sync.dashboard_customer_runs import customer_runs
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import compute_tiers, publish_run
from include.tier_sync.store import CUSTOMERS, CUSTOMERS_SCHEMA, SALES, SALES_SCHEMA, OrderStore
from tests import oracle
from tests.unit.test_clv import AS_OF, DAY, RULES, customer, customers_df, sale, sales_df
from tests.unit.test_dashboard import fresh_cache as fresh_cache  # autouse: a clean page cache per test
from tests.unit.test_dashboard import identity, to_table

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
HOUR = timedelta(hours=1)


def planted_sales() -> list[dict[str, Any]]:
    return [
        sale("p1", "cx", "100.00", AS_OF - 10 * DAY),
        sale("p2", "cx", "50.00", AS_OF - 10 * DAY),  # the same instant as p1: ordered by id
        sale("p3", "cx", "60.00", AS_OF - 30 * DAY),
        sale("r1", "cx", "-20.00", AS_OF - 5 * DAY),  # a return: counts, not an order
        sale("z1", "cx", "0.00", AS_OF - 6 * DAY),  # $0: counts, not an order
        sale("v1", "cx", "120.00", AS_OF - 40 * DAY, status="VOIDED"),
        sale("k1", "cx", "80.00", AS_OF - 3 * DAY, status="SAVED"),
        sale("l1", "cx", "780.00", AS_OF - 15 * DAY, status="LAYBY"),
        sale("o1", "cx", "300.00", AS_OF - 7 * DAY, status="ONACCOUNT"),
        sale("d1", "cx", "90.00", AS_OF - 20 * DAY, deleted_at=AS_OF - DAY),  # deleted before as_of
        sale("d2", "cx", "25.00", AS_OF - 25 * DAY, deleted_at=AS_OF + HOUR),  # deleted after: counts
        # Dated after as_of though rung up before it (a pre-dated sale).
        sale("f1", "cx", "70.00", AS_OF + DAY, created_at=AS_OF - HOUR, updated_at=AS_OF - HOUR),
        # A register that synced late: dated before as_of, entered after it.
        sale("g1", "cx", "45.00", AS_OF - 2 * DAY, created_at=AS_OF + HOUR, updated_at=AS_OF + HOUR),
        # Edited after as_of: the older version (a closed $40.00 sale) is what the run saw.
        sale("e1", "cx", "40.00", AS_OF - 8 * DAY, version=1),
        sale("e1", "cx", "40.00", AS_OF - 8 * DAY, version=2, status="VOIDED", updated_at=AS_OF + HOUR),
        # A lay-by closed only after as_of: still open for the run.
        sale("e2", "cx", "200.00", AS_OF - 12 * DAY, version=1, status="LAYBY"),
        sale("e2", "cx", "200.00", AS_OF - 12 * DAY, version=2, status="LAYBY_CLOSED", updated_at=AS_OF + 3 * HOUR),
        # Rung up for cx, moved to cy before as_of: not cx's sale.
        sale("m1", "cx", "15.00", AS_OF - 4 * DAY, version=1),
        sale("m1", "cy", "15.00", AS_OF - 4 * DAY, version=2, updated_at=AS_OF - 3 * DAY),
    ]


CHANGED_LATER = "changed after as_of (edited, voided or deleted): shown as it was at as_of"

# What each sale is, worked out by hand from docs/tier-rules.md (newest sale date first).
COUNTING = [
    ("r1", "return"), ("z1", "zero"), ("e1", "purchase"), ("p1", "purchase"), ("p2", "purchase"),
    ("d2", "purchase"), ("p3", "purchase"),
]  # fmt: skip
NOT_COUNTING = [
    ("f1", "after_as_of"), ("g1", "recorded_after_as_of"), ("k1", "parked"), ("o1", "on_account_open"),
    ("e2", "layby_open"), ("l1", "layby_open"), ("d1", "deleted"), ("v1", "voided"),
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("customer"))
    store = OrderStore(fileio.join(url, "store"))
    store.append(SALES, to_table(sales_df(*planted_sales()), SALES_SCHEMA), cursor=100)
    people = customers_df(customer("cx", name="Xena Many", loyalty=True), customer("cy", name="Yan Other"))
    store.append(CUSTOMERS, to_table(people, CUSTOMERS_SCHEMA), cursor=100)
    paths = RunPaths(url, AS_OF)
    result = compute_tiers(store, paths, identity(AS_OF), RULES)
    fileio.write_json(paths.run_validation_json, {"summary": {"success": True, "run_key": paths.key}})
    publish_run(paths, identity(AS_OF), result["tier_breakdown"])
    return url


def everything(data_dir: str, counting: bool, per_page: int = 200) -> dict[str, Any]:
    found = dashboard_customer.sales(data_dir, "cx", RULES, counting=counting, per_page=per_page)
    assert found is not None
    return found


def test_the_oracle_agrees_with_the_hand_worked_lists() -> None:
    assert oracle.expected_sales(planted_sales(), "cx", AS_OF) == (COUNTING, NOT_COUNTING)


def test_sales_that_count_and_why_the_others_do_not(data_dir: str) -> None:
    counting, not_counting = everything(data_dir, True), everything(data_dir, False)
    assert [(s["sale_id"], s["kind"]) for s in counting["sales"]] == COUNTING
    assert [(s["sale_id"], s["kind"]) for s in not_counting["sales"]] == NOT_COUNTING
    assert counting["counts"] == {"counting": 7, "not_counting": 8} == not_counting["counts"]
    # The sales that count add up to the master's figures: 100 + 50 + 60 - 20 + 0 + 40 + 25.
    assert counting["lifetime_value"] == {"cents": 25500, "dollars": "255.00"}
    assert counting["order_count"] == 5 and counting["matches_master"] is True
    assert dashboard.customer(data_dir, "cx")["lifetime_value"]["cents"] == 25500  # type: ignore[index]
    by_id = {s["sale_id"]: s for s in counting["sales"] + not_counting["sales"]}
    assert by_id["p1"] == {
        "sale_id": "p1", "date": "2026-11-15T02:00:00Z", "amount": {"cents": 10000, "dollars": "100.00"},
        "status": "CLOSED", "kind": "purchase", "reason": "counts: a purchase (an order)", "notes": [],
    }  # fmt: skip
    assert by_id["r1"]["reason"] == "counts: a return lowers the lifetime value; not an order"
    assert by_id["r1"]["amount"] == {"cents": -2000, "dollars": "-20.00"}
    assert by_id["z1"]["reason"] == "counts: a $0.00 sale, not an order"
    assert by_id["d2"]["notes"] == ["deleted on 2026-11-25T03:00:00Z, after as_of: still counts"]
    assert (by_id["e1"]["status"], by_id["e1"]["notes"]) == ("CLOSED", [CHANGED_LATER])
    assert by_id["e2"]["status"] == "LAYBY" and by_id["e2"]["notes"] == [CHANGED_LATER]
    reasons = {sid: by_id[sid]["reason"] for sid, _ in NOT_COUNTING}
    assert reasons == {
        "f1": "dated at or after as_of: counts from a later run",
        "g1": "entered in the POS on 2026-11-25T03:00:00Z, at or after as_of: counts from the next run",
        "k1": "parked (saved), never finished",
        "o1": "on account, still open: counts once it is closed",
        "e2": "lay-by still open: counts once it is closed",
        "l1": "lay-by still open: counts once it is closed",
        "d1": "deleted on 2026-11-24T02:00:00Z, before as_of",
        "v1": "voided",
    }
    assert "m1" not in by_id  # cy's sale at as_of


def test_sales_are_paged_newest_first_in_a_stable_order(data_dir: str) -> None:
    pages = [dashboard_customer.sales(data_dir, "cx", RULES, counting=True, page=p, per_page=3) for p in (1, 2, 3, 4)]
    assert all(p is not None for p in pages)
    ids = [[s["sale_id"] for s in p["sales"]] for p in pages if p is not None]
    assert ids == [["r1", "z1", "e1"], ["p1", "p2", "d2"], ["p3"], []]  # p1 / p2: same date, by id
    assert [(p["page"], p["pages"], p["total"]) for p in pages if p is not None][:3] == [(1, 3, 7), (2, 3, 7), (3, 3, 7)]
    assert dashboard_customer.sales(data_dir, "nobody", RULES, counting=True) is None


def test_an_unreadable_store_is_an_error_not_an_empty_list(data_dir: str, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shutil.rmtree(copy / "store")
    with pytest.raises(dashboard_customer.SalesUnavailable, match="order store"):
        dashboard_customer.sales(str(copy), "cx", RULES, counting=True)


def test_sales_route_needs_the_customer_permission(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi import HTTPException
    from fastapi.testclient import TestClient

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    sys.modules.pop("loyalty_tiers.app", None)
    import loyalty_tiers.app as app_module  # type: ignore[import-not-found]
    from loyalty_tiers.app import app, require_user  # type: ignore[import-not-found]

    audited: list[tuple[str, str, list[str]]] = []
    allowed = {"customers": True}

    class Lookup:
        def __init__(self, action: str) -> None:
            self.action = action

        def record(self, action: str, ids: list[str], total: int | None = None) -> None:
            audited.append((self.action, action, ids))

    def lookup(request: Any, user: Any, action: str) -> Lookup:
        if not allowed["customers"]:
            audited.append((action, "denied", []))
            raise HTTPException(status_code=403, detail="no")
        return Lookup(action)

    monkeypatch.setattr(app_module, "customer_lookup", lookup)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", data_dir)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", "{}")
    app.dependency_overrides[require_user] = lambda: {"name": "test"}
    try:
        client = TestClient(app)
        got = client.get("/api/customers/cx/sales", params={"counting": "false", "per_page": 2, "page": 2})
        assert got.status_code == 200 and got.headers["cache-control"] == "no-store"
        assert [s["sale_id"] for s in got.json()["sales"]] == ["k1", "o1"]  # NOT_COUNTING[2:4]
        assert client.get("/api/customers/nope/sales").status_code == 404
        assert client.get("/api/customers/cx/sales", params={"per_page": 100_000}).status_code == 422
        assert audited == [("customer_sales", "customer_sales", ["cx"]), ("customer_sales", "customer_sales", [])]
        allowed["customers"] = False
        refused = client.get("/api/customers/cx/sales")
        assert refused.status_code == 403 and "sales" not in refused.text
        assert audited[-1] == ("customer_sales", "denied", [])
        assert client.get("/static/customer.js").status_code == 200
    finally:
        app.dependency_overrides.clear()


# -- the tier history with the sync's actions --------------------------------------------------------


def test_each_run_shows_what_the_sync_did_to_the_customer(tmp_path: Path) -> None:
    from tests.unit.test_sync_against_simulator import MASS_OK, client_for, finish, plan
    from tools.lightspeed_sim.demo import generate_demo_store
    from tools.lightspeed_sim.testing import clock_after, running_simulator

    store = generate_demo_store(seed=7, customers=150, now=AS_OF)
    with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
        staff = next(gid for gid, g in sim.store.groups.items() if g["name"] == "Staff")
        protected = sim.store.labels["staff_high_spender"]
        # Day 1: a person moves one planned customer to Staff and another into its target group
        # between the plan and the write; the rest are moved.
        refs, paths, master = plan(sim, tmp_path, AS_OF, **MASS_OK)
        batches = {ref["ref"]: json.loads(Path(ref["ref"]).read_text()) for ref in refs}
        planned = [(b, m) for b in batches.values() for m in b["moves"]]
        (_, to_staff), (target_batch, to_target), (moved_batch, moved) = planned[0], planned[1], planned[2]
        # Before the batches ran (no sync log yet): planned, still running, not "failed".
        [pending] = customer_runs(str(tmp_path), moved["customer_id"], "Seed")
        assert pending["sync"] == {
            "kind": "pending", "text": f"planned from {moved['from']} to {moved_batch['group_name']}; the sync is still running",
        }  # fmt: skip
        dashboard.clear_cache()
        sim.store.move_customer_to_group(to_staff["customer_id"], staff)
        sim.store.move_customer_to_group(to_target["customer_id"], target_batch["group_id"])
        results = [sync.sync_batch(r, client_for(sim), writes_allowed=True) for r in refs]
        finish(sim, paths, master, results, 0)
        # Day 2: a dry run, which plans and writes nothing.
        day2 = AS_OF + DAY
        refs2, paths2, master2 = plan(sim, tmp_path, day2, dry_run=True, writes_allowed=False)
        assert refs2 == []
        finish(sim, paths2, master2, [], 0)
        planned2: dict[str, tuple[str, str]] = {}
        for ref in sync.read_plan_doc(paths2)["refs"]:  # type: ignore[index]
            batch = json.loads(Path(ref["ref"]).read_text())
            planned2.update({m["customer_id"]: (m["from"], batch["group_name"]) for m in batch["moves"]})

    tiers = dict(zip(master2["Customer ID"], master2["Tier"], strict=True))

    def actions(cid: str) -> list[tuple[str, str, str]]:
        return [(r["as_of"], r["sync"]["kind"], r["sync"]["text"]) for r in customer_runs(str(tmp_path), cid, tiers[cid])]

    d1, d2 = "2026-11-25T02:00:00Z", "2026-11-26T02:00:00Z"
    moved_to = moved_batch["group_name"]
    assert actions(moved["customer_id"])[1] == (d1, "moved", f"moved from {moved['from']} to {moved_to}")
    assert actions(protected) == [
        (d2, "protected", "protected: in Staff (not a tier group), never moved"),
        (d1, "protected", "protected: in Staff (not a tier group), never moved"),
    ]
    assert actions(to_staff["customer_id"]) == [
        (d2, "protected", "protected: in Staff (not a tier group), never moved"),
        (d1, "changed_in_pos", "left alone: a person changed their group in the POS after the plan"),
    ]
    target_name = target_batch["group_name"]
    assert actions(to_target["customer_id"])[1] == (
        d1, "already_in_target", f"skipped: already in {target_name} (changed in the POS)",
    )  # fmt: skip
    # Day 2's dry run: whoever it planned is "planned, not written"; the day-1 movers are in place.
    assert actions(moved["customer_id"])[0][1] in ("unchanged", "not_written")
    assert planned2  # the next day moves someone (a window edge, a new purchase)
    for cid, (old, group) in planned2.items():
        assert actions(cid)[0] == (d2, "not_written", f"planned from {old} to {group}; not written: dry run")
    left = json.loads((Path(paths.run_sync_plan_dir) / "left_alone.json").read_text())
    assert left["customers"][protected] == {"why": "protected", "group_id": staff, "group": "Staff"}


def test_each_runs_tier_comes_from_its_changes_or_the_run_before(tmp_path: Path) -> None:
    """Two published runs (test_dashboard's data dir): c6 First Time Buyer -> Sprout, c8 Sprout ->
    First Time Buyer, c1 Evergreen both days though only day 1 has a change row for them."""
    from tests.unit.test_dashboard import DAY1, build_data_dir

    url = build_data_dir(str(tmp_path))

    def tiers(cid: str) -> list[tuple[str, str | None, str | None]]:
        found = dashboard.customer(url, cid)
        assert found is not None
        return [(r["as_of"], r["tier"], (r["change"] or {}).get("kind")) for r in found["runs"]]

    d1, d2 = DAY1.strftime("%Y-%m-%dT%H:%M:%SZ"), AS_OF.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert tiers("c6") == [(d2, "Sprout", "upgrade"), (d1, "First Time Buyer", "new")]
    assert tiers("c8") == [(d2, "First Time Buyer", "downgrade"), (d1, "Sprout", "new")]
    assert tiers("c1") == [(d2, "Evergreen", None), (d1, "Evergreen", "new")]
    runs = dashboard.customer(url, "c1")["runs"]  # type: ignore[index]
    assert [r["sync"] for r in runs] == [{"kind": "no_plan", "text": "no sync plan: published, but plan_sync did not run"}] * 2
    assert all(r["published"] for r in runs)


def test_a_run_the_circuit_breaker_stopped_wrote_nothing(tmp_path: Path) -> None:
    from tests.unit.test_sync_against_simulator import plan
    from tools.lightspeed_sim.demo import generate_demo_store
    from tools.lightspeed_sim.testing import clock_after, running_simulator

    store = generate_demo_store(seed=7, customers=120, now=AS_OF)
    with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
        protected = sim.store.labels["staff_high_spender"]
        with pytest.raises(sync.MassChangeError):
            plan(sim, tmp_path, AS_OF)  # the first sync moves nearly everyone: the breaker asks
    left = json.loads((tmp_path / "runs" / "20261125T020000Z" / "sync_plan" / "left_alone.json").read_text())
    managed = next(c for c in sim.store.customers if c not in left["customers"])
    [run] = customer_runs(str(tmp_path), managed, "Seed")
    assert run["sync"] == {
        "kind": "not_written",
        "text": "nothing written: the circuit breaker stopped the run (a mass change waiting for, or refused, approval)",
    }
    [run] = customer_runs(str(tmp_path), protected, "Evergreen")
    assert run["sync"]["kind"] == "protected"


def test_the_plan_records_who_it_leaves_alone_and_why() -> None:
    import pandas as pd

    from include.tier_sync.sync.groups import GroupMap
    from include.tier_sync.sync.plan import plan_moves

    tiers = {"Evergreen": "g-ev", "Bloom": "g-bl", "Sprout": "g-sp", "Seed": "g-se", "First Time Buyer": "g-ft"}
    groups = GroupMap(tier_groups=tiers, default_group_id="g-all", names={"g-staff": "Staff", "g-all": "All Customers"})
    master = pd.DataFrame({"Customer ID": ["a", "b", "c", "d", "e", "f"],
                           "Tier": ["Seed", "Bloom", "Seed", "Sprout", "Evergreen", "None"]})  # fmt: skip
    current = pd.DataFrame({
        "id": ["a", "b", "c", "e", "f"],
        "customer_group_id": ["g-staff", "g-all", "g-all", "g-se", None],
        "deleted_at": [None, None, "2026-11-20T00:00:00Z", None, None],
    })  # fmt: skip
    found = plan_moves(master, current, groups, RULES, limit=1)
    assert [m.customer_id for m in found.moves] == ["e"]  # Evergreen first; the limit keeps one
    assert found.left_alone == {
        "a": ("protected", "g-staff"), "c": ("deleted", "g-all"), "d": ("missing", None),
        "b": ("deferred_by_limit", "g-all"),
    }  # fmt: skip
    # A downgrade an "upgrades only" approval leaves out is on record too.
    current.loc[current["id"] == "e", "customer_group_id"] = "g-ev"
    master.loc[master["Customer ID"] == "e", "Tier"] = "Seed"
    only = plan_moves(master, current, groups, RULES).upgrades_only()
    assert only.left_alone["e"] == ("left_out_by_approval", "g-ev") and "e" not in {m.customer_id for m in only.moves}


def test_erasure_removes_the_customer_from_the_new_records() -> None:
    """left_alone.json (keyed by id) and already_in_target_ids (a list of ids) are erased like the rest."""
    from include.tier_sync.erasure import scrub

    left = {"format_version": 1, "plan_id": "p", "customers": {"c1": {"why": "protected", "group_id": "g", "group": "Staff"},
                                                               "c2": {"why": "deleted", "group_id": None, "group": None}}}  # fmt: skip
    cleaned, removed = scrub(left, "c1", frozenset({"c1"}))
    assert removed == 1 and cleaned["customers"] == {"c2": left["customers"]["c2"]}
    result = {"already_in_target_ids": ["c1", "c3"], "changed_in_pos_ids": []}
    cleaned, removed = scrub(result, "c1", frozenset({"c1"}))
    assert removed == 1 and cleaned["already_in_target_ids"] == ["c3"]
