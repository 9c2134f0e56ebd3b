"""The request budget shared by every process that talks to one Lightspeed store, and its file backend.

Why: the X-Series limit (300 x registers + 50 requests per 5 minutes) is counted per retailer per
application, so the N mapped tasks that the `lightspeed_api` pool runs at once draw from one bucket.
Pool slots bound concurrency, not rate; this budget bounds the rate. It is a sliding-window log of
send times kept in a small JSON file, guarded by `fcntl.flock`, so separate worker processes (and
threads) agree on it without any server: the zero-setup default, per host. Workers on several
hosts share one budget through the Redis backend (`rate_budget_redis.RedisRateBudget`, chosen with
the connection extra `rate_budget_url` or `rate_budget_redis_conn_id`); `budget_for_connection`
picks the backend. Both implement
`RequestBudget`, the one interface the client uses (`acquire`, `block_until`, `in_window`).

A sliding window is stricter than the server's (fixed) 5-minute window: it never allows more than
`limit` sends in *any* 300 s span, so it cannot overrun a fixed window however the two are aligned.

The file is obeyed by every process, so it must be ours and plausible: the folder defaults to
`$AIRFLOW_HOME/tier_sync_rate_budget` (not the world-writable temp dir) and is kept owner-only
(0o700, files 0o600). A folder owned by another user is refused; one of ours that others may write
into is closed (chmod 0o700, with a warning): it is ours to fix, and the clamps below bound any
damage a file planted meanwhile could do. What is read is clamped: a `blocked_until` more than
`MAX_BLOCK_SECONDS` ahead is cut to that (and written back, so the cut holds), a value that is not
a finite number is ignored, and send times from the future count as sent now.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from include.tier_sync.lightspeed_errors import LightspeedConfigError, LightspeedUnavailable

log = logging.getLogger(__name__)

WINDOW_SECONDS = 300.0
# The longest hold a server may ask for: one window plus slack, as the client caps Retry-After
# (`lightspeed_http.MAX_RETRY_AFTER`). A longer `blocked_until` in the file is not believed.
MAX_BLOCK_SECONDS = WINDOW_SECONDS + 60.0
DEFAULT_DIR_NAME = "tier_sync_rate_budget"
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class RateBudgetDirError(PermissionError):
    """The budget folder is not safe to trust (owned by another user, or not a folder)."""


class RateBudgetUnavailable(LightspeedUnavailable):
    """The shared budget cannot be read or taken (its Redis server is down, refuses us, times out).

    No request was sent: a budget that cannot be consulted is never treated as an unlimited one.
    Transient like any `LightspeedUnavailable` (the task's retries may find the server back).
    """


def store_limit(registers: int) -> int:
    """The documented X-Series limit for a store: 300 per register plus 50, per 5-minute window."""
    return 300 * max(1, int(registers)) + 50


def default_reserve(limit: int) -> int:
    """Headroom left for other callers of the same app (a manual re-run, a colleague's script)."""
    return max(1, round(limit * 0.03))


def budget_limit(registers: int, reserve: int | None = None) -> int:
    """A store's budget: the documented limit minus the reserve (default `default_reserve`), >= 1."""
    limit = store_limit(registers)
    limit -= default_reserve(limit) if reserve is None else max(0, int(reserve))
    return max(1, limit)


def budget_digest(key: str) -> str:
    """The store key's short hash: the file name of the file backend, the Redis key of the other."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def budget_for_connection(
    conn_id: str,
    base_url: str,
    registers: int,
    extra: Mapping[str, Any],
    *,
    window_seconds: float = WINDOW_SECONDS,
    get_connection: Callable[[str], Any] | None = None,
) -> RequestBudget:
    """The budget a client built from connection `conn_id` uses, chosen by its extras.

    `rate_budget_url` (a `redis://` or `rediss://` URL), or `rate_budget_redis_conn_id` (an Airflow
    connection of type redis, read with `get_connection`), selects the Redis backend, shared by every
    host that uses the same server; with neither, the file backend in `rate_budget_dir` (per host).
    A malformed or ambiguous setting raises `LightspeedConfigError` naming the connection and extra.
    """
    url, redis_conn_id = extra.get("rate_budget_url"), extra.get("rate_budget_redis_conn_id")
    if not url and not redis_conn_id:
        return RateBudget.for_store(
            base_url, registers, directory=extra.get("rate_budget_dir") or None, window_seconds=window_seconds
        )
    from include.tier_sync import rate_budget_redis as rbr  # redis only when asked for

    if url and redis_conn_id:
        raise LightspeedConfigError(
            f"Lightspeed connection '{conn_id}': set extra rate_budget_url or rate_budget_redis_conn_id, not both"
        )
    name = rbr.URL_EXTRA if url else rbr.CONN_EXTRA
    if not isinstance(url or redis_conn_id, str):
        raise LightspeedConfigError(
            f"Lightspeed connection '{conn_id}': extra {name} must be "
            + ("a redis:// or rediss:// URL" if url else "an Airflow connection id")
        )
    if redis_conn_id:
        if get_connection is None:
            raise LightspeedConfigError(f"Lightspeed connection '{conn_id}': {name} needs Airflow connections")
        url = rbr.url_from_connection(get_connection(redis_conn_id), redis_conn_id)
    if extra.get("rate_budget_dir"):
        log.info("Lightspeed connection '%s': rate_budget_dir is not used, the budget is in Redis", conn_id)
    return rbr.RedisRateBudget.for_store(
        base_url, registers, url=str(url).strip(), conn_id=conn_id, extra_name=name, window_seconds=window_seconds
    )


def default_directory() -> Path:
    """`$AIRFLOW_HOME/tier_sync_rate_budget` (Airflow's own default home: ~/airflow).

    Every task process of one deployment finds the same file there, and unlike the system temp dir
    no other user can plant one. Read at call time, so a test's or a worker's AIRFLOW_HOME counts.
    """
    home = os.environ.get("AIRFLOW_HOME") or "~/airflow"
    return Path(os.path.expanduser(os.path.expandvars(home))) / DEFAULT_DIR_NAME


def ensure_private_directory(directory: str | os.PathLike[str]) -> Path:
    """Create `directory` owner-only (0o700), close one of ours that others may write, refuse the rest.

    Raises RateBudgetDirError naming the folder when it is not a folder or belongs to another user.
    """
    path = Path(directory)
    try:
        path.mkdir(mode=_DIR_MODE, parents=True)
        os.chmod(path, _DIR_MODE)  # mkdir's mode passes through the umask
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RateBudgetDirError(
            f"Lightspeed request budget folder {path} is not a folder: remove it or set the "
            f"connection extra `rate_budget_dir` to a private folder"
        )
    if st.st_uid != os.getuid():
        raise RateBudgetDirError(
            f"Lightspeed request budget folder {path} belongs to uid {st.st_uid}, not to this "
            f"process (uid {os.getuid()}): its files could hold every task back. Set the connection "
            f"extra `rate_budget_dir` to a folder of this user, or remove {path}"
        )
    if st.st_mode & 0o022:
        log.warning(
            "Lightspeed request budget folder %s was writable by others (mode %s); made it 0o700",
            path,
            oct(stat.S_IMODE(st.st_mode)),
        )
        os.chmod(path, _DIR_MODE)
    return path


class RequestBudget(abc.ABC):
    """The budget's interface: a sliding window of at most `limit` sends in any `window_seconds`.

    `acquire()` takes one send slot, waiting while none is free; `block_until(epoch)` holds every
    sharer back (after a 429), never beyond `max_block_seconds` from now; `in_window()` counts the
    window's sends. A backend implements `_try_take`, `block_until` and `in_window`; `last_taken` is
    the send time the last `acquire()` recorded (in the backend's clock).
    """

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        *,
        sleep: Callable[[float], None],
        max_wait_log_interval: float,
        max_block_seconds: float,
    ) -> None:
        if limit < 1:
            raise ValueError(f"rate budget limit must be >= 1, got {limit}")
        if window_seconds <= 0:
            raise ValueError(f"rate budget window must be > 0, got {window_seconds}")
        self.limit = int(limit)
        self.window_seconds = float(window_seconds)
        self.max_block_seconds = float(max_block_seconds)
        self._sleep = sleep
        self._log_interval = max_wait_log_interval
        self.last_taken: float | None = None

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

    @abc.abstractmethod
    def _try_take(self) -> float:
        """Record a send now and return 0, or return how long to wait before trying again."""

    @abc.abstractmethod
    def block_until(self, until: float) -> None:
        """Hold every sharer back until epoch `until` (clamped to `max_block_seconds` from now)."""

    @abc.abstractmethod
    def in_window(self) -> int:
        """How many sends the current window holds (for logs and tests)."""


class RateBudget(RequestBudget):
    """The file backend: a sliding-window log in a flock-guarded JSON file, shared on one host.

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
        max_block_seconds: float = MAX_BLOCK_SECONDS,
    ) -> None:
        super().__init__(
            limit,
            window_seconds,
            sleep=sleep,
            max_wait_log_interval=max_wait_log_interval,
            max_block_seconds=max_block_seconds,
        )
        self.key = key
        self.directory = Path(directory) if directory else default_directory()
        digest = budget_digest(key)
        self.path = self.directory / f"budget-{digest}.json"
        self.lock_path = self.directory / f"budget-{digest}.lock"
        self._clock = clock
        # flock is per open file description; threads of one process share ours, so serialise them.
        self._thread_lock = threading.Lock()

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
        return cls(
            base_url.rstrip("/"),
            budget_limit(registers, reserve),
            window_seconds,
            directory,
            clock=clock,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return (
            f"RateBudget(limit={self.limit}, window_seconds={self.window_seconds}, path={str(self.path)!r})"
        )

    # -- the interface ---------------------------------------------------------------------------

    def block_until(self, until: float) -> None:
        """Hold every process back until epoch `until` (after a 429 the server told us when to return)."""
        with self._locked():
            sent, blocked = self._read()
            until = min(float(until), self._clock() + self.max_block_seconds)
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
        ensure_private_directory(self.directory)
        with self._thread_lock:
            try:
                fd = os.open(
                    self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE
                )
            except OSError as exc:
                raise RateBudgetDirError(
                    f"Lightspeed request budget lock {self.lock_path} cannot be opened ({exc.strerror}): "
                    f"remove it, or set the connection extra `rate_budget_dir` to a private folder"
                ) from None
            try:
                st = os.fstat(fd)
                if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != _FILE_MODE:
                    os.fchmod(fd, _FILE_MODE)  # a lock file made before the folder was private
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _read(self) -> tuple[list[float], float]:
        """(send times, blocked-until epoch) from the budget file, made plausible; empty when none.

        Called under the lock. Whatever had to be cut is written back, so the cut holds: a clamped
        hold then ends at the clamp instead of being pushed out again on every read.
        """
        raw = self._load()
        if raw is None:
            return [], 0.0
        stored, blocked_raw = raw
        now = self._clock()
        sent = [t for t in (_finite(x) for x in stored) if t is not None]
        changed = len(sent) != len(stored)
        if changed:
            log.warning(
                "Lightspeed request budget file %s: ignored send times that are not numbers", self.path
            )
        if any(t > now for t in sent):
            log.warning("Lightspeed request budget file %s: send times in the future count as now", self.path)
            sent, changed = [min(t, now) for t in sent], True
        blocked = _finite(blocked_raw)
        if blocked is None:
            log.warning(
                "Lightspeed request budget file %s: blocked_until is not a finite number; ignored", self.path
            )
            blocked, changed = 0.0, True
        elif blocked > now + self.max_block_seconds:
            log.warning(
                "Lightspeed request budget file %s asked to hold requests for %.0f s; capped at %.0f s",
                self.path,
                blocked - now,
                self.max_block_seconds,
            )
            blocked, changed = now + self.max_block_seconds, True
        if changed:
            self._write(sent, blocked)
        return sent, blocked

    def _load(self) -> tuple[list[Any], Any] | None:
        """The raw (sent, blocked_until) of a budget file of ours; None when there is none or it is
        not usable (unreadable, a symlink, another user's: it is replaced at the next write)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            log.warning(
                "Lightspeed request budget file %s cannot be opened; starting a new window", self.path
            )
            return None
        with os.fdopen(fd, "rb") as fh:
            if os.fstat(fh.fileno()).st_uid != os.getuid():
                log.warning("Lightspeed request budget file %s is not ours; starting a new window", self.path)
                return None
            data = fh.read()
        try:
            raw = json.loads(data.decode("utf-8"))
            stored = raw.get("sent", [])
            if not isinstance(stored, list):
                raise TypeError("sent is not a list")
            return stored, raw.get("blocked_until", 0.0)
        except (ValueError, TypeError, AttributeError):
            # Writes are atomic renames, so this is a foreign or hand-edited file: start afresh.
            log.warning("Lightspeed request budget file %s unreadable; starting a new window", self.path)
            return None

    def _write(self, sent: list[float], blocked_until: float) -> None:
        # mkstemp creates the file 0o600; the rename keeps that mode.
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"sent": sent, "blocked_until": blocked_until}, fh)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _finite(value: object) -> float | None:
    """A finite float from a JSON number; None for anything else (strings, bools, NaN, Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None
