"""The publish lock on S3 (include/tier_sync/object_lock.py), against moto's S3 server (issue 16).

Why: publishing read-modify-writes the tier history and the stable "latest" files. On a local data
dir an flock serialises it; on S3 nothing did (only Airflow's one-at-a-time publish_run, which
`airflow dags test`, the erasure tool and a second deployment do not obey), so two concurrent
back-fills could each rewrite tier_history.csv and one day's rows were lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from include.tier_sync import fileio, ledger, object_lock
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import compute_tiers, publish_run
from include.tier_sync.runtime import iso
from tests.unit.test_ledger import AS_OF, DAY, good_store, history_days
from tests.unit.test_master_csv import RULES, identity
from tests.unit.test_store_s3 import s3_endpoint, s3_root  # noqa: F401 (fixtures)

pytestmark = pytest.mark.unit


@pytest.fixture
def lock_url(s3_root: str) -> str:  # noqa: F811
    return f"{s3_root}/publish.lock"


def test_one_holder_at_a_time_across_threads(lock_url: str) -> None:
    inside = most = 0
    guard = threading.Lock()

    def hold(_: int) -> None:
        nonlocal inside, most
        with object_lock.s3_lock(lock_url, lease=5, poll=0.02):
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)
            with guard:
                inside -= 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(hold, range(8)))
    assert most == 1
    assert not fileio.exists(lock_url)  # released: the object is gone


def test_a_crashed_holders_lock_is_taken_over_after_its_lease(lock_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # A holder that died without releasing: its lock object stays, never renewed.
    fileio.write_bytes_if(lock_url, json.dumps({"token": "dead", "host": "worker-7", "pid": 1}).encode(), etag=None)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="include.tier_sync.object_lock"),
        object_lock.s3_lock(lock_url, lease=0.5, poll=0.05),
    ):
        waited = time.monotonic() - started
        assert json.loads(fileio.read_bytes(lock_url))["token"] != "dead"
    assert waited >= 0.5  # not before the lease ran out
    assert "Took over the lock" in caplog.text and "worker-7 pid 1" in caplog.text


def test_a_live_holder_renews_so_a_waiter_times_out_instead_of_taking_over(lock_url: str) -> None:
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with object_lock.s3_lock(lock_url, lease=0.4, poll=0.02):
            held.set()
            done.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with (
            pytest.raises(object_lock.LockTimeout, match="held by .* for over"),
            object_lock.s3_lock(lock_url, lease=0.4, wait=1.5, poll=0.05),
        ):
            pytest.fail("took a lock that its holder kept renewing")
    finally:
        done.set()
        thread.join()


def test_a_holder_whose_lease_was_taken_over_fails_loudly(lock_url: str) -> None:
    with pytest.raises(object_lock.LockLost, match="lost"), object_lock.s3_lock(lock_url, lease=0.4, poll=0.02):
        # Someone took the lock over (as after a stall longer than the lease).
        _data, tag = fileio.read_bytes_tagged(lock_url)
        fileio.write_bytes_if(lock_url, json.dumps({"token": "other"}).encode(), etag=tag)
        time.sleep(0.5)  # the next renewal finds the object is no longer ours
    assert json.loads(fileio.read_bytes(lock_url))["token"] == "other"  # theirs is left alone


@pytest.fixture
def s3_data_dir(s3_root: str) -> Iterator[str]:  # noqa: F811
    yield s3_root.rsplit("/", 1)[0] + "/data"


def test_concurrent_backfills_on_s3_keep_every_day_in_the_history(s3_data_dir: str) -> None:
    """The ledger's concurrent-publish case, on S3: six days published at once, newest first."""
    days = [AS_OF + i * DAY for i in range(6)]
    store = good_store()
    computed: dict[Any, dict[str, Any]] = {}
    for day in days:
        paths = RunPaths(s3_data_dir, day)
        computed[day] = compute_tiers(store, paths, identity(day), RULES)
        fileio.write_json(RunPaths(s3_data_dir, day).run_validation_json, {"summary": {"success": True}})
    start = threading.Barrier(len(days))

    def publish(day: Any) -> bool:
        start.wait()
        return publish_run(RunPaths(s3_data_dir, day), identity(day), computed[day]["tier_breakdown"])

    with ThreadPoolExecutor(len(days)) as pool:
        list(pool.map(publish, reversed(days)))
    assert history_days(s3_data_dir) == [iso(d) for d in days]
    assert fileio.read_json(fileio.join(s3_data_dir, ledger.LATEST_FILE))["as_of"] == iso(days[-1])
    assert not fileio.exists(RunPaths(s3_data_dir, AS_OF).publish_lock)
