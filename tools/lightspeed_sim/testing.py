"""Test helper: a simulator on a free 127.0.0.1 port for the duration of a `with` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tools.lightspeed_sim.server import SimServer
from tools.lightspeed_sim.store import SimStore


@contextmanager
def running_simulator(
    store: SimStore | None = None,
    *,
    token: str = "t0ken-for-tests",
    page_cap: int = 200,
    registers: int = 1,
    rate_limit: int | None = None,
    window_seconds: float = 300.0,
    **options: Any,
) -> Iterator[SimServer]:
    """Start a SimServer in a background thread on port 0; stop it on exit.

    `options` go to SimServer (e.g. `empty_version="missing"`, `retry_after="seconds"`,
    `fault_seed=7`). A store of `None` means an empty store.
    """
    sim = SimServer(
        store if store is not None else SimStore(),
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
