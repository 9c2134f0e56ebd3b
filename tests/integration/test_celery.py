"""The distributed path: customer_tier_sync end to end under the CeleryExecutor, on two "hosts".

The same project, unchanged, with work handed to two Celery workers the way docker-compose.yaml
runs them: scheduler, api-server and dag-processor (tests/integration/cluster.py) plus two
`airflow celery worker`s, PostgreSQL as metadata DB *and* Celery result backend, Redis as broker.
The two workers stand for two machines: each has its own AIRFLOW_HOME (logs, git work copy) and
shares nothing on disk with the other but the project's code. What a deployment shares, they share
over the network only: the data dir on an S3 server (moto, `s3://<conn_id>@bucket/...` with the
credentials in an Airflow connection), the Lightspeed request budget in Redis
(`rate_budget_url`), and the git remote over HTTP (`git http-backend` behind Basic auth).

The test triggers the onboarding run (`{"allow_mass_change": true}`), waits for success, checks
every customer's final group against the independent oracle (tests/oracle.py), and proves each
task instance went through Celery and ran on one of the workers: its Celery task id
(`external_executor_id`) is a SUCCESS row in the PostgreSQL result backend and shows up in exactly
one worker's log, both workers ran tasks, and neither wrote a data dir, a request budget or a git
remote to its own disk.

Isolation from other users of this machine: a throw-away PostgreSQL database (dropped after), a
Redis DB index of its own (`TIER_SYNC_IT_REDIS_URL`, default `redis://127.0.0.1:6379/13`), a queue
and worker names unique to the run, and at the end only the Redis keys this run created are removed
(never FLUSHDB/FLUSHALL).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import oracle
from tests.integration.cluster import AirflowCluster, max_overlap, postgres_unavailable_reason
from tests.servers import git_http_server, s3_server
from tools.lightspeed_sim import generate_demo_store
from tools.lightspeed_sim.testing import running_simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "customer_tier_sync"
TOKEN = "celery-it-token-3b8d"
REDIS_URL = os.environ.get("TIER_SYNC_IT_REDIS_URL", "redis://127.0.0.1:6379/13")
RUN_TIMEOUT = 300
PIPELINE = {"extract_orders", "compute_tiers", "validate_tiers", "publish_run", "commit_csv", "plan_sync", "sync_batch",
            "verify_group_counts", "write_sync_log"}


def redis_unavailable_reason(url: str) -> str | None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except Exception as exc:  # any failure to reach the broker is a reason to skip, not to fail
        return f"Redis is unreachable at {url}: {exc}"
    return None


@pytest.fixture
def redis_keys() -> Iterator[set[str]]:
    """Yields a set the test fills with its unique names; afterwards, removes only the Redis keys
    (and binding-set members) that carry one of those names and did not exist before."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    before = set(client.scan_iter(count=1000))
    ours: set[str] = set()
    yield ours
    for key in set(client.scan_iter(count=1000)):
        if key not in before and any(name in key for name in ours):
            client.delete(key)
        elif key.startswith("_kombu.binding.") and client.type(key) == "set":
            stale = [m for m in client.smembers(key) if any(name in m for name in ours)]
            if stale:
                client.srem(key, *stale)
    client.close()


S3_CONN_ID = "tier_sync_s3"
S3_KEY, S3_SECRET = "AKIDCELERYTWOHOSTS", "celery-s3-secret-90b1"
GIT_USER, GIT_TOKEN = "tier-bot", "celery-git-token-6c4f"
WORKERS = ("worker-a", "worker-b")


def _worker_argv(queue: str, name: str) -> list[str]:
    # concurrency 1 each: while one worker runs a sync batch, the pool's second slot goes to the other
    return ["celery", "worker", "--concurrency", "1", "--queues", queue, "--celery-hostname", f"{name}@%h",
            "--skip-serve-logs", "--without-mingle", "--without-gossip"]


def _read_s3(endpoint: str, path: str) -> bytes:
    import s3fs

    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=endpoint, skip_instance_cache=True)
    data: bytes = fs.cat_file(path)
    return data


