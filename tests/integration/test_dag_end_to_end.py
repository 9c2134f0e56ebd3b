"""The whole DAG through `airflow dags test`, against the simulator over real HTTP.

Each test gets its own AIRFLOW_HOME (a copy of one migrated SQLite DB), data dir, git remote and
simulator store, and checks outcomes against tests/oracle.py, an independent reading
of the tier rules that shares no code with the pipeline.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tools.lightspeed_sim import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
DAG_ID = "customer_tier_sync"
AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
TOKEN = "e2e-secret-token-4f9a"
WRITES = {"POST", "PUT", "DELETE"}


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
    )
    return env


@pytest.fixture(scope="session")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `airflow db migrate` per session; tests copy the resulting SQLite file."""
    home = tmp_path_factory.mktemp("airflow-template")
    subprocess.run([AIRFLOW, "db", "migrate"], env=_base_env(home), check=True, capture_output=True, timeout=600)
    assert (home / "airflow.db").exists()
    return home


@dataclass
class Deployment:
    home: Path
    data_dir: Path
    sim: Any
    extra_env: dict[str, str] = field(default_factory=dict)
    runs: int = 0

    def env(self) -> dict[str, str]:
        env = _base_env(self.home)
        env["AIRFLOW_CONN_LIGHTSPEED_DEFAULT"] = json.dumps(
            self.sim.airflow_connection(
                TOKEN, registers=1, rate_budget_dir=str(self.home / "rate_budget"), max_retries=6
            )
        )
        env["AIRFLOW_VAR_TIER_SYNC_DATA_DIR"] = str(self.data_dir)
        env.update(self.extra_env)
        return env

    def dags_test(self, as_of: datetime = AS_OF, conf: dict[str, Any] | None = None) -> tuple[str, str]:
        """Run the DAG for the interval ending at as_of; returns (final run state, full output)."""
        self.runs += 1
        out = subprocess.run(
            [AIRFLOW, "dags", "test", DAG_ID, as_of.isoformat(), "-c", json.dumps(conf or {})],
            env=self.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        text = out.stdout + out.stderr
        (self.home / f"dags-test-{self.runs}.log").write_text(text)
        states = re.findall(r"DagRun Finished: .*?state=(\w+)", text)
        assert states, f"no DagRun result in the output:\n{text[-4000:]}"
        return states[-1], text

    def writes(self) -> list[Any]:
        return [r for r in self.sim.requests if r.method in WRITES]

    def master_rows(self) -> dict[str, dict[str, str]]:
        with (self.data_dir / "customer_analytics_master.csv").open(newline="", encoding="utf-8-sig") as fh:
            return {r["Customer ID"]: r for r in csv.DictReader(fh)}

    def sync_log(self) -> dict[str, Any]:
        return json.loads((self.data_dir / "tier_sync_log.json").read_text())

    def git_log(self) -> list[str]:
        remote = self.data_dir / "git" / "tiers.git"
        if not remote.exists():
            return []
        out = subprocess.run(["git", "--git-dir", str(remote), "log", "--format=%H %s"], capture_output=True, text=True)
        return out.stdout.splitlines()

    def final_group_names(self) -> dict[str, str]:
        store = self.sim.store
        names = {gid: g["name"] for gid, g in store.groups.items()}
        return {cid: names.get(c.get("customer_group_id") or "", oracle.DEFAULT_GROUP) for cid, c in store.customers.items()}


@pytest.fixture
def deployment(migrated_home: Path, tmp_path: Path) -> Iterator[Deployment]:
    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(migrated_home / "airflow.db", home / "airflow.db")
    store = generate_demo_store(seed=7, customers=120, now=AS_OF)
    # The simulator stamps every write (the sync's, and each test's own store changes) from a
    # clock that starts just after AS_OF: a mutation made before the next day's run lies inside
    # [AS_OF, AS_OF + 1 day) whatever the calendar says.
    with running_simulator(store=store, token=TOKEN, clock=clock_after(AS_OF)) as sim:
        yield Deployment(home=home, data_dir=tmp_path / "data", sim=sim)


def _expected(dep: Deployment, as_of: datetime = AS_OF) -> dict[str, oracle.Expected]:
    store = dep.sim.store
    return oracle.expected_tiers(store.customers, store.sales, as_of)


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_normal_day_exact_csv_and_groups_then_rerun_is_a_no_op(deployment: Deployment) -> None:
    dep = deployment
    before = {cid: dict(c) for cid, c in dep.sim.store.customers.items()}
    expected = _expected(dep)

    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]

    # The master CSV, row by row, against the independent oracle.
    rows = dep.master_rows()
    assert set(rows) == set(expected)
    for cid, exp in expected.items():
        row = rows[cid]
        assert row["Lifetime Value"] == exp.ltv, cid
        assert int(row["Order Count"]) == exp.orders, cid
        assert int(row["Purchases Last 30 Days"]) == exp.last_30, cid
        assert row["First Order"] == _iso(exp.first), cid
        assert row["Last Order"] == _iso(exp.last), cid
        assert row["Loyalty Member"] == ("true" if exp.loyalty else "false"), cid
        assert row["Tier"] == exp.tier, cid
        assert row["Last Updated"] == "2026-11-25T02:00:00Z"
    assert {e.tier for e in expected.values()} == set(oracle.GROUPS) | {"None"}, "the demo store should exercise every tier"

    # Every customer ends in exactly the right group; protected and no-tier customers are untouched.
    final = dep.final_group_names()
    assert final == oracle.expected_final_groups(before, dep.sim.store.groups, expected)
    protected = [cid for cid, c in before.items() if final[cid] in {"Staff", "Wholesale"}]
    assert protected and all(dep.sim.store.customers[c]["version"] == before[c]["version"] for c in protected)

    log = dep.sync_log()
    for key in ("dag_id", "run_id", "logical_date", "as_of", "started_at", "finished_at", "dry_run", "synced",
                "total_customers", "planned_moves", "updated", "skipped", "protected", "changed_in_pos",
                "errors", "tier_breakdown", "moves", "error_details", "api"):
        assert key in log, key
    assert log["synced"] is True and log["errors"] == 0 and log["group_counts_match"] is True
    assert log["updated"] == log["planned_moves"] > 0
    assert log["as_of"] == "2026-11-25T02:00:00Z"
    assert TOKEN not in output and TOKEN not in json.dumps(log)
    validation = json.loads((dep.data_dir / "validation" / "latest.json").read_text())
    assert validation["summary"]["success"] is True
    commits = dep.git_log()
    assert len(commits) == 1 and "2026-11-25T02:00:00Z" in commits[0]

    # A second run of the same day: nothing to move, no write request, no new commit.
    writes_before = len(dep.writes())
    state, output = dep.dags_test()
    assert state == "success", output[-4000:]
    assert len(dep.writes()) == writes_before
    log = dep.sync_log()
    assert log["planned_moves"] == 0 and log["updated"] == 0 and log["group_counts_match"] is True
    assert dep.git_log() == commits


