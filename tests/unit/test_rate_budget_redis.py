"""The request budget in Redis: one sliding window for every host, Redis's clock, loud when Redis is gone.

Every test starts its own `redis-server` on a free port (no persistence) and stops it; none uses the
machine's Redis. Without the binary they skip, saying so.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from include.tier_sync.lightspeed import LightspeedClient, LightspeedConfigError, LightspeedUnavailable
from include.tier_sync.rate_budget import (
    RateBudget,
    RateBudgetUnavailable,
    budget_for_connection,
    budget_limit,
)
from include.tier_sync.rate_budget_redis import RedisRateBudget
from tests.servers import RedisServer, free_port, redis_server
from tools.lightspeed_sim.testing import running_simulator

pytestmark = pytest.mark.unit

PASSWORD = "s3cret-redis-pw"
TOKEN = "t0ken-for-tests"
STORE_URL = "https://acme.retail.lightspeed.app/api/2.0"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path, PASSWORD) as srv:
        yield srv


class StopWaiting(Exception):
    pass


class Sleeps:
    """A `sleep` that records the wait it was asked for and stops `acquire()` there (nobody waits)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        raise StopWaiting


def budget(
    server: RedisServer, *, limit: int = 3, window: float = 60.0, key: str = STORE_URL, **kw: Any
) -> RedisRateBudget:
    kw.setdefault("sleep", Sleeps())
    return RedisRateBudget(key, limit, window, url=server.url(), **kw)


def redis_now(server: RedisServer) -> float:
    seconds, micros = server.client.time()
    return float(seconds) + micros / 1e6


# -- (1) the backend alone ------------------------------------------------------------------------


