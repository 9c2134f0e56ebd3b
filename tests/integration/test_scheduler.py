"""customer_tier_sync under the real scheduler: PostgreSQL metadata DB, LocalExecutor, api-server.

`airflow dags test` runs every task in one process and ignores pools and backfills; these tests
run the DAG the way a deployment does (tests/integration/cluster.py) against the Lightspeed
simulator (a thread of this test process), and check the outcome against tests/oracle.py:

* a triggered onboarding run ends with every customer in exactly the group the oracle expects, and
  a second run moves nobody;
* the `lightspeed_api` pool (2 slots, from airflow_settings.yaml) never had more than 2
  `sync_batch` instances running at once, from task-instance start/end times, and did run 2 at
  once (so the check is not vacuous); the simulator saw the same from its side;
* `airflow backfill create` over three days makes one run per day, each computing tiers as of
  its own day (tier history rows per day), only the newest day writing to the POS;
* the scheduler and its LocalExecutor workers are killed mid-sync; after a restart and
  `airflow dags clear --run-id`, the run ends in exactly the right groups and no customer
  received two membership writes.

One cluster serves the module (start-up is ~30 s); each test gets its own simulator and data dir,
and the scheduler is restarted to pick up the new connection / Variable environment.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import oracle
from tests.integration.cluster import (
    AirflowCluster,
    TaskInstanceRow,
    max_overlap,
    postgres_unavailable_reason,
    wait_until,
)
from tools.lightspeed_sim import SimStore, generate_demo_store
from tools.lightspeed_sim.testing import running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim.server import SimServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "customer_tier_sync"
TOKEN = "scheduler-it-token-7c1e"
MEMBERSHIP_PATH = re.compile(r"^/customer_groups/([^/]+)/customers$")
CUSTOMER_PATH = re.compile(r"^/customers/([^/]+)$")
RUN_TIMEOUT = 300


# --------------------------------------------------------------------------------------------
# The POS side: a simulator that also records who was written where (bodies, not only paths)
# --------------------------------------------------------------------------------------------


@dataclass
class Write:
    method: str
    target: str  # group id (membership) or customer id (PUT)
    customer_ids: list[str]
    status: int
    at: float


@dataclass
class Pos:
    """The simulator plus a record of every write's customer ids and of membership calls in flight."""

    sim: SimServer
    initial_customers: dict[str, dict[str, Any]]
    initial_groups: dict[str, dict[str, Any]]
    writes: list[Write] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def install(self) -> None:
        route = self.sim.route
        match = self.sim.faults.match

        def recording_route(method: str, sub: str, query: dict[str, list[str]], body: bytes) -> Any:
            resp = route(method, sub, query, body)
            ids: list[str] = []
            target = ""
            m = MEMBERSHIP_PATH.match(sub)
            c = CUSTOMER_PATH.match(sub)
            if method in ("POST", "DELETE") and m:
                target = m.group(1)
                ids = [str(i) for i in (json.loads(body or b"{}").get("customer_ids") or [])]
            elif method == "PUT" and c:
                target = c.group(1)
                ids = [c.group(1)]
            if method != "GET":
                with self.lock:
                    self.writes.append(Write(method, target, ids, int(resp.status), time.monotonic()))
                    if method == "POST" and m:
                        self.in_flight -= 1
            return resp

        def counting_match(method: str, sub: str, full: str) -> Any:
            # Called when a request arrives (before a latency fault sleeps): count membership
            # calls between arrival and the store applying them.
            if method == "POST" and MEMBERSHIP_PATH.match(sub):
                with self.lock:
                    self.arrivals += 1
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return match(method, sub, full)

        self.sim.route = recording_route  # type: ignore[method-assign]
        self.sim.faults.match = counting_match  # type: ignore[method-assign,assignment]

    def membership_writes(self, since: int = 0) -> list[Write]:
        """Accepted writes that put customers somewhere (membership POST/DELETE, customer PUT)."""
        with self.lock:
            return [w for w in self.writes[since:] if w.status < 300 and w.customer_ids]

    def initial_group_name(self, customer_id: str) -> str:
        names = {gid: str(g["name"]) for gid, g in self.initial_groups.items()}
        return names.get(self.initial_customers[customer_id].get("customer_group_id") or "", oracle.DEFAULT_GROUP)

    def group_names(self) -> dict[str, str]:
        return {gid: str(g["name"]) for gid, g in self.sim.store.groups.items() if not g.get("deleted_at")}

    def final_group_names(self) -> dict[str, str]:
        """customer id -> name of the group the customer is in now (as the oracle names them)."""
        names = self.group_names()
        return {
            cid: names.get(c.get("customer_group_id") or "", oracle.DEFAULT_GROUP)
            for cid, c in self.sim.store.customers.items()
        }

    def expected_group_names(self, as_of: datetime) -> dict[str, str]:
        tiers = oracle.expected_tiers(self.initial_customers, dict(self.sim.store.sales), as_of)
        return oracle.expected_final_groups(self.initial_customers, self.initial_groups, tiers)


