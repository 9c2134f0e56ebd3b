"""Test helpers: a simulator on a free 127.0.0.1 port for a `with` block, and the clock it stamps with.

A test that fixes an `as_of` must control every timestamp it creates: the simulator stamps each
write (`updated_at`, `deleted_at`, ...) with its store's clock, which is the wall clock unless
set. `ticking_clock(as_of)` is the clock such a test gives it, so its mutations land inside the
interval it tests on any calendar day (see "How tests choose their dates" in the README).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from tools.lightspeed_sim.server import SimServer
from tools.lightspeed_sim.store import SimStore

# A scheduled run starts a little after its interval closes; the simulator's clock starts there.
RUN_START_DELAY = timedelta(minutes=1)


def ticking_clock(start: datetime, *, monotonic: Callable[[], float] = time.monotonic) -> Callable[[], datetime]:
    """A clock that reads `start` now and then advances with real elapsed time (never the calendar)."""
    if start.tzinfo is None:
        raise ValueError(f"ticking_clock needs an aware start, got {start!r}")
    origin = monotonic()
    start = start.astimezone(UTC)
    return lambda: start + timedelta(seconds=monotonic() - origin)


def clock_after(as_of: datetime) -> Callable[[], datetime]:
    """The store clock of a test whose run has `as_of`: it starts just after it, as a scheduled run does."""
    return ticking_clock(as_of + RUN_START_DELAY)


@contextmanager
def running_simulator(
    store: SimStore | None = None,
    *,
    token: str = "t0ken-for-tests",
    page_cap: int = 200,
    registers: int = 1,
    rate_limit: int | None = None,
    window_seconds: float = 300.0,
    clock: Callable[[], datetime] | None = None,
    **options: Any,
) -> Iterator[SimServer]:
    """Start a SimServer in a background thread on port 0; stop it on exit.

    `clock`, when given, becomes the store's clock (what every write is stamped with); a test
    with a fixed `as_of` passes `clock_after(as_of)`. `options` go to SimServer (e.g.
    `empty_version="missing"`, `retry_after="seconds"`, `fault_seed=7`). A store of `None`
    means an empty store.
    """
    store = store if store is not None else SimStore()
    if clock is not None:
        store.clock = clock
    sim = SimServer(
        store,
        token=token,
        port=0,
        page_cap=page_cap,
        registers=registers,
        rate_limit=rate_limit,
        window_seconds=window_seconds,
        **options,
    )
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
