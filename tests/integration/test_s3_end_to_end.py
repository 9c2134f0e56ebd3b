"""The whole DAG on an S3 data dir reached through an Airflow connection (issue 16).

`tier_sync_data_dir` is `s3://tier_sync_s3@<bucket>/tier-sync`; the S3 API is moto's server on a
free loopback port, and its endpoint and keys are only in the connection `tier_sync_s3` (the
environment has no AWS_* settings), so every byte of the order store, the run folders, publishing
and the sync log goes through that connection. The git remote is a local bare repository, the
stand-in for a hosted one (an object-storage data dir has no local default).

- Two days and a re-run: each day's master and groups match the independent oracle, the tier
  history holds both days, and the re-run writes nothing.
- A crash mid-extraction (the `airflow dags test` process killed while it pages the sales feed):
  the committed pages survive on S3, the next run resumes from the committed cursor, not from 0,
  and ends exact.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tests.integration.test_dag_end_to_end import AIRFLOW, DAG_ID, REPO, _base_env, _iso, migrated_home  # noqa: F401
from tests.servers import s3_server
from tools.lightspeed_sim import generate_demo_store
from tools.lightspeed_sim.server import API_PREFIX
from tools.lightspeed_sim.testing import clock_after, running_simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)
TOKEN = "s3-e2e-token-8c2e"
CONN_ID = "tier_sync_s3"
KEY_ID, SECRET_KEY = "AKIDS3ENDTOEND", "s3-e2e-secret-51aa"


@dataclass
class S3Deployment:
    home: Path
    sim: Any
    endpoint: str
    bucket: str
    git_remote: Path
    page_size: int = 100
    runs: int = 0

    @property
    def data_url(self) -> str:
        return f"s3://{CONN_ID}@{self.bucket}/tier-sync"

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(key=KEY_ID, secret=SECRET_KEY, endpoint_url=self.endpoint, skip_instance_cache=True)

    def read(self, rel: str) -> bytes:
        data: bytes = self.fs().cat_file(f"{self.bucket}/tier-sync/{rel}")
        return data

    def exists(self, rel: str) -> bool:
        return bool(self.fs().exists(f"{self.bucket}/tier-sync/{rel}"))

    def env(self) -> dict[str, str]:
        env = _base_env(self.home)
        for name in [k for k in env if k.startswith("AWS_")]:
            del env[name]
        env.update(
            AWS_CONFIG_FILE=str(self.home / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.home / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            NO_PROXY="127.0.0.1",
            AIRFLOW_VAR_TIER_SYNC_DATA_DIR=self.data_url,
            AIRFLOW_VAR_TIER_SYNC_GIT_REMOTE=str(self.git_remote),
        )
        env[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps({
            "conn_type": "aws", "login": KEY_ID, "password": SECRET_KEY,
            "extra": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        })
        env["AIRFLOW_CONN_LIGHTSPEED_DEFAULT"] = json.dumps(self.sim.airflow_connection(
            TOKEN, registers=1, rate_budget_dir=str(self.home / "rate_budget"), max_retries=6,
            page_size=self.page_size,
        ))
        return env

    def command(self, as_of: datetime, conf: dict[str, Any] | None) -> list[str]:
        return [AIRFLOW, "dags", "test", DAG_ID, as_of.isoformat(), "-c", json.dumps(conf or {})]

    def dags_test(self, as_of: datetime, conf: dict[str, Any] | None = None) -> tuple[str, str]:
        self.runs += 1
        out = subprocess.run(self.command(as_of, conf), env=self.env(), cwd=REPO, capture_output=True, text=True,
                             timeout=900)
        text = out.stdout + out.stderr
        (self.home / f"dags-test-{self.runs}.log").write_text(text)
        states = re.findall(r"DagRun Finished: .*?state=(\w+)", text)
        assert states, f"no DagRun result in the output:\n{text[-4000:]}"
        return states[-1], text

    def master_rows(self) -> dict[str, dict[str, str]]:
        text = self.read("customer_analytics_master.csv").decode("utf-8-sig")
        return {r["Customer ID"]: r for r in csv.DictReader(io.StringIO(text))}

    def history_days(self) -> list[str]:
        text = self.read("tier_history.csv").decode("utf-8-sig")
        return sorted({r["as_of"] for r in csv.DictReader(io.StringIO(text))})

    def sync_log(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.read("tier_sync_log.json"))
        return doc

    def writes(self) -> list[Any]:
        return [r for r in self.sim.requests if r.method in {"POST", "PUT", "DELETE"}]

    def final_group_names(self) -> dict[str, str]:
        store = self.sim.store
        names = {gid: g["name"] for gid, g in store.groups.items()}
        return {cid: names.get(c.get("customer_group_id") or "", oracle.DEFAULT_GROUP) for cid, c in store.customers.items()}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def deployment(migrated_home: Path, tmp_path: Path, s3_endpoint: str) -> Iterator[S3Deployment]:  # noqa: F811
    import shutil

    import s3fs

    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(migrated_home / "airflow.db", home / "airflow.db")
    bucket = f"tier-sync-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key=KEY_ID, secret=SECRET_KEY, endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(bucket)
    remote = tmp_path / "remote" / "tiers.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(remote)], check=True)
    store = generate_demo_store(seed=7, customers=120, now=AS_OF)
    with running_simulator(store=store, token=TOKEN, clock=clock_after(AS_OF)) as sim:
        yield S3Deployment(home=home, sim=sim, endpoint=s3_endpoint, bucket=bucket, git_remote=remote)


def assert_exact(dep: S3Deployment, before: dict[str, Any], groups_before: dict[str, Any], as_of: datetime) -> None:
    store = dep.sim.store
    expected = oracle.expected_tiers(store.customers, store.sales, as_of)
    rows = dep.master_rows()
    assert set(rows) == set(expected)
    for cid, exp in expected.items():
        row = rows[cid]
        assert (row["Lifetime Value"], int(row["Order Count"]), int(row["Purchases Last 30 Days"]), row["Tier"]) == (
            exp.ltv, exp.orders, exp.last_30, exp.tier), cid
        assert row["Last Order"] == _iso(exp.last), cid
    assert dep.final_group_names() == oracle.expected_final_groups(before, groups_before, expected)


def git_subjects(remote: Path) -> list[str]:
    out = subprocess.run(["git", "--git-dir", str(remote), "log", "--format=%s"], capture_output=True, text=True,
                         check=True)
    return out.stdout.splitlines()


def test_two_days_and_a_rerun_on_s3_through_the_connection(deployment: S3Deployment) -> None:
    dep = deployment
    before = copy.deepcopy(dep.sim.store.customers)
    groups_before = copy.deepcopy(dep.sim.store.groups)

    state, output = dep.dags_test(AS_OF, {"allow_mass_change": True})
    assert state == "success", output[-4000:]
    assert_exact(dep, before, groups_before, AS_OF)
    assert dep.exists("store/manifest.json") and dep.exists("runs/20261125T020000Z/run.json")
    assert not (dep.home / "tier_sync_data").exists(), "nothing may land in the local default data dir"
    assert SECRET_KEY not in output and TOKEN not in output

    # Day 2: one customer buys again (stamped after day 1's as_of, before day 2's).
    store = dep.sim.store
    template = next(s for s in store.sales.values() if s["status"] == "CLOSED" and s.get("deleted_at") is None)
    with store.lock:
        sale = copy.deepcopy(template)
        sale["id"] = str(uuid.uuid4())
        sale["sale_date"] = sale["created_at"] = (AS_OF + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        store.sales[sale["id"]] = sale
        store.stamp(sale)
    before2 = copy.deepcopy(store.customers)
    groups2 = copy.deepcopy(store.groups)
    state, output = dep.dags_test(AS_OF + DAY)
    assert state == "success", output[-4000:]
    assert_exact(dep, before2, groups2, AS_OF + DAY)
    assert dep.history_days() == ["2026-11-25T02:00:00Z", "2026-11-26T02:00:00Z"]
    assert dep.sync_log()["as_of"] == "2026-11-26T02:00:00Z" and dep.sync_log()["errors"] == 0
    subjects = git_subjects(dep.git_remote)
    assert len(subjects) == 2

    # The same day again: nothing to move, nothing written to the POS, no new commit.
    writes = len(dep.writes())
    state, output = dep.dags_test(AS_OF + DAY)
    assert state == "success", output[-4000:]
    assert len(dep.writes()) == writes
    assert dep.sync_log()["planned_moves"] == 0 and dep.sync_log()["group_counts_match"] is True
    assert git_subjects(dep.git_remote) == subjects


def sales_gets(dep: S3Deployment) -> list[Any]:
    return [r for r in dep.sim.requests if r.method == "GET" and r.path.startswith(f"{API_PREFIX}/sales")]


def test_a_crash_mid_extraction_on_s3_resumes_from_the_committed_cursor(deployment: S3Deployment) -> None:
    dep = deployment
    dep.page_size = 5  # 618 sales: 124 pages, committed every 20
    dep.sim.faults.add("latency", seconds=0.05, path="/sales")  # time to kill between pages
    before = copy.deepcopy(dep.sim.store.customers)
    groups_before = copy.deepcopy(dep.sim.store.groups)

    proc = subprocess.Popen(dep.command(AS_OF, {"allow_mass_change": True}), env=dep.env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(sales_gets(dep)) < 50:  # two commits (40 pages) made, the third under way
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "extraction never reached 50 pages"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = len(sales_gets(dep))
    manifest = json.loads(dep.read("store/manifest.json"))
    committed = int(manifest["resources"]["sales"]["cursor"])
    assert committed > 0, manifest  # the whole commits survived the kill
    assert not dep.exists("customer_analytics_master.csv")  # nothing was computed or published

    state, output = dep.dags_test(AS_OF, {"allow_mass_change": True})
    assert state == "success", output[-4000:]
    # Resumed from the committed cursor: the second run reads only the pages after it (the first
    # run had read 50 pages, 40 of them committed), not the whole feed again.
    whole_feed = -(-len(dep.sim.store.sales) // dep.page_size) + 1  # every page, and the empty last one
    resumed = len(sales_gets(dep)) - killed_at
    assert 0 < resumed <= whole_feed - 40 + 1, (resumed, whole_feed)
    assert_exact(dep, before, groups_before, AS_OF)
    assert dep.sync_log()["errors"] == 0