@dataclass
class Deployment:
    cluster: AirflowCluster
    pos: Pos
    data_dir: Path

    def trigger(self, conf: dict[str, Any] | None = None) -> str:
        return self.cluster.trigger(DAG_ID, conf=conf)

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        return self.cluster.wait_for_run(DAG_ID, run_id, timeout=timeout).state

    def run_dir(self, run_id: str) -> Path:
        for path in sorted((self.data_dir / "runs").glob("*/run.json")):
            if json.loads(path.read_text()).get("run_id") == run_id:
                return path.parent
        raise AssertionError(f"no run folder for {run_id} under {self.data_dir / 'runs'}")

    def as_of(self, run_id: str) -> datetime:
        run = json.loads((self.run_dir(run_id) / "run.json").read_text())
        return datetime.fromisoformat(str(run["as_of"]).replace("Z", "+00:00"))

    def diagnose(self, run_id: str) -> str:
        out = [self.cluster.describe_run(DAG_ID, run_id)]
        for ti in self.cluster.task_instances(DAG_ID, run_id):
            if ti.state not in ("success", "skipped"):
                text = self.cluster.task_log(DAG_ID, run_id, ti.task_id, map_index=ti.map_index)
                out.append(f"--- {ti.task_id}[{ti.map_index}] log (tail) ---\n" + "\n".join(text.splitlines()[-30:]))
        return "\n".join(out)


DeployFn = Callable[[SimStore], AbstractContextManager[Deployment]]


def demo_store(customers: int = 300, seed: int = 42) -> SimStore:
    # Every record predates "now" (a few minutes back), so a run triggered now sees all of it.
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    return generate_demo_store(seed=seed, customers=customers, now=now)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowCluster]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with AirflowCluster(tmp_path_factory.mktemp("scheduler-cluster")) as c:
        c.wait_for_dag(DAG_ID)
        c.unpause(DAG_ID)
        yield c


@pytest.fixture(scope="module")
def deploy(cluster: AirflowCluster, tmp_path_factory: pytest.TempPathFactory) -> DeployFn:
    """`with deploy(store) as d:` a simulator serving `store`, the cluster pointed at it."""

    @contextmanager
    def _deploy(store: SimStore) -> Iterator[Deployment]:
        work = tmp_path_factory.mktemp("deployment")
        pos_customers = copy.deepcopy(store.customers)
        pos_groups = copy.deepcopy(store.groups)
        with running_simulator(store=store, token=TOKEN) as sim:
            pos = Pos(sim, pos_customers, pos_groups)
            pos.install()
            env = {
                "AIRFLOW_CONN_LIGHTSPEED_DEFAULT": json.dumps(
                    sim.airflow_connection(TOKEN, registers=1, rate_budget_dir=str(work / "rate_budget"))
                ),
                "AIRFLOW_VAR_TIER_SYNC_DATA_DIR": str(work / "data"),
            }
            # Tasks inherit the environment of the scheduler (LocalExecutor workers are its children).
            cluster.set_env(env, restart=["scheduler"])
            yield Deployment(cluster, pos, work / "data")

    return _deploy


