"""A request budget shared by every process on this machine that talks to one Lightspeed store.

Why: the X-Series limit (300 x registers + 50 requests per 5 minutes) is counted per retailer per
application, so the N mapped tasks that the `lightspeed_api` pool runs at once draw from one bucket.
Pool slots bound concurrency, not rate; this budget bounds the rate. It is a sliding-window log of
send times kept in a small JSON file, guarded by `fcntl.flock`, so separate worker processes (and
threads) agree on it without any server. Across machines the server's `X-RateLimit-Remaining`
header is the authority; the client paces on that as well (see `lightspeed.py`).

A sliding window is stricter than the server's (fixed) 5-minute window: it never allows more than
`limit` sends in *any* 300 s span, so it cannot overrun a fixed window however the two are aligned.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

WINDOW_SECONDS = 300.0
DEFAULT_DIR_NAME = "tier_sync_rate_budget"


def store_limit(registers: int) -> int:
    """The documented X-Series limit for a store: 300 per register plus 50, per 5-minute window."""
    return 300 * max(1, int(registers)) + 50


def default_reserve(limit: int) -> int:
    """Headroom left for other callers of the same app (a manual re-run, a colleague's script)."""
    return max(1, round(limit * 0.03))


def default_directory() -> Path:
    """A folder in the system temp dir: every process of one machine (one user) finds the same file."""
    return Path(tempfile.gettempdir()) / DEFAULT_DIR_NAME


class RateBudget:
    """Process-safe sliding-window budget: `acquire()` takes one send slot, waiting while none is free.

    `clock` must be wall-clock epoch seconds (shared across processes), hence `time.time`, not
    `time.monotonic`. `clock` and `sleep` are injectable so tests do not wait.
    """

    def __init__(
        self,
        key: str,
        limit: int,
        window_seconds: float = WINDOW_SECONDS,
        directory: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_wait_log_interval: float = 30.0,
    ) -> None:
        if limit < 1:
            raise ValueError(f"rate budget limit must be >= 1, got {limit}")
        if window_seconds <= 0:
            raise ValueError(f"rate budget window must be > 0, got {window_seconds}")
        self.key = key
        self.limit = int(limit)
        self.window_seconds = float(window_seconds)
        self.directory = Path(directory) if directory else default_directory()
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
        self.path = self.directory / f"budget-{digest}.json"
        self.lock_path = self.directory / f"budget-{digest}.lock"
        self._clock = clock
        self._sleep = sleep
        self._log_interval = max_wait_log_interval
        # flock is per open file description; threads of one process share ours, so serialise them.
        self._thread_lock = threading.Lock()
        self.last_taken: float | None = None  # the send time recorded by the last acquire()

    @classmethod
    def for_store(
        cls,
        base_url: str,
        registers: int = 1,
        directory: str | os.PathLike[str] | None = None,
        *,
        reserve: int | None = None,
        window_seconds: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RateBudget:
        """The budget of one store (keyed by its API base URL): the documented limit minus a reserve."""
        limit = store_limit(registers)
        limit -= default_reserve(limit) if reserve is None else max(0, int(reserve))
        return cls(
            base_url.rstrip("/"),
            max(1, limit),
            window_seconds,
            directory,
            clock=clock,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return (
            f"RateBudget(limit={self.limit}, window_seconds={self.window_seconds}, path={str(self.path)!r})"
        )

    # -- public API -------------------------------------------------------------------------------

    def acquire(self) -> float:
        """Take one slot, sleeping until one frees up. Returns the seconds spent waiting."""
        waited = 0.0
        last_log = -self._log_interval
        while True:
            wait = self._try_take()
            if wait <= 0:
                if waited >= 1.0:
                    log.info("Lightspeed request budget: waited %.1f s for a slot", waited)
                return waited
            if waited - last_log >= self._log_interval:
                log.info(
                    "Lightspeed request budget full (%d per %.0f s): waiting %.1f s",
                    self.limit,
                    self.window_seconds,
                    wait,
                )
                last_log = waited
            self._sleep(wait)
            waited += wait

    def block_until(self, until: float) -> None:
        """Hold every process back until epoch `until` (after a 429 the server told us when to return)."""
        with self._locked():
            sent, blocked = self._read()
            if until > blocked:
                self._write(sent, until)

    def in_window(self) -> int:
        """How many sends the current window holds (for logs and tests)."""
        with self._locked():
            now = self._clock()
            sent, _ = self._read()
            return sum(1 for t in sent if t > now - self.window_seconds)

    # -- internals --------------------------------------------------------------------------------

    def _try_take(self) -> float:
        """Record a send now and return 0, or return how long to wait before trying again."""
        with self._locked():
            now = self._clock()
            stored, blocked = self._read()
            if blocked > now:
                return blocked - now
            cutoff = now - self.window_seconds
            sent = sorted(t for t in stored if t > cutoff)
            if len(sent) < self.limit:
                sent.append(now)
                self._write(sent, blocked)
                self.last_taken = now
                return 0.0
            # The slot frees when the oldest send that keeps the window full leaves it.
            oldest = sent[len(sent) - self.limit]
            return max(oldest + self.window_seconds - now, 0.001)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(self.lock_path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read(self) -> tuple[list[float], float]:
        """(send times, blocked-until epoch) from the budget file; empty when there is none."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return [float(t) for t in raw.get("sent", [])], float(raw.get("blocked_until", 0.0))
        except FileNotFoundError:
            return [], 0.0
        except (ValueError, TypeError, AttributeError):
            # Writes are atomic renames, so this is a foreign or hand-edited file: start afresh.
            log.warning("Lightspeed request budget file %s unreadable; starting a new window", self.path)
            return [], 0.0

    def _write(self, sent: list[float], blocked_until: float) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"sent": sent, "blocked_until": blocked_until}, fh)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
