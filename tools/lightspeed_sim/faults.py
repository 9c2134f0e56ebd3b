"""Injectable faults and the fixed-window rate limiter.

Faults let tests reproduce what the real API and its edge do under stress (5xx, resets, slow
answers, a write that lands but is answered 500, a 200 that is not the envelope, a body trickled
out byte by byte, a feed whose cursor creeps while the same records come back) without mocking
the client.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("status", "reset", "latency", "apply_then_500", "trickle", "creep")


@dataclass
class Fault:
    """One fault rule: which requests it matches and what it does to them."""

    kind: str
    method: str | None = None  # None or "*" = any method
    path: str = ".*"  # regex, re.search on the path after /api/2.0 (or the full path)
    times: int | None = None  # fire at most this many times (None = unlimited)
    probability: float | None = None  # fire on a matching request with this probability
    status: int = 500  # kind "status"
    body: Any = None  # kind "status": str (sent as text/html) or JSON-able object; None = HTML page
    seconds: float = 0.0  # kind "latency": the delay; kind "trickle": the pause between chunks
    chunk_bytes: int = 16  # kind "trickle": bytes sent per chunk
    skip: int = 0  # let the first `skip` matching requests through untouched, then fire
    fired: int = 0
    skipped: int = 0
    id: int = 0
    # kind "creep": the page the rule first served; repeated (cursor + 1) on every later fire
    pinned: list[Any] | None = field(default=None, repr=False, compare=False)
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0")
        if self.seconds < 0 or self.chunk_bytes < 1 or self.skip < 0:
            raise ValueError("seconds and skip must be >= 0, chunk_bytes >= 1")
        self._regex = re.compile(self.path)

    @property
    def exhausted(self) -> bool:
        """True when `times` fires have happened."""
        return self.times is not None and self.fired >= self.times

    def matches(self, method: str, sub_path: str, full_path: str) -> bool:
        """Method and path match (the probability is decided by the registry)."""
        if self.method not in (None, "*") and self.method.upper() != method.upper():
            return False
        return bool(self._regex.search(sub_path) or self._regex.search(full_path))

    def as_dict(self) -> dict[str, Any]:
        """JSON view for the admin endpoint."""
        return {
            "id": self.id,
            "kind": self.kind,
            "method": self.method,
            "path": self.path,
            "times": self.times,
            "probability": self.probability,
            "status": self.status,
            "body": self.body,
            "seconds": self.seconds,
            "chunk_bytes": self.chunk_bytes,
            "skip": self.skip,
            "fired": self.fired,
            "skipped": self.skipped,
        }


class FaultRegistry:
    """Ordered fault rules; the first live rule that matches (and wins its coin toss) fires."""

    def __init__(self, seed: int = 0) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._next_id = 1

    def add(
        self,
        kind: str,
        *,
        method: str | None = None,
        path: str = ".*",
        times: int | None = None,
        probability: float | None = None,
        status: int = 500,
        body: Any = None,
        seconds: float = 0.0,
        chunk_bytes: int = 16,
        skip: int = 0,
    ) -> Fault:
        """Register a fault; see README "Fault injection" for examples."""
        fault = Fault(
            kind=kind,
            method=method,
            path=path,
            times=times,
            probability=probability,
            status=status,
            body=body,
            seconds=seconds,
            chunk_bytes=chunk_bytes,
            skip=skip,
        )
        with self._lock:
            fault.id = self._next_id
            self._next_id += 1
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def remove(self, fault_id: int) -> bool:
        """Remove one fault by id; False when there was none."""
        with self._lock:
            before = len(self._faults)
            self._faults = [f for f in self._faults if f.id != fault_id]
            return len(self._faults) != before

    def reseed(self, seed: int) -> None:
        """Restart the probability RNG (reproducible flaky runs)."""
        with self._lock:
            self._rng = random.Random(seed)

    @property
    def faults(self) -> list[Fault]:
        """A snapshot of the rules."""
        with self._lock:
            return list(self._faults)

    def match(self, method: str, sub_path: str, full_path: str) -> Fault | None:
        """The fault that fires for this request, if any (its `fired` count is bumped).

        A rule still inside its `skip` lets the request through (to later rules) and counts it.
        """
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or not fault.matches(method, sub_path, full_path):
                    continue
                if fault.skipped < fault.skip:
                    fault.skipped += 1
                    continue
                if fault.probability is not None and self._rng.random() >= fault.probability:
                    continue
                fault.fired += 1
                return fault
        return None


class RateLimiter:
    """Fixed window aligned to multiples of `window_seconds` since the epoch (like a 5-minute bucket).

    Every authorised request counts, including the ones answered 429 and the ones a fault hits.
    """

    def __init__(self, limit: int, window_seconds: float, clock: Callable[[], float] = time.time) -> None:
        if limit < 1 or window_seconds <= 0:
            raise ValueError("limit must be >= 1 and window_seconds > 0")
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._window = -1
        self._count = 0

    def hit(self) -> tuple[bool, int, float]:
        """Count one request: (allowed, remaining after it, window end as epoch seconds)."""
        with self._lock:
            now = self._clock()
            window = math.floor(now / self.window_seconds)
            if window != self._window:
                self._window = window
                self._count = 0
            self._count += 1
            end = (window + 1) * self.window_seconds
            return self._count <= self.limit, max(0, self.limit - self._count), end

    def peek(self) -> int:
        """Remaining requests in the current window, without counting one."""
        with self._lock:
            window = math.floor(self._clock() / self.window_seconds)
            used = self._count if window == self._window else 0
            return max(0, self.limit - used)

    def reset(self) -> None:
        """Forget the current window's count."""
        with self._lock:
            self._window = -1
            self._count = 0