# --------------------------------------------------------------------------------------------
# A triggered onboarding run, shared by the end-to-end and the pool tests
# --------------------------------------------------------------------------------------------


@dataclass
class Onboarding:
    deployment: Deployment
    run_id: str
    state: str
    tis: list[TaskInstanceRow]
    writes: int


@pytest.fixture(scope="module")
def onboarding(deploy: DeployFn) -> Iterator[Onboarding]:
    with deploy(demo_store()) as d:
        # Each membership call takes 3 s, so batches surely overlap if the pool lets them.
        d.pos.sim.faults.add("latency", seconds=3.0, method="POST", path=MEMBERSHIP_PATH.pattern)
        run_id = d.trigger({"allow_mass_change": True})
        state = d.wait(run_id)
        d.pos.sim.faults.clear()
        yield Onboarding(d, run_id, state, d.cluster.task_instances(DAG_ID, run_id), len(d.pos.writes))


def test_triggered_run_end_to_end(onboarding: Onboarding) -> None:
    d, run_id = onboarding.deployment, onboarding.run_id
    assert onboarding.state == "success", d.diagnose(run_id)
    states = {(ti.task_id, ti.map_index): ti.state for ti in onboarding.tis}
    core = ["extract_orders", "compute_tiers", "validate_tiers", "publish_run", "commit_csv", "plan_sync",
            "verify_group_counts", "write_sync_log"]
    assert all(states.get((t, -1)) == "success" for t in core), states
    assert {s for (t, _), s in states.items() if t == "sync_batch"} == {"success"}, states

    # Every customer is in exactly the group the independent oracle puts them in.
    as_of = d.as_of(run_id)
    run = d.cluster.dag_run(DAG_ID, run_id)
    assert run.run_type == "manual" and run.logical_date is None
    assert run.run_after is not None and abs((as_of - run.run_after).total_seconds()) < 1
    expected = d.pos.expected_group_names(as_of)
    final = d.pos.final_group_names()
    wrong = {cid: (final[cid], want) for cid, want in expected.items() if final[cid] != want}
    assert not wrong, f"{len(wrong)} customers in the wrong group: {list(wrong.items())[:5]}"
    moved = sum(1 for cid in expected if final[cid] != d.pos.initial_group_name(cid))
    assert moved > 50, moved  # an onboarding sync really moves people

    log = json.loads((d.data_dir / "tier_sync_log.json").read_text())
    assert log["synced"] is True and log["errors"] == 0 and log["group_counts_match"] is True, log
    assert log["run_id"] == run_id and log["updated"] == moved, log
    git = subprocess.run(["git", "--git-dir", str(d.data_dir / "git" / "tiers.git"), "log", "--oneline"],
                         capture_output=True, text=True, check=True)
    assert git.stdout.strip(), "commit_csv pushed nothing"

    # A second run, triggered with the default params, finds nothing to move.
    before = len(d.pos.writes)
    second = d.trigger()
    assert d.wait(second) == "success", d.diagnose(second)
    assert d.pos.membership_writes(since=before) == []
    tis = d.cluster.task_instances(DAG_ID, second)
    assert {ti.state for ti in tis if ti.task_id == "sync_batch"} <= {"skipped"}
    log2 = json.loads((d.data_dir / "tier_sync_log.json").read_text())
    assert log2.get("updated", 0) == 0 and log2["errors"] == 0, log2
    assert d.pos.final_group_names() == final


