"""The sync against the X-Series simulator over real HTTP (no Airflow).

Expectations are computed independently of the pipeline: tests/oracle.py (a plain reading of
tier-rules.md over the simulator's own records) gives each customer's tier, and the "may move"
rule gives each customer's expected final group, checked for *every* customer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest

from include.tier_sync import sync
from include.tier_sync.ledger import RunPaths
from include.tier_sync.lightspeed import LightspeedClient, LightspeedUnavailable
from include.tier_sync.rules import TierRules
from tests import oracle
from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim.server import SimServer
    from tools.lightspeed_sim.store import SimStore

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 25, 2, tzinfo=UTC)
RULES = TierRules()
MASS_OK = {"allow_mass_change": True}  # the very first sync moves nearly everyone: intended
WRITES = ("POST", "PUT", "DELETE")
MEMBERS_PATH = r"^/customer_groups/[^/]+/customers$"

# -- the independent reference ---------------------------------------------------------------

TIER_GROUP = oracle.GROUPS


def reference_tiers(store: SimStore, as_of: datetime) -> dict[str, str]:
    """Customer id -> tier for every live customer, from the shared independent oracle."""
    return {cid: e.tier for cid, e in oracle.expected_tiers(store.customers, store.sales, as_of).items()}


def group_name(store: SimStore, group_id: str | None) -> str | None:
    return None if group_id is None else store.groups[group_id]["name"]


def expected_final_groups(store: SimStore, tiers: dict[str, str]) -> dict[str, str | None]:
    """Customer id -> group name after a complete sync (every other customer stays put)."""
    managed = {*TIER_GROUP.values(), "All Customers", None}
    out = {}
    for cid, customer in store.customers.items():
        now = group_name(store, customer.get("customer_group_id"))
        tier = tiers.get(cid, "None")
        if customer.get("deleted_at") or tier == "None" or now not in managed:
            out[cid] = now
        else:
            out[cid] = TIER_GROUP[tier]
    return out


def final_groups(store: SimStore) -> dict[str, str | None]:
    return {cid: group_name(store, c.get("customer_group_id")) for cid, c in store.customers.items()}


# -- running the sync the way the DAG's tasks do ----------------------------------------------


@dataclass
class Run:
    log: dict[str, Any]
    refs: list[dict[str, Any]]
    paths: RunPaths
    writes: int


def client_for(sim: SimServer, **kw: Any) -> LightspeedClient:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("rate_window_seconds", sim.rate_limiter.window_seconds)  # pace on the sim's window
    return LightspeedClient(sim.base_url, sim.token, **{**sim.CLIENT_OPTIONS, **kw})


def extract_customers(client: LightspeedClient) -> tuple[pd.DataFrame, int]:
    """What extract_orders does for customers: the whole feed (deleted included) and its cursor."""
    rows: list[dict[str, Any]] = []
    cursor = 0
    for page in client.iter_pages("/customers", params={"deleted": "true"}):
        rows += [
            {k: r.get(k) for k in ("id", "customer_group_id", "deleted_at", "version")} for r in page.data
        ]
        cursor = page.version_max or cursor
    return pd.DataFrame(rows), cursor


def master_frame(tiers: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({"Customer ID": list(tiers), "Tier": list(tiers.values())})


def writes(sim: SimServer) -> int:
    return sum(1 for r in sim.requests if r.method in WRITES)


def plan(
    sim: SimServer, data_dir: Path, as_of: datetime, rules: TierRules = RULES, **kw: Any
) -> tuple[list[dict[str, Any]], RunPaths, pd.DataFrame]:
    client = client_for(sim)
    master = master_frame(reference_tiers(sim.store, as_of))
    current, cursor = extract_customers(client)
    paths = RunPaths(str(data_dir), as_of)
    kw.setdefault("writes_allowed", True)
    refs = sync.prepare_sync(client, master, current, rules, paths, customers_cursor=cursor, **kw)
    return refs, paths, master


def finish(sim: SimServer, paths: RunPaths, master: pd.DataFrame, results: list[Any], before: int) -> Run:
    client = client_for(sim)
    groups = sync.groups_from_plan(paths)
    assert groups is not None
    check = sync.verify_group_counts(
        client,
        master,
        groups,
        expected_members=sync.read_expected_members(paths),
        left_alone=sync.left_alone_ids(paths),
        paths=paths,
    )
    identity = {"dag_id": "customer_tier_sync", "run_id": "test", "logical_date": None, "as_of": paths.as_of}
    log_doc = sync.finish_sync(paths, identity, xcom_results=results, group_check=check)
    doc = sync.read_plan_doc(paths)
    return Run(log_doc, list(doc["refs"]) if doc else [], paths, writes(sim) - before)


def full_run(sim: SimServer, data_dir: Path, as_of: datetime = NOW, workers: int = 2, **kw: Any) -> Run:
    """plan_sync -> sync_batch (mapped: one client per instance, `workers` at once) -> check -> log."""
    before = writes(sim)
    refs, paths, master = plan(sim, data_dir, as_of, **kw)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda ref: sync.sync_batch(ref, client_for(sim), writes_allowed=True), refs))
    return finish(sim, paths, master, results, before)


@pytest.fixture
def demo() -> Iterator[SimServer]:
    store = generate_demo_store(seed=7, customers=700, now=NOW)
    with running_simulator(store=store, clock=clock_after(NOW)) as sim:
        yield sim


def assert_exact(sim: SimServer, expected: dict[str, str | None]) -> None:
    actual = final_groups(sim.store)
    wrong = {cid: (expected[cid], actual[cid]) for cid in expected if expected[cid] != actual[cid]}
    assert not wrong, f"{len(wrong)} customers in the wrong group, e.g. {list(wrong.items())[:3]}"


# -- scenarios ---------------------------------------------------------------------------------


def test_normal_day_is_exact_and_a_second_run_writes_nothing(demo: SimServer, tmp_path: Path) -> None:
    store = demo.store
    staff_id = store.labels["staff_high_spender"]
    tiers = reference_tiers(store, NOW)
    assert tiers[staff_id] == "Evergreen"  # a protected high spender
    expected = expected_final_groups(store, tiers)

    first = full_run(demo, tmp_path, **MASS_OK)
    assert_exact(demo, expected)
    log_doc = first.log
    assert group_name(store, store.customers[staff_id]["customer_group_id"]) == "Staff"
    assert log_doc["synced"] is True and log_doc["errors"] == 0 and log_doc["changed_in_pos"] == 0
    assert log_doc["updated"] == log_doc["planned_moves"] > 100
    assert log_doc["protected"] >= 2 and log_doc["deleted"] == 0
    assert log_doc["group_counts_match"] is True
    assert log_doc["circuit_breaker"]["tripped"] and log_doc["circuit_breaker"]["allowed_by_param"]
    assert sum(log_doc["moves"].values()) == log_doc["planned_moves"]
    assert log_doc["moves_applied"] == log_doc["moves"]
    assert any(g["name"] == TIER_GROUP["Seed"] for g in store.groups.values())  # created (was missing)
    # one membership call per <= 100 customers, nothing per customer
    posts = [r for r in demo.requests if r.method == "POST" and "/customers" in r.path]
    assert len(posts) == sum(-(-ref["size"] // 100) for ref in first.refs)
    assert not any(r.method == "PUT" for r in demo.requests)
    assert json.loads(Path(first.paths.sync_log).read_text()) == log_doc

    second = full_run(demo, tmp_path)  # the same day again (a later as_of could move window-edge customers)
    assert second.writes == 0 and second.log["planned_moves"] == 0 and second.log["updated"] == 0
    assert second.log["group_counts_match"] is True
    assert_exact(demo, expected)

    # next day: a handful of customers cross a threshold; the default breaker lets it through
    day2 = NOW + timedelta(days=1)
    template = next(
        s for s in store.sales.values() if s.get("status") == "CLOSED" and not s.get("deleted_at")
    )
    movers = [
        cid
        for cid, t in tiers.items()
        if t in ("Seed", "First Time Buyer") and expected[cid] == TIER_GROUP[t]
    ]
    for i, cid in enumerate(movers[:6]):
        sale = copy.deepcopy(template)
        sale.update(
            id=f"day2-sale-{i}",
            customer_id=cid,
            total_price_incl=Decimal("1600.00"),
            sale_date=(day2 - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S+00:00"),
            version=store.new_version(),
        )
        store.sales[sale["id"]] = sale
    expected2 = expected_final_groups(store, reference_tiers(store, day2))
    third = full_run(demo, tmp_path, as_of=day2)
    assert_exact(demo, expected2)
    changed = [cid for cid in expected2 if expected2[cid] != expected[cid]]
    assert len(changed) >= 6  # the six buyers, plus anyone whose 30-day streak just ended
    assert third.log["updated"] == third.log["planned_moves"] == len(changed)
    assert third.writes == len({expected2[cid] for cid in changed})  # one membership call per target


def test_dry_run_and_superseded_runs_write_nothing(demo: SimServer, tmp_path: Path) -> None:
    before_groups = final_groups(demo.store)
    n_groups = len(demo.store.groups)
    run = full_run(demo, tmp_path, dry_run=True)
    assert run.refs and run.writes == 0
    assert final_groups(demo.store) == before_groups and len(demo.store.groups) == n_groups
    assert run.log["synced"] is False and run.log["dry_run"] is True
    assert run.log["skipped"] == run.log["planned_moves"] > 0 and run.log["updated"] == 0
    # the batch files exist (the record of what would be sent); a batch told not to write sends nothing
    requests = len(demo.requests)
    result = sync.sync_batch(run.refs[0], client_for(demo), writes_allowed=False)
    assert result["skipped"] == run.refs[0]["size"] and len(demo.requests) == requests

    superseded = full_run(demo, tmp_path, writes_allowed=False, skipped_reason="superseded")
    assert superseded.writes == 0 and superseded.log["skipped_reason"] == "superseded"


def test_circuit_breaker_stops_before_any_write(demo: SimServer, tmp_path: Path) -> None:
    n_groups = len(demo.store.groups)
    with pytest.raises(sync.MassChangeError):
        plan(demo, tmp_path, NOW)
    assert writes(demo) == 0 and len(demo.store.groups) == n_groups  # not even the missing group
    paths = RunPaths(str(tmp_path), NOW)
    log_doc = sync.finish_sync(paths, {"run_id": "t"})
    assert log_doc["synced"] is False and log_doc["skipped_reason"] == "circuit_breaker"
    assert log_doc["circuit_breaker"]["tripped"] and log_doc["skipped"] == log_doc["planned_moves"] > 0


def test_rate_limited_store_completes(tmp_path: Path) -> None:
    store = generate_demo_store(seed=11, customers=700, now=NOW)
    expected = expected_final_groups(store, reference_tiers(store, NOW))
    with running_simulator(store=store, clock=clock_after(NOW), rate_limit=12, window_seconds=1.0, retry_after="seconds") as sim:
        run = full_run(sim, tmp_path, workers=3, **MASS_OK)
        assert_exact(sim, expected)
        assert any(r.status == 429 for r in sim.requests)
    assert run.log["api"]["rate_limited"] > 0
    assert run.log["errors"] == 0 and run.log["failed_batches"] == 0
    assert run.log["updated"] == run.log["planned_moves"]


def test_faults_still_end_exact(demo: SimServer, tmp_path: Path) -> None:
    expected = expected_final_groups(demo.store, reference_tiers(demo.store, NOW))
    demo.faults.add("status", method="POST", path=MEMBERS_PATH, times=2, status=503)
    demo.faults.add("reset", method="POST", path=MEMBERS_PATH, times=1)
    demo.faults.add("apply_then_500", method="POST", path=MEMBERS_PATH, times=3)
    demo.faults.add("status", method="GET", path=r"^/customers$", times=2, status=502)
    run = full_run(demo, tmp_path, **MASS_OK)
    assert_exact(demo, expected)
    assert run.log["errors"] == 0 and run.log["updated"] == run.log["planned_moves"]
    assert run.log["api"]["retries"] >= 6  # the 2 GET faults hit the test's own extraction first


def test_a_batch_retried_after_an_unacknowledged_write_is_idempotent(demo: SimServer, tmp_path: Path) -> None:
    expected = expected_final_groups(demo.store, reference_tiers(demo.store, NOW))
    before = writes(demo)
    refs, paths, master = plan(demo, tmp_path, NOW, **MASS_OK)
    big = max(refs, key=lambda r: r["size"])
    assert big["size"] > 100  # several calls in one batch
    demo.faults.add("apply_then_500", method="POST", path=MEMBERS_PATH, times=1)
    # no client retries: the applied-then-500 write escapes to "Airflow", which retries the batch
    with pytest.raises(LightspeedUnavailable):
        sync.sync_batch(big, client_for(demo, max_retries=0), writes_allowed=True)
    assert json.loads(Path(sync.result_path(big["ref"])).read_text())["status"] == "failed"
    versions = {cid: c["version"] for cid, c in demo.store.customers.items()}
    retry = sync.sync_batch(big, client_for(demo), writes_allowed=True)
    assert retry["updated"] == big["size"] and retry["skipped"] == 0 and retry["errors"] == 0
    results = [retry] + [
        sync.sync_batch(r, client_for(demo), writes_allowed=True) for r in refs if r is not big
    ]
    run = finish(demo, paths, master, results, before)
    assert_exact(demo, expected)
    assert run.log["updated"] == run.log["planned_moves"] and run.log["errors"] == 0
    # the retry did not touch the customers the failed attempt had already moved
    first_call = [m["customer_id"] for m in json.loads(Path(big["ref"]).read_text())["moves"][:100]]
    assert all(demo.store.customers[c]["version"] == versions[c] for c in first_call)
    # and running the very same batch again changes nothing at all
    again = writes(demo)
    sync.sync_batch(big, client_for(demo), writes_allowed=True)
    assert writes(demo) == again


def test_changes_made_in_the_pos_after_the_plan_are_left_alone(demo: SimServer, tmp_path: Path) -> None:
    store = demo.store
    expected = expected_final_groups(store, reference_tiers(store, NOW))
    before = writes(demo)
    refs, paths, master = plan(demo, tmp_path, NOW, **MASS_OK)
    moves = [m for ref in refs for m in json.loads(Path(ref["ref"]).read_text())["moves"]]
    batch_of = {
        m["customer_id"]: ref for ref in refs for m in json.loads(Path(ref["ref"]).read_text())["moves"]
    }
    to_staff, to_target, deleted = (moves[0]["customer_id"], moves[1]["customer_id"], moves[2]["customer_id"])
    staff = next(gid for gid, g in store.groups.items() if g["name"] == "Staff")
    store.move_customer_to_group(to_staff, staff)  # a person, between plan and write
    store.move_customer_to_group(to_target, batch_of[to_target]["group_id"])
    store.delete_customer(deleted)
    expected[to_staff] = "Staff"
    expected[deleted] = group_name(store, store.customers[deleted]["customer_group_id"])
    results = [sync.sync_batch(r, client_for(demo), writes_allowed=True) for r in refs]
    run = finish(demo, paths, master, results, before)
    assert_exact(demo, expected)
    assert run.log["changed_in_pos"] == 1 and run.log["changed_in_pos_ids"] == [to_staff]
    assert run.log["skip_reasons"] == {"already_in_target": 1, "deleted": 1}
    assert run.log["updated"] == run.log["planned_moves"] - 3 and run.log["errors"] == 0
    assert run.log["group_counts_match"] is True


def test_refused_membership_call_falls_back_per_customer(demo: SimServer, tmp_path: Path) -> None:
    expected = expected_final_groups(demo.store, reference_tiers(demo.store, NOW))
    before = writes(demo)
    refs, paths, master = plan(demo, tmp_path, NOW, **MASS_OK)
    first_batch = json.loads(Path(refs[0]["ref"]).read_text())
    lost = first_batch["moves"][5]["customer_id"]
    demo.faults.add("status", method="POST", path=MEMBERS_PATH, times=1, status=400)
    demo.faults.add("status", method="GET", path=rf"^/customers/{lost}$", status=404)
    results = [sync.sync_batch(r, client_for(demo), writes_allowed=True) for r in refs]
    run = finish(demo, paths, master, results, before)
    expected[lost] = group_name(demo.store, demo.store.customers[lost]["customer_group_id"])
    assert_exact(demo, expected)
    assert run.log["error_details"] == [{"customer_id": lost, "error": "not found (HTTP 404)"}]
    puts = [r for r in demo.requests if r.method == "PUT"]
    assert len(puts) == min(100, refs[0]["size"]) - 1
    assert run.log["updated"] == run.log["planned_moves"] - 1
    with pytest.raises(sync.SyncFailed):
        sync.raise_for_sync_errors(run.log)
    assert json.loads(Path(paths.run_sync_log).read_text())["errors"] == 1  # written before failing