def test_dry_run_writes_nothing(deployment: Deployment) -> None:
    dep = deployment
    groups_before = set(dep.sim.store.groups)
    state, output = deployment.dags_test(conf={"dry_run": True, "allow_mass_change": True})
    assert state == "success", output[-4000:]
    assert dep.writes() == []
    assert set(dep.sim.store.groups) == groups_before  # not even the missing tier group is created
    log = dep.sync_log()
    assert log["dry_run"] is True and log["synced"] is False
    assert log["planned_moves"] > 0 and log["updated"] == 0
    assert (dep.data_dir / "customer_analytics_master.csv").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp_inbox(deployment: Deployment) -> Iterator[list[str]]:
    """A local SMTP server; the DAG's alert connection points at it."""
    from aiosmtpd.controller import Controller

    inbox: list[str] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            import email

            message = email.message_from_bytes(envelope.content)
            parts = [message] if not message.is_multipart() else list(message.walk())
            text = "\n".join(
                p.get_payload(decode=True).decode("utf-8", "replace")
                for p in parts
                if p.get_content_maintype() == "text"
            )
            inbox.append(f"Subject: {message['Subject']}\n{text}")
            return "250 OK"

    port = _free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    deployment.extra_env["AIRFLOW_CONN_TIER_SYNC_SMTP"] = json.dumps(
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "extra": {"disable_tls": True, "disable_ssl": True, "to": "oncall@example.com", "timeout": 5, "retry_limit": 0},
        }
    )
    try:
        yield inbox
    finally:
        controller.stop()