def test_pool_caps_sync_batch_at_two_slots(onboarding: Onboarding) -> None:
    d = onboarding.deployment
    assert onboarding.state == "success", d.diagnose(onboarding.run_id)
    # The pool comes from airflow_settings.yaml through tools.load_settings, as in a deployment.
    assert d.cluster.sql("SELECT slots FROM slot_pool WHERE pool = 'lightspeed_api'") == [(2,)]

    batches = [ti for ti in onboarding.tis if ti.task_id == "sync_batch"]
    assert len(batches) >= 3, f"only {len(batches)} sync_batch instances: the pool limit is not exercised"
    assert {ti.pool for ti in batches} == {"lightspeed_api"}
    assert all(ti.try_number == 1 for ti in batches), "a retried batch would blur the timing evidence"
    intervals = []
    for ti in batches:
        assert ti.start_date is not None and ti.end_date is not None, ti
        intervals.append((ti.start_date, ti.end_date))
    peak = max_overlap(intervals)
    timeline = "\n".join(f"  [{ti.map_index}] {ti.start_date:%H:%M:%S.%f} -> {ti.end_date:%H:%M:%S.%f}"
                         for ti in sorted(batches, key=lambda t: t.start_date or datetime.min))
    assert peak <= 2, f"{peak} sync_batch instances ran at once in a 2-slot pool:\n{timeline}"
    assert peak == 2, f"sync_batch never ran 2 at once, so the limit was not tested:\n{timeline}"
    # The POS side agrees: never more than 2 membership calls in flight at once.
    assert 1 < d.pos.max_in_flight <= 2, d.pos.max_in_flight


# --------------------------------------------------------------------------------------------
# Backfill
# --------------------------------------------------------------------------------------------


def latest_boundary(now: datetime) -> datetime:
    boundary = now.replace(hour=2, minute=0, second=0, microsecond=0)
    return boundary if boundary <= now else boundary - timedelta(days=1)


