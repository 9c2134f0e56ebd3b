"""The shared request budget: never more than `limit` sends in any window, across processes."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from include.tier_sync.rate_budget import RateBudget, default_reserve, store_limit
from tests.unit.fakes import FakeTime

pytestmark = pytest.mark.unit


def test_store_limit_and_reserve() -> None:
    assert store_limit(1) == 350
    assert store_limit(3) == 950
    assert store_limit(0) == 350  # a nonsense register count still gets the one-register limit
    budget = RateBudget.for_store("http://x/api/2.0", registers=1, directory="/nonexistent-not-created")
    assert budget.limit == 350 - default_reserve(350)
    assert 0 < default_reserve(350) <= 20
    assert RateBudget.for_store("http://x", registers=2, reserve=0).limit == 650


def test_waits_for_the_oldest_send_to_leave_the_window(tmp_path: Path) -> None:
    t = FakeTime()
    budget = RateBudget("store", limit=3, window_seconds=10, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    for _ in range(3):
        assert budget.acquire() == 0.0
        t.now += 1  # sends at +0, +1, +2
    assert budget.in_window() == 3
    waited = budget.acquire()  # at +3: the send at +0 leaves the window at +10
    assert waited == pytest.approx(7.0)
    assert t.sleeps == [pytest.approx(7.0)]
    assert budget.last_taken == pytest.approx(t.now)


def test_budget_is_keyed_and_shared_through_the_file(tmp_path: Path) -> None:
    t = FakeTime()
    a = RateBudget("store-a", limit=2, window_seconds=60, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    a2 = RateBudget("store-a", limit=2, window_seconds=60, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    b = RateBudget("store-b", limit=2, window_seconds=60, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    a.acquire()
    a2.acquire()
    b.acquire()  # another store: its own budget
    assert t.sleeps == []
    a.acquire()  # the two sends of store-a fill its window, whichever object made them
    assert t.sleeps == [pytest.approx(60.0)]


def test_block_until_holds_everyone_back(tmp_path: Path) -> None:
    t = FakeTime()
    budget = RateBudget("s", limit=100, window_seconds=300, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    other = RateBudget("s", limit=100, window_seconds=300, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    budget.block_until(t.now + 42)
    assert other.acquire() == pytest.approx(42.0)


def test_unreadable_file_starts_afresh(tmp_path: Path) -> None:
    t = FakeTime()
    budget = RateBudget("s", limit=2, window_seconds=300, directory=tmp_path, clock=t.clock, sleep=t.sleep)
    budget.acquire()
    budget.path.write_text("{not json", encoding="utf-8")
    assert budget.acquire() == 0.0
    assert budget.in_window() == 1


def test_rejects_nonsense_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RateBudget("s", limit=0, directory=tmp_path)
    with pytest.raises(ValueError):
        RateBudget("s", limit=1, window_seconds=0, directory=tmp_path)


def _worker(directory: str, limit: int, window: float, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    budget = RateBudget("shared-store", limit=limit, window_seconds=window, directory=directory)
    taken: list[float] = []
    for _ in range(n):
        budget.acquire()
        assert budget.last_taken is not None
        taken.append(budget.last_taken)
    out.put(taken)


def _max_in_any_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    best = 0
    for i, start in enumerate(stamps):
        best = max(best, sum(1 for s in stamps[i:] if s < start + window))
    return best


def test_two_processes_never_exceed_the_limit(tmp_path: Path) -> None:
    limit, window, per_process = 4, 0.4, 7
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path), limit, window, per_process, out)) for _ in range(2)
    ]
    started = time.time()
    for p in procs:
        p.start()
    results = [out.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    stamps = [s for r in results for s in r]
    assert len(stamps) == 2 * per_process
    assert _max_in_any_window(stamps, window) <= limit
    # 14 sends at 4 per 0.4 s need at least three full windows: the budget really made them wait.
    assert time.time() - started >= 3 * window * 0.9
    # Both processes got slots (neither starved).
    assert all(len(r) == per_process for r in results)