def test_a_dry_run_of_a_mass_change_never_asks_and_writes_nothing(deployment: Deployment, smtp_inbox: list[str]) -> None:
    """The breaker trips on a fresh store, but a dry run writes nothing anyway: no approval is asked
    (approve_sync passes at once), nothing is written, no alert. The breaker's question itself
    needs the real scheduler and api-server: tests/integration/test_approval.py."""
    dep = deployment
    groups_before = set(dep.sim.store.groups)
    state, output = dep.dags_test(conf={"dry_run": True})  # a fresh store: most customers would move at once
    assert state == "success", output[-4000:]
    assert dep.writes() == []
    assert set(dep.sim.store.groups) == groups_before
    log = dep.sync_log()
    assert log["synced"] is False and log["skipped_reason"] == "dry_run"
    assert log["circuit_breaker"]["tripped"] is True and "approval" not in log
    assert "Waiting for Human-in-the-loop input" not in output
    assert smtp_inbox == []


def test_bad_data_fails_validation_commits_and_syncs_nothing_and_alerts(
    deployment: Deployment, smtp_inbox: list[str]
) -> None:
    dep = deployment
    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]
    commits = dep.git_log()
    writes = len(dep.writes())

    # A broken extraction: most customers vanish from the POS overnight.
    store = dep.sim.store
    live = sorted(cid for cid, c in store.customers.items() if c.get("deleted_at") is None)
    for cid in live[: int(len(live) * 0.6)]:
        store.delete_customer(cid)

    state, output = dep.dags_test(AS_OF + timedelta(days=1))
    assert state == "failed"
    assert dep.git_log() == commits, "nothing may be committed after a failed validation"
    assert len(dep.writes()) == writes, "nothing may be written to the POS after a failed validation"
    run_dir = dep.data_dir / "runs" / "20261126T020000Z"
    report = json.loads((run_dir / "validation.json").read_text())
    assert report["summary"]["success"] is False
    log = json.loads((run_dir / "tier_sync_log.json").read_text())
    assert log["synced"] is False and "validation failed" in str(log.get("skipped_reason"))
    alert = next((m for m in smtp_inbox if "validate_tiers" in m), None)
    assert alert is not None, smtp_inbox
    assert "row" in alert.lower() and "/dags/customer_tier_sync/runs/" in alert
    # The stable master CSV and latest.json still describe the last validated day (nothing
    # unvalidated is published); the latest sync log says what today's run did: nothing, and why.
    assert json.loads((dep.data_dir / "latest.json").read_text())["as_of"] == "2026-11-25T02:00:00Z"
    assert {r["Last Updated"] for r in dep.master_rows().values()} == {"2026-11-25T02:00:00Z"}
    assert dep.sync_log()["as_of"] == "2026-11-26T02:00:00Z" and dep.sync_log()["synced"] is False