def add_sale(store: SimStore, customer_id: str, when: datetime, amount: str) -> str:
    """A CLOSED sale of `amount` (tax included) rung up at `when` for `customer_id`."""
    template = next(s for s in store.sales.values() if s.get("status") == "CLOSED" and s.get("total_price_incl"))
    sale = copy.deepcopy(template)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    total = Decimal(amount)
    sale.update(
        id=store.new_id(), customer_id=customer_id, status="CLOSED", return_for=None, return_ids=[],
        total_price_incl=total, total_tax=Decimal("0"), total_price=total, sale_date=stamp,
        created_at=stamp, updated_at=stamp, deleted_at=None, version=store.new_version(),
    )
    store.sales[sale["id"]] = sale
    return str(sale["id"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def test_backfill_three_days(deploy: DeployFn) -> None:
    last = latest_boundary(datetime.now(UTC))  # end of the newest complete daily interval
    days = [last - timedelta(days=2), last - timedelta(days=1), last]  # the as_of of each run
    store = demo_store()
    # One loyalty customer with $249.99 (Seed) buys $2,000 between the first and second day:
    # Seed as of day 1, Evergreen as of days 2 and 3, if each run really computes as of its day.
    riser = store.labels["seed_249_99"]
    add_sale(store, riser, days[0] + timedelta(hours=6), "2000.00")

    with deploy(store) as d:
        c = d.cluster
        before = {r.run_id for r in c.dag_runs(DAG_ID)}
        # --from/--to are inclusive bounds on logical_date, which is the *start* of each interval.
        # The newest day is the store's first sync, hence allow_mass_change (the breaker would stop it).
        c.airflow("backfill", "create", "--dag-id", DAG_ID,
                  "--from-date", (days[0] - timedelta(days=1)).isoformat(),
                  "--to-date", (days[-1] - timedelta(days=1)).isoformat(),
                  "--dag-run-conf", json.dumps({"allow_mass_change": True}),
                  log_name="backfill-create")

        def backfill_runs() -> list[Any]:
            return [r for r in c.dag_runs(DAG_ID) if r.run_id not in before]

        wait_until(lambda: len(backfill_runs()) == 3 and all(r.state in ("success", "failed") for r in backfill_runs()),
                   timeout=3 * RUN_TIMEOUT, what="three back-filled runs to finish", interval=3,
                   diagnostics=lambda: "\n".join(c.describe_run(DAG_ID, r.run_id) for r in backfill_runs()))
        runs = sorted(backfill_runs(), key=lambda r: r.logical_date)
        for r in runs:
            assert r.state == "success", d.diagnose(r.run_id)
        assert [r.run_type for r in runs] == ["backfill"] * 3
        print("backfill runs (start -> end):", [(r.run_id, f"{r.start_date:%H:%M:%S}", f"{r.end_date:%H:%M:%S}") for r in runs])
        assert [r.data_interval_end for r in runs] == days
        assert [r.logical_date for r in runs] == [day - timedelta(days=1) for day in days]

        # Tier history: one block of rows per day, written by that day's run.
        history = read_csv(d.data_dir / "tier_history.csv")
        by_day: dict[str, dict[str, int]] = {}
        for row in history:
            by_day.setdefault(row["as_of"], {})[row["tier"]] = int(row["count"])
        iso_days = [day.strftime("%Y-%m-%dT%H:%M:%SZ") for day in days]
        assert sorted(by_day) == iso_days
        assert {row["as_of"]: row["run_id"] for row in history} == {
            iso: r.run_id for iso, r in zip(iso_days, runs, strict=True)
        }

        for day, iso, r in zip(days, iso_days, runs, strict=True):
            # Each run's CSV is as of its own day and agrees with the oracle at that instant.
            assert d.as_of(r.run_id) == day
            master = {row["Customer ID"]: row for row in read_csv(d.run_dir(r.run_id) / "customer_analytics_master.csv")}
            assert {row["Last Updated"] for row in master.values()} == {iso}
            want = oracle.expected_tiers(d.pos.initial_customers, dict(d.pos.sim.store.sales), day)
            wrong = {cid: (master[cid]["Tier"], e.tier) for cid, e in want.items()
                     if cid in master and master[cid]["Tier"] != e.tier}
            assert not wrong, f"as of {iso}: {list(wrong.items())[:5]}"
            assert Counter(row["Tier"] for row in master.values()) == Counter(by_day[iso])
        tiers_of_riser = [
            read_master_tier(d.run_dir(r.run_id) / "customer_analytics_master.csv", riser) for r in runs
        ]
        assert tiers_of_riser == ["Seed", "Evergreen", "Evergreen"]

        # Only the latest wrote to the POS: the two older days planned and logged, skipping the
        # writes (every sync_batch skipped); the newest day is the latest run and synced the groups
        # exactly as of its own day.
        for r in runs[:2]:
            states = {ti.task_id: ti.state for ti in c.task_instances(DAG_ID, r.run_id)}
            assert states.get("plan_sync") == "success" and states.get("sync_batch") == "skipped", states
            log = json.loads((d.run_dir(r.run_id) / "tier_sync_log.json").read_text())
            assert log["synced"] is False and "backfill" in str(log["skipped_reason"]), log
        log = json.loads((d.run_dir(runs[-1].run_id) / "tier_sync_log.json").read_text())
        assert log["synced"] is True and log["updated"] == log["planned_moves"] > 0 and log["errors"] == 0, log
        assert d.pos.membership_writes() and d.pos.final_group_names() == d.pos.expected_group_names(days[-1])


def read_master_tier(path: Path, customer_id: str) -> str:
    return next(row["Tier"] for row in read_csv(path) if row["Customer ID"] == customer_id)


# --------------------------------------------------------------------------------------------
# A worker killed mid-sync, the run cleared and re-run
# --------------------------------------------------------------------------------------------


def test_killed_worker_then_cleared_run_moves_each_customer_once(deploy: DeployFn) -> None:
    with deploy(demo_store()) as d:
        c, pos = d.cluster, d.pos
        # Slow membership calls: the kill lands while writes are in flight.
        pos.sim.faults.add("latency", seconds=4.0, method="POST", path=MEMBERSHIP_PATH.pattern)
        run_id = d.trigger({"allow_mass_change": True})

        def mid_sync() -> bool:
            running = [ti for ti in c.task_instances(DAG_ID, run_id) if ti.task_id == "sync_batch" and ti.state == "running"]
            with pos.lock:
                landed = sum(1 for w in pos.writes if w.method == "POST" and w.customer_ids)
                return bool(running) and landed >= 1 and pos.arrivals > landed

        wait_until(mid_sync, timeout=RUN_TIMEOUT, what="the sync to be under way", interval=0.2,
                   diagnostics=lambda: d.diagnose(run_id))
        # Snapshot right before the kill: a write in flight now (arrived, not yet applied) lands
        # afterwards however long the kill takes, because the POS keeps serving it.
        with pos.lock:
            landed_before_restart = len(pos.membership_writes())
            applied_posts = sum(1 for w in pos.writes if w.method == "POST" and w.customer_ids)
            assert pos.arrivals > applied_posts, "no write in flight at the kill"
        killed = c.kill_service("scheduler")
        assert len(killed) > 1  # the scheduler and its executor's worker/task processes
        pos.sim.faults.clear()
        time.sleep(5)  # let an in-flight (unacknowledged) write land at the POS, as a real one would
        landed_after_kill = len(pos.membership_writes())
        assert landed_after_kill > landed_before_restart, "no write was in flight when the worker died"

        stale = c.task_instances(DAG_ID, run_id)
        assert "running" in {ti.state for ti in stale if ti.task_id == "sync_batch"}, c.describe_run(DAG_ID, run_id)
        # The operator clears the broken run (DB only: works with the scheduler down) and brings the
        # scheduler back. Task instances still marked running become "restarting"; the restarted
        # scheduler resets them once the dead SchedulerJob's heartbeat is stale (orphan check).
        c.airflow("dags", "clear", DAG_ID, "--run-id", run_id, "--yes", log_name="dags-clear")
        c.start_service("scheduler")
        assert d.wait(run_id) == "success", d.diagnose(run_id)
        tries = sorted((t.task_id, t.map_index, t.try_number, t.state) for t in c.task_instance_tries(DAG_ID, run_id)
                       if t.task_id == "sync_batch")
        print(f"killed {len(killed)} processes; membership writes: {landed_before_restart} acknowledged before the "
              f"kill, {landed_after_kill} after the in-flight ones landed, {len(pos.membership_writes())} in all; "
              f"sync_batch tries: {tries}")

        # Exactly the right groups ...
        as_of = d.as_of(run_id)
        expected = pos.expected_group_names(as_of)
        final = pos.final_group_names()
        wrong = {cid: (final[cid], want) for cid, want in expected.items() if final[cid] != want}
        assert not wrong, f"{len(wrong)} customers in the wrong group: {list(wrong.items())[:5]}"
        # ... and no customer written twice (each accepted membership write names distinct customers).
        writes = pos.membership_writes()
        assert all(w.method == "POST" for w in writes), writes
        per_customer = Counter(cid for w in writes for cid in w.customer_ids)
        twice = {cid: n for cid, n in per_customer.items() if n > 1}
        assert not twice, f"customers written more than once: {list(twice.items())[:10]}"
        changed = {cid for cid in expected if final[cid] != pos.initial_group_name(cid)}
        assert set(per_customer) == changed
        assert 0 < landed_before_restart < len(writes), (landed_before_restart, len(writes))
        log = json.loads((d.data_dir / "tier_sync_log.json").read_text())
        assert log["errors"] == 0 and log["group_counts_match"] is True, log