def test_end_to_end_under_celery_executor_on_two_hosts(tmp_path: Path, redis_keys: set[str]) -> None:
    for reason in (postgres_unavailable_reason(), redis_unavailable_reason(REDIS_URL)):
        if reason:
            pytest.skip(reason)
    import subprocess

    import s3fs

    t0 = time.monotonic()
    run_tag = secrets.token_hex(4)
    queue = f"tier_sync_it_{run_tag}"
    names = {w: f"tier-sync-it-{run_tag}-{w}" for w in WORKERS}
    redis_keys.update({queue, *names.values(), "tier_sync:rate_budget"})
    budget_keys_before = {k for k in _redis().scan_iter(match="tier_sync:rate_budget:*", count=1000)}
    bucket = f"tier-sync-it-{run_tag}"
    homes = {w: tmp_path / w for w in WORKERS}
    for home in homes.values():
        home.mkdir()

    # The POS: the demo store, every record before the run's as_of (a manual run's as_of is its
    # run_after, i.e. the trigger time).
    store = generate_demo_store(seed=42, customers=300, now=datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=2))
    before = copy.deepcopy(store.customers)
    sales = copy.deepcopy(store.sales)
    groups_before = copy.deepcopy(store.groups)

    git_root = tmp_path / "git-server"
    (git_root / "tiers.git").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(git_root / "tiers.git")], check=True)

    with (
        s3_server() as s3_endpoint,
        git_http_server(git_root, user=GIT_USER, token=GIT_TOKEN) as (git_base, git_auth),
        running_simulator(store=store, token=TOKEN) as sim,
    ):
        s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(bucket)
        cluster = AirflowCluster(
            tmp_path / "cluster",
            executor="CeleryExecutor",
            extra_services={w: _worker_argv(queue, names[w]) for w in WORKERS},
            # each worker is a host of its own: its own AIRFLOW_HOME (logs, git work copy, defaults)
            service_env={w: {"AIRFLOW_HOME": str(homes[w])} for w in WORKERS},
            env={
                "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(Path(__file__).resolve().parents[2] / "plugins"),
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
                "AIRFLOW_CONN_LIGHTSPEED_DEFAULT": json.dumps(
                    sim.airflow_connection(TOKEN, registers=1, rate_budget_url=REDIS_URL)
                ),
                f"AIRFLOW_CONN_{S3_CONN_ID.upper()}": json.dumps({
                    "conn_type": "aws", "login": S3_KEY, "password": S3_SECRET,
                    "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
                }),
                "AIRFLOW_CONN_GIT_DEFAULT": json.dumps({
                    "conn_type": "git", "host": f"{git_base}/tiers.git", "login": GIT_USER, "password": GIT_TOKEN,
                    "extra": {"allow_insecure_http": True},  # a loopback test server
                }),
                "AIRFLOW_VAR_TIER_SYNC_DATA_DIR": f"s3://{S3_CONN_ID}@{bucket}/tier-sync",
                # no AWS_* anywhere: the S3 credentials come from the connection only
                "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
                "NO_PROXY": "127.0.0.1",
            },
        )
        # The result backend is the cluster's own (throw-away) metadata database, as in docker-compose.
        cluster.set_env({"AIRFLOW__CELERY__RESULT_BACKEND": f"db+{cluster.db_dsn}"})
        with cluster:
            cluster.wait_for_dag(DAG_ID)
            cluster.unpause(DAG_ID)
            print(f"cluster up: {time.monotonic() - t0:.0f} s")
            run_id = cluster.trigger(DAG_ID, conf={"allow_mass_change": True})
            run = cluster.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT)
            print(f"run {run.state}: {time.monotonic() - t0:.0f} s")
            assert run.state == "success", cluster.describe_run(DAG_ID, run_id) + "\n" + cluster.log_tails()

            # Every customer ends in exactly the group the independent oracle expects.
            assert run.run_after is not None
            as_of = run.run_after.astimezone(UTC).replace(microsecond=0)
            expected = oracle.expected_tiers(before, sales, as_of)
            group_names = {gid: g["name"] for gid, g in sim.store.groups.items()}
            final = {cid: group_names.get(c.get("customer_group_id") or "", oracle.DEFAULT_GROUP)
                     for cid, c in sim.store.customers.items()}
            assert final == oracle.expected_final_groups(before, groups_before, expected)
            moved = [cid for cid in final if final[cid] != group_names.get(
                before[cid].get("customer_group_id") or "", oracle.DEFAULT_GROUP)]
            assert len(moved) > 100  # an onboarding: most customers changed group
            log = json.loads(_read_s3(s3_endpoint, f"{bucket}/tier-sync/tier_sync_log.json"))
            assert log["synced"] is True and log["errors"] == 0 and log["group_counts_match"] is True
            assert not [r for r in sim.requests if r.status == 429], "the shared budget let the workers overrun"

            # Shared over the network only: the data dir on S3, the budget in Redis, git over HTTP.
            master = _read_s3(s3_endpoint, f"{bucket}/tier-sync/customer_analytics_master.csv").decode("utf-8-sig")
            assert {r["Customer ID"] for r in csv.DictReader(io.StringIO(master))} == set(expected)
            assert set(_redis().scan_iter(match="tier_sync:rate_budget:*", count=1000)) - budget_keys_before
            commits = subprocess.run(["git", "--git-dir", str(git_root / "tiers.git"), "log", "--format=%s"],
                                     capture_output=True, text=True, check=True).stdout.splitlines()
            assert len(commits) == 1 and git_auth, commits
            for w in WORKERS:
                local = {p.name for p in homes[w].iterdir()} if homes[w].exists() else set()
                assert not local & {"tier_sync_data", "rate_budget"}, (w, local)

            # The page reads the same S3 data dir through the connection in the api-server.
            page = requests.Session()
            page.headers["Authorization"] = f"Bearer {cluster.token()}"
            answer = page.get(f"{cluster.api_url}/loyalty-tiers/api/summary", timeout=60)
            assert answer.status_code == 200 and answer.content, (answer.status_code, answer.headers, answer.text[:300])
            summary = answer.json()
            assert summary["data_dir"] == f"s3://{S3_CONN_ID}@{bucket}/tier-sync"
            assert summary["total_customers"] == len(expected) and summary["as_of"], summary
            someone = next(cid for cid, e in expected.items() if e.orders > 0)
            detail = page.get(f"{cluster.api_url}/loyalty-tiers/api/customers/{someone}", timeout=60)
            assert detail.status_code == 200, detail.text[:500]
            assert someone in detail.text

            # Each task instance went through Celery and ran on one of the two workers.
            rows = cluster.sql(
                "SELECT task_id, map_index, state, queue, hostname, external_executor_id, start_date, end_date"
                " FROM task_instance WHERE dag_id = %s AND run_id = %s ORDER BY start_date",
                (DAG_ID, run_id),
            )
            tis: list[dict[str, Any]] = [
                dict(zip(("task_id", "map_index", "state", "queue", "hostname", "celery_id", "start", "end"), r, strict=True))
                for r in rows
            ]
            assert {t["task_id"] for t in tis} >= PIPELINE
            # Tasks whose trigger rule did not fire (e.g. a failure-only step) are skipped by the
            # scheduler and never reach an executor; everything else ran, on Celery, successfully.
            ran = [t for t in tis if t["state"] != "skipped"]
            assert all(t["state"] == "success" for t in ran), [(t["task_id"], t["map_index"], t["state"]) for t in tis]
            assert {t["task_id"] for t in ran} >= PIPELINE
            assert all(t["queue"] == queue and t["hostname"] for t in ran), ran
            celery_ids = [t["celery_id"] for t in ran]
            assert all(celery_ids), ran
            # The worker stores a task's final Celery state just after Airflow sees the task end,
            # so the last one can still read STARTED for a moment: wait (bounded) for the backend.
            deadline = time.monotonic() + 60
            while True:
                backend = dict(cluster.sql(
                    "SELECT task_id, status FROM celery_taskmeta WHERE task_id = ANY(%s)", (celery_ids,)
                ))
                if backend == dict.fromkeys(celery_ids, "SUCCESS") or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert backend == dict.fromkeys(celery_ids, "SUCCESS")
            worker_logs = {w: cluster.log_path(w).read_text(errors="replace") for w in WORKERS}
            ran_on: dict[str, list[str]] = {w: [] for w in WORKERS}
            for cid in celery_ids:
                where = [w for w in WORKERS if cid in worker_logs[w]]
                assert len(where) == 1, f"{cid} in the logs of {where}\n{cluster.log_tails(list(WORKERS))}"
                ran_on[where[0]].append(cid)
            assert all(ran_on.values()), {w: len(v) for w, v in ran_on.items()}  # both hosts did work
            for w in WORKERS:
                assert f"{names[w]}@" in worker_logs[w]

            # The pool still bounds the mapped sync (2 slots from airflow_settings.yaml).
            batches = [t for t in ran if t["task_id"] == "sync_batch"]
            assert len(batches) > 1
            assert max_overlap((t["start"], t["end"]) for t in batches) <= 2
    print(f"done: {time.monotonic() - t0:.0f} s")


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, decode_responses=True)