def test_faults_and_applied_then_500_writes_still_end_exact(deployment: Deployment) -> None:
    dep = deployment
    before = {cid: dict(c) for cid, c in dep.sim.store.customers.items()}
    expected = _expected(dep)
    dep.sim.faults.add(method="GET", path=r"/api/2\.0/(sales|customers)$", kind="status", status=503, times=3)
    dep.sim.faults.add(method="POST", path=r"/api/2\.0/customer_groups/[^/]+/customers$", kind="apply_then_500", times=2)
    dep.sim.faults.add(method="GET", path=r"/api/2\.0/customer_groups$", kind="reset", times=1)
    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]
    assert dep.final_group_names() == oracle.expected_final_groups(before, dep.sim.store.groups, expected)
    log = dep.sync_log()
    assert log["errors"] == 0 and log["group_counts_match"] is True and log["api"]["retries"] >= 3


def test_revoked_token_fails_fast_naming_the_connection(deployment: Deployment) -> None:
    dep = deployment
    dep.sim.expire_token()
    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "failed"
    assert "lightspeed_default" in output and "401" in output
    assert TOKEN not in output
    # Fails at once: the extract task is not retried against a token that cannot work.
    assert len([r for r in dep.sim.requests if r.status == 401]) <= 2


@contextmanager
def _stamped_at(store: Any, instant: datetime) -> Iterator[None]:
    """Store changes made inside are stamped at `instant` (even before the store's own `now`)."""
    clock, floor = store.clock, store.time_floor
    store.clock, store.time_floor = (lambda: instant), None
    try:
        yield
    finally:
        store.clock, store.time_floor = clock, floor


def test_a_same_day_rerun_after_a_wiped_extraction_fails_the_gate_and_publishes_nothing(
    deployment: Deployment,
) -> None:
    dep = deployment
    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]
    commits, writes = dep.git_log(), len(dep.writes())
    latest = (dep.data_dir / "latest.json").read_bytes()
    master = (dep.data_dir / "customer_analytics_master.csv").read_bytes()
    history = (dep.data_dir / "tier_history.csv").read_bytes()

    # 90% of the sales are deleted, stamped before as_of, and the same day is run again.
    store = dep.sim.store
    with _stamped_at(store, AS_OF - timedelta(minutes=30)), store.lock:
        live = sorted(sid for sid, s in store.sales.items() if s.get("deleted_at") is None)
        for sid in live[: int(len(live) * 0.9)]:
            store.sales[sid]["deleted_at"] = (AS_OF - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
            store.stamp(store.sales[sid])
    state, output = dep.dags_test()
    assert state == "failed", output[-4000:]
    report = json.loads((dep.data_dir / "runs" / "20261125T020000Z" / "validation.json").read_text())
    assert report["summary"]["success"] is False
    assert report["summary"]["previous_run"] == "20261125T020000Z", report["summary"]  # the day's published run
    assert dep.git_log() == commits, "nothing may be committed after a failed validation"
    assert len(dep.writes()) == writes, "nothing may be written to the POS after a failed validation"
    assert (dep.data_dir / "latest.json").read_bytes() == latest
    assert (dep.data_dir / "customer_analytics_master.csv").read_bytes() == master
    assert (dep.data_dir / "tier_history.csv").read_bytes() == history


def test_a_run_dated_in_the_future_fails_at_once_and_the_next_real_run_works(
    deployment: Deployment, smtp_inbox: list[str]
) -> None:
    dep = deployment
    state, output = dep.dags_test(datetime(2099, 1, 1, 2, tzinfo=UTC), conf={"allow_mass_change": True})
    assert state == "failed"
    assert "Refusing a run as of 2099-01-" in output
    assert dep.sim.requests == [], "a future run must not even read the POS"
    written = sorted(p for p in dep.data_dir.rglob("*") if p.is_file()) if dep.data_dir.exists() else []
    assert written == [], f"a future run must write nothing, wrote {written}"
    assert any("2099-01-" in m for m in smtp_inbox), smtp_inbox

    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]
    assert json.loads((dep.data_dir / "latest.json").read_text())["as_of"] == "2026-11-25T02:00:00Z"
    assert len(dep.git_log()) == 1 and dep.sync_log()["synced"] is True and dep.writes()


