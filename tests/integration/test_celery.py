"""The distributed path: customer_tier_sync end to end under the CeleryExecutor.

The same project, unchanged, with work handed to a Celery worker the way docker-compose.yaml runs
it: scheduler, api-server and dag-processor (tests/integration/cluster.py) plus one
`airflow celery worker`, PostgreSQL as metadata DB *and* Celery result backend, Redis as broker.
Only configuration differs from the embedded default. The test triggers the onboarding run
(`{"allow_mass_change": true}`), waits for success, checks every customer's final group against the
independent oracle (tests/oracle.py), and proves each task instance went through
Celery and ran on the worker: its Celery task id (`external_executor_id`) is a SUCCESS row in the
PostgreSQL result backend and shows up in the worker's log, and it was routed to the worker's queue.

Isolation from other users of this machine: a throw-away PostgreSQL database (dropped after), a
Redis DB index of its own (`TIER_SYNC_IT_REDIS_URL`, default `redis://127.0.0.1:6379/13`), a queue
and worker name unique to the run, and at the end only the Redis keys this run created are removed
(never FLUSHDB/FLUSHALL).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tests.integration.cluster import AirflowCluster, max_overlap, postgres_unavailable_reason
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


def test_end_to_end_under_celery_executor(tmp_path: Path, redis_keys: set[str]) -> None:
    for reason in (postgres_unavailable_reason(), redis_unavailable_reason(REDIS_URL)):
        if reason:
            pytest.skip(reason)
    t0 = time.monotonic()
    run_tag = secrets.token_hex(4)
    queue = f"tier_sync_it_{run_tag}"
    worker = f"tier-sync-it-{run_tag}"
    redis_keys.update({queue, worker})
    data_dir = tmp_path / "data"

    # The POS: the demo store, every record before the run's as_of (a manual run's as_of is its
    # run_after, i.e. the trigger time).
    store = generate_demo_store(seed=42, customers=300, now=datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=2))
    before = copy.deepcopy(store.customers)
    sales = copy.deepcopy(store.sales)
    groups_before = copy.deepcopy(store.groups)

    with running_simulator(store=store, token=TOKEN) as sim:
        cluster = AirflowCluster(
            tmp_path / "cluster",
            executor="CeleryExecutor",
            extra_services={
                "celery-worker": ["celery", "worker", "--concurrency", "4", "--queues", queue,
                                  "--celery-hostname", f"{worker}@%h", "--skip-serve-logs",
                                  "--without-mingle", "--without-gossip"],
            },
            env={
                "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
                "AIRFLOW_CONN_LIGHTSPEED_DEFAULT": json.dumps(
                    sim.airflow_connection(TOKEN, registers=1, rate_budget_dir=str(tmp_path / "rate_budget"))
                ),
                "AIRFLOW_VAR_TIER_SYNC_DATA_DIR": str(data_dir),
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
            names = {gid: g["name"] for gid, g in sim.store.groups.items()}
            final = {cid: names.get(c.get("customer_group_id") or "", oracle.DEFAULT_GROUP)
                     for cid, c in sim.store.customers.items()}
            assert final == oracle.expected_final_groups(before, groups_before, expected)
            moved = [cid for cid in final if final[cid] != names.get(before[cid].get("customer_group_id") or "",
                                                                     oracle.DEFAULT_GROUP)]
            assert len(moved) > 100  # an onboarding: most customers changed group
            log = json.loads((data_dir / "tier_sync_log.json").read_text())
            assert log["synced"] is True and log["errors"] == 0

            # Each task instance went through Celery and ran on the worker.
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
            worker_log = cluster.log_path("celery-worker").read_text(errors="replace")
            assert f"{worker}@" in worker_log
            missing = [cid for cid in celery_ids if cid not in worker_log]
            assert not missing, f"not in the worker log: {missing}\n{cluster.log_tails(['celery-worker'])}"

            # The pool still bounds the mapped sync (2 slots from airflow_settings.yaml).
            batches = [t for t in ran if t["task_id"] == "sync_batch"]
            assert len(batches) > 1
            assert max_overlap((t["start"], t["end"]) for t in batches) <= 2
    print(f"done: {time.monotonic() - t0:.0f} s")