def test_takes_up_to_the_limit_then_waits_for_the_oldest_send(server: RedisServer) -> None:
    b = budget(server, limit=3, window=60)
    assert [b.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.in_window() == 3
    assert b.last_taken is not None and b.last_taken <= redis_now(server)
    with pytest.raises(StopWaiting):
        b.acquire()
    (wait,) = b._sleep.waits  # type: ignore[attr-defined]
    assert 0 < wait <= 60  # until the first of the three leaves the window
    assert b.in_window() == 3  # the refused attempt recorded nothing


def test_the_window_is_shared_per_store_and_runs_on_redis_clock(server: RedisServer) -> None:
    a = budget(server, limit=2)
    # Another "host" whose clock is an hour ahead: were the window on host clocks, it would see
    # a's sends as long gone. Redis's TIME is the only clock, so it sees the window full.
    b = budget(server, limit=2, clock=lambda: time.time() + 3600)
    other_store = budget(server, limit=2, key="https://other.retail.lightspeed.app/api/2.0")
    a.acquire()
    b.acquire()
    assert other_store.acquire() == 0.0  # a store of its own
    with pytest.raises(StopWaiting):
        b.acquire()
    with pytest.raises(StopWaiting):
        a.acquire()
    assert a.in_window() == b.in_window() == 2
    assert other_store.in_window() == 1


def test_the_hold_after_a_429_is_shared(server: RedisServer) -> None:
    a = budget(server, limit=100)
    b = budget(server, limit=100, clock=lambda: time.time() - 3600)  # skewed: only the hold's length counts
    a.block_until(time.time() + 42)
    with pytest.raises(StopWaiting):
        b.acquire()
    (wait,) = b._sleep.waits  # type: ignore[attr-defined]
    assert 40 < wait <= 42
    assert b.in_window() == 0  # nothing was taken while held
    a.block_until(time.time() + 5)  # a shorter hold never shortens the one in force
    assert 5 < float(server.client.get(a.blocked_key)) - redis_now(server) <= 42


def test_block_until_is_clamped(server: RedisServer) -> None:
    a = budget(server, max_block_seconds=5)
    a.block_until(time.time() + 10 * 365 * 86400)
    with pytest.raises(StopWaiting):
        a.acquire()
    assert 0 < a._sleep.waits[0] <= 5  # type: ignore[attr-defined]
    assert 0 < server.client.pttl(a.blocked_key) <= 6000  # the key goes away with the hold


def test_a_planted_hold_ten_years_ahead_is_capped_and_written_back(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = budget(server, max_block_seconds=5)
    server.client.set(a.blocked_key, str(redis_now(server) + 10 * 365 * 86400))
    with caplog.at_level(logging.WARNING), pytest.raises(StopWaiting):
        a.acquire()
    assert 0 < a._sleep.waits[0] <= 5  # type: ignore[attr-defined]
    assert "capped" in caplog.text
    assert float(server.client.get(a.blocked_key)) <= redis_now(server) + 5
    assert 0 < server.client.pttl(a.blocked_key) <= 6000


@pytest.mark.parametrize("planted", ["nan", "inf", "-inf", "soon"])
def test_a_hold_that_is_not_a_finite_number_is_ignored(
    server: RedisServer, caplog: pytest.LogCaptureFixture, planted: str
) -> None:
    a = budget(server)
    server.client.set(a.blocked_key, planted)
    with caplog.at_level(logging.WARNING):
        assert a.acquire() == 0.0
    assert "not a finite number" in caplog.text
    assert server.client.get(a.blocked_key) is None


def test_send_times_from_the_future_count_as_sent_now(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = budget(server, limit=5)
    server.client.zadd(a.sent_key, {"planted": redis_now(server) + 10 * 365 * 86400})
    with caplog.at_level(logging.WARNING):
        a.acquire()
    assert "future" in caplog.text
    assert server.client.zscore(a.sent_key, "planted") <= redis_now(server)
    assert a.in_window() == 2


def test_nothing_lingers_past_the_window(server: RedisServer) -> None:
    a = budget(server, window=60)
    a.acquire()
    assert 0 < server.client.pttl(a.sent_key) <= 61_000
    assert server.client.ttl(a.blocked_key) == -2  # no hold, no key


def test_the_limit_and_keys_match_the_file_backend(server: RedisServer, tmp_path: Path) -> None:
    r = RedisRateBudget.for_store(STORE_URL + "/", 2, url=server.url())
    f = RateBudget.for_store(STORE_URL, 2, directory=tmp_path)
    assert r.limit == f.limit == budget_limit(2) == 650 - 20
    digest = f.path.name.removeprefix("budget-").removesuffix(".json")
    assert r.sent_key == f"tier_sync:rate_budget:{{{digest}}}:sent"
    assert PASSWORD not in repr(r)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"http://:{PASSWORD}@127.0.0.1:6379/0", "not redis or rediss"),
        (f"redis://:{PASSWORD}@:6379/0", "names no host"),
        (f"redis://:{PASSWORD}@127.0.0.1:port/0", "not a URL"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/zero", "not a number"),
        (f"unix://:{PASSWORD}@/tmp/redis.sock", "not redis or rediss"),
    ],
)
def test_a_bad_url_is_refused_naming_the_connection_and_extra(url: str, why: str) -> None:
    with pytest.raises(LightspeedConfigError) as err:
        budget_for_connection("lightspeed_default", STORE_URL, 1, {"rate_budget_url": url})
    message = str(err.value)
    assert why in message
    assert "'lightspeed_default'" in message and "rate_budget_url" in message
    assert PASSWORD not in message


def test_the_extra_chooses_the_backend(tmp_path: Path) -> None:
    file_budget = budget_for_connection("c", STORE_URL, 1, {"rate_budget_dir": str(tmp_path)})
    assert isinstance(file_budget, RateBudget) and file_budget.directory == tmp_path
    redis_budget = budget_for_connection(
        "c", STORE_URL, 1, {"rate_budget_url": "rediss://cache.example:6380/2"}, window_seconds=7
    )
    assert isinstance(redis_budget, RedisRateBudget)
    assert (redis_budget.where, redis_budget.window_seconds) == ("rediss://cache.example:6380/2", 7.0)
    with pytest.raises(LightspeedConfigError, match="rate_budget_url must be"):
        budget_for_connection("c", STORE_URL, 1, {"rate_budget_url": 6379})


# -- (3) Redis gone: a clear error, nothing sent ---------------------------------------------------


def _connection(sim: Any, tmp_path: Path, **extra: Any) -> str:
    return json.dumps(sim.airflow_connection(TOKEN, rate_budget_dir=str(tmp_path / "budget"), **extra))


def _assert_clear_failure(err: pytest.ExceptionInfo[RateBudgetUnavailable], port: int) -> None:
    message = str(err.value)
    assert isinstance(err.value, LightspeedUnavailable)  # transient for the task: Airflow retries it
    assert "'lightspeed_default'" in message and "rate_budget_url" in message
    assert f"127.0.0.1:{port}" in message
    assert "No request was sent" in message
    assert PASSWORD not in message


def test_redis_that_nobody_listens_on_fails_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with running_simulator(token=TOKEN) as sim:
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        monkeypatch.setenv("AIRFLOW_CONN_LIGHTSPEED_DEFAULT", _connection(sim, tmp_path, rate_budget_url=url))
        client = LightspeedClient.from_connection("lightspeed_default")
        with caplog.at_level(logging.DEBUG), pytest.raises(RateBudgetUnavailable) as err:
            client.list_customer_groups()
        _assert_clear_failure(err, port)
        assert sim.requests == []  # never an unlimited budget: nothing went out
        assert PASSWORD not in caplog.text


def test_redis_stopped_mid_run_fails_the_next_request_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with running_simulator(token=TOKEN) as sim, redis_server(tmp_path, PASSWORD) as srv:
        monkeypatch.setenv(
            "AIRFLOW_CONN_LIGHTSPEED_DEFAULT", _connection(sim, tmp_path, rate_budget_url=srv.url())
        )
        client = LightspeedClient.from_connection("lightspeed_default")
        assert client.list_customer_groups() == []
        assert len(sim.requests) == 1 and client.budget is not None and client.budget.in_window() == 1
        srv.stop()
        with caplog.at_level(logging.DEBUG), pytest.raises(RateBudgetUnavailable) as err:
            client.list_customer_groups()
        _assert_clear_failure(err, srv.port)
        assert len(sim.requests) == 1
        assert PASSWORD not in caplog.text


def test_a_wrong_password_is_a_clear_failure_that_does_not_repeat_it(
    tmp_path: Path, server: RedisServer
) -> None:
    wrong = "not-the-pw-123"
    b = RedisRateBudget(STORE_URL, 5, url=f"redis://:{wrong}@127.0.0.1:{server.port}/0")
    with pytest.raises(RateBudgetUnavailable) as err:
        b.acquire()
    assert "AuthenticationError" in str(err.value) or "ResponseError" in str(err.value)
    assert wrong not in str(err.value)


# -- (2) two worker processes that share nothing but Redis, against the simulator -----------------

# The simulator's window is short (the budget follows the client's `rate_window_seconds`); header
# pacing is off, so only the budget stands between the two workers and a 429. One register: the
# simulator allows 350 per window, each budget 340. Each worker sends 200: 400 together.
WINDOW = 4.0
PER_WORKER = 200


def _worker(conn: str, home: str, ready: Any, go: Any, out: Any) -> None:
    os.environ["AIRFLOW_CONN_LIGHTSPEED_DEFAULT"] = conn
    os.environ["AIRFLOW_HOME"] = home
    client = LightspeedClient.from_connection(
        "lightspeed_default", rate_window_seconds=WINDOW, low_remaining_fraction=0.0, backoff_base=0.01
    )
    ready.put(os.getpid())
    if not go.wait(timeout=120):
        out.put({"error": "never released"})
        return
    for _ in range(PER_WORKER):
        client.list_customer_groups()  # one GET each (an empty store: one empty page)
    out.put(client.stats.as_dict())


def _hammer(tmp_path: Path, extra_for: Any) -> tuple[list[dict[str, int]], Counter[float], int]:
    """Two spawned workers, each with its own AIRFLOW_HOME and rate_budget_dir, against one simulator.

    Returns their stats, the simulator's request count per (fixed) window, and its 429 count.
    """
    origin = [time.time()]
    with running_simulator(
        token=TOKEN, window_seconds=WINDOW, retry_after="seconds", time_source=lambda: time.time() - origin[0]
    ) as sim:
        per_window: Counter[float] = Counter()
        hit = sim.rate_limiter.hit

        def counted_hit() -> tuple[bool, int, float]:
            allowed, remaining, end = hit()
            per_window[end] += 1
            return allowed, remaining, end

        sim.rate_limiter.hit = counted_hit
        ctx = multiprocessing.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = []
        for i in range(2):
            home = tmp_path / f"host{i}"
            conn = json.dumps(
                sim.airflow_connection(TOKEN, rate_budget_dir=str(home / "budget"), **extra_for(i))
            )
            procs.append(ctx.Process(target=_worker, args=(conn, str(home), ready, go, out)))
        for p in procs:
            p.start()
        try:
            for _ in procs:
                ready.get(timeout=120)
            origin[0] = time.time()  # the simulator's first window starts as the workers are released
            sim.rate_limiter.reset()
            go.set()
            results = [out.get(timeout=120) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        assert all("error" not in r for r in results), results
        rejected = sum(1 for r in sim.requests if r.status == 429)
        return results, per_window, rejected


def test_two_hosts_sharing_a_redis_budget_never_exceed_the_limit(tmp_path: Path, server: RedisServer) -> None:
    results, per_window, rejected = _hammer(tmp_path, lambda i: {"rate_budget_url": server.url()})
    assert rejected == 0 and all(r["rate_limited"] == 0 for r in results)
    assert max(per_window.values()) <= 350
    assert sum(r["requests"] for r in results) == 2 * PER_WORKER
    assert sum(per_window.values()) == 2 * PER_WORKER
    # The budget really held them back: 400 sends did not fit in one simulator window.
    assert len(per_window) >= 2


def test_two_hosts_with_their_own_file_budgets_do_overrun(tmp_path: Path) -> None:
    """The same load with per-host file budgets: each host believes it owns the whole limit."""
    results, per_window, rejected = _hammer(tmp_path, lambda i: {})
    assert rejected > 0 and sum(r["rate_limited"] for r in results) == rejected
    assert max(per_window.values()) > 350


# -- the password in an Airflow connection of its own --------------------------------------------


def test_a_redis_airflow_connection_keeps_the_password_out_of_the_extras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: RedisServer
) -> None:
    redis_conn = {"conn_type": "redis", "host": "127.0.0.1", "port": server.port, "password": PASSWORD}
    monkeypatch.setenv("AIRFLOW_CONN_TIER_SYNC_REDIS", json.dumps({**redis_conn, "extra": {"db": 3}}))
    with running_simulator(token=TOKEN) as sim:
        conn = _connection(sim, tmp_path, rate_budget_redis_conn_id="tier_sync_redis")
        monkeypatch.setenv("AIRFLOW_CONN_LIGHTSPEED_DEFAULT", conn)
        client = LightspeedClient.from_connection("lightspeed_default")
        assert isinstance(client.budget, RedisRateBudget)
        assert client.budget.where == f"redis://127.0.0.1:{server.port}/3"
        assert PASSWORD not in repr(client.budget)
        client.list_customer_groups()
        db3 = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD, db=3)
        assert db3.zcard(client.budget.sent_key) == 1
        server.stop()
        with pytest.raises(RateBudgetUnavailable) as err:
            client.list_customer_groups()
        assert "rate_budget_redis_conn_id" in str(err.value) and PASSWORD not in str(err.value)
        assert len(sim.requests) == 1


def test_both_redis_extras_at_once_are_refused() -> None:
    extra = {"rate_budget_url": "redis://127.0.0.1:6379/0", "rate_budget_redis_conn_id": "tier_sync_redis"}
    with pytest.raises(LightspeedConfigError, match="not both"):
        budget_for_connection("lightspeed_default", STORE_URL, 1, extra, get_connection=lambda _: None)