def test_a_gateway_answering_some_gets_without_data_never_misplaces_anyone(deployment: Deployment) -> None:
    """The issue's gateway: a share of GETs come back `200 {"error": ...}` with no `data`.

    It used to read as "end of feed": a partial store, wrong tiers, 137 customers moved into wrong
    groups, duplicate tier groups, every run green. Now such an answer is a protocol error, retried
    like a 5xx: after any number of runs every customer is exactly where the oracle puts them and
    no group exists twice.
    """
    dep = deployment
    before = {cid: dict(c) for cid, c in dep.sim.store.customers.items()}
    expected = _expected(dep)
    fault = dep.sim.faults.add(
        "status",
        method="GET",
        path=r"^/(sales|customers|customer_groups)$",
        status=200,
        body={"error": "Service Unavailable"},
        probability=0.3,
    )
    for conf in ({"allow_mass_change": True}, {}, {"force_resync": True}):
        state, output = dep.dags_test(conf=conf)
        assert state == "success", output[-4000:]
        live = [g["name"] for g in dep.sim.store.groups.values() if g.get("deleted_at") is None]
        assert len(live) == len(set(live)), f"a group was duplicated: {sorted(live)}"
        assert dep.final_group_names() == oracle.expected_final_groups(before, dep.sim.store.groups, expected)
        rows = dep.master_rows()
        assert {cid: r["Tier"] for cid, r in rows.items()} == {cid: e.tier for cid, e in expected.items()}
    assert fault.fired >= 5, f"the gateway fault should have fired on several GETs, fired {fault.fired}"
    assert dep.sync_log()["api"]["retries"] >= 1


def test_retention_prunes_old_run_folders_and_git_can_leave_out_contacts(deployment: Deployment) -> None:
    """Through `airflow dags test`: the prune_runs task reads tier_sync_retention_days, removes a run
    folder older than that (counted from the run's as_of), keeps its day and counts; with
    tier_sync_git_without_contacts the committed master has no Name/Email/Phone."""
    dep = deployment
    old = AS_OF - timedelta(days=10)
    state, output = dep.dags_test(old, conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]
    old_dir = dep.data_dir / "runs" / old.strftime("%Y%m%dT%H%M%SZ")
    assert (old_dir / "customer_analytics_master.csv").exists()

    dep.extra_env.update(AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS="7", AIRFLOW_VAR_TIER_SYNC_GIT_WITHOUT_CONTACTS="true")
    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]

    assert not old_dir.exists()
    assert sorted(p.name for p in (dep.data_dir / "runs").iterdir()) == [AS_OF.strftime("%Y%m%dT%H%M%SZ")]
    assert "prune_runs: 1 run folder(s) older than 2026-11-18T02:00:00Z pruned" in output
    with (dep.data_dir / "tier_history.csv").open(newline="", encoding="utf-8-sig") as fh:
        assert {r["as_of"] for r in csv.DictReader(fh)} == {_iso(old), _iso(AS_OF)}
    with (dep.data_dir / "sync_history.csv").open(newline="", encoding="utf-8-sig") as fh:
        kept = list(csv.DictReader(fh))
    assert [r["as_of"] for r in kept] == [_iso(old)] and kept[0]["validation_passed"] == "true"
    assert int(kept[0]["total_customers"]) > 0
    remote = dep.data_dir / "git" / "tiers.git"
    header = subprocess.run(
        ["git", "--git-dir", str(remote), "show", "main:customer_analytics_master.csv"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[0]
    assert header.lstrip("\ufeff").split(",")[:3] == ["Customer ID", "Customer Code", "Lifetime Value"]
    assert "Email" not in header and "Email" in (dep.data_dir / "customer_analytics_master.csv").read_text(encoding="utf-8-sig")
