"""The request budget in Redis: one sliding window shared by every host that talks to one store.

Why: the file backend (`rate_budget.RateBudget`) is per host, so two Celery workers on two machines
would each believe they own the whole X-Series limit. Here the window lives in Redis, chosen with
the connection extra `rate_budget_url` (`redis://[:password@]host:6379/1`, `rediss://` for TLS) or
`rate_budget_redis_conn_id` (an Airflow connection of type redis, its password in its password field);
the interface and semantics are `rate_budget.RequestBudget`'s, the same as the file's.

How it stays exact across hosts:
- every decision is one Lua script (EVALSHA, EVAL on a cold cache), which Redis runs atomically:
  no two processes, wherever they run, can both take the last slot;
- time is Redis's own `TIME`, read inside the script: one clock for all hosts, so a host whose
  clock is off cannot see old sends as gone. Only a hold's *length* (`block_until(epoch)` minus
  this host's clock, i.e. the `Retry-After` the client just read) crosses over from the host;
- keys are namespaced per store with the same hash the file backend names its file with,
  `tier_sync:rate_budget:{<digest>}:sent` (a sorted set: one member per send, scored with its
  time) and `...:blocked` (the `blocked_until` epoch); the `{}` hash tag keeps both in one Redis
  Cluster slot. Both keys carry a TTL (the window, the hold, plus a second), so nothing lingers;
- what is read is clamped like the file: a `blocked_until` more than `max_block_seconds` ahead is
  cut to that (and written back), one that is not a finite number is dropped, send times from the
  future count as sent now. The script reports what it cut; it is logged here as a warning.

Redis unreachable, refusing the password, timing out or answering an error: `acquire()` raises
`RateBudgetUnavailable` naming the connection, the extra and host:port (never the password), and no
request is sent. There is deliberately no fallback to the file: a per-host budget is exactly the
overrun this backend exists to prevent; the task fails and Airflow's retries try again.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import SplitResult, quote, unquote, urlsplit

import redis
import redis.backoff
import redis.exceptions
import redis.retry

from include.tier_sync.lightspeed_errors import LightspeedConfigError
from include.tier_sync.rate_budget import (
    MAX_BLOCK_SECONDS,
    WINDOW_SECONDS,
    RateBudgetUnavailable,
    RequestBudget,
    budget_digest,
    budget_limit,
)

log = logging.getLogger(__name__)

URL_EXTRA = "rate_budget_url"
CONN_EXTRA = "rate_budget_redis_conn_id"
KEY_PREFIX = "tier_sync:rate_budget"
SCHEMES = ("redis", "rediss")
DEFAULT_PORT = 6379
SOCKET_TIMEOUT = 5.0  # seconds per Redis call: a hung server fails the request, it never waits for ever

# KEYS: sent (zset), blocked (string). ARGV: limit, window s, max block s, member.
# Returns {taken 0/1, wait s, now s, note}: numbers as strings (Lua numbers would be cut to integers).
_ACQUIRE = """
local sent, blocked_key = KEYS[1], KEYS[2]
local limit, window, max_block = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local note = ''
local blocked = 0
local raw = redis.call('GET', blocked_key)
if raw then
  blocked = tonumber(raw)
  if blocked == nil or blocked ~= blocked or blocked == math.huge or blocked == -math.huge then
    redis.call('DEL', blocked_key)
    blocked, note = 0, 'blocked_until is not a finite number; ignored'
  elseif blocked > now + max_block then
    note = string.format('asked to hold requests for %.0f s; capped at %.0f s', blocked - now, max_block)
    blocked = now + max_block
    redis.call('SET', blocked_key, fmt(blocked), 'PX', math.ceil(max_block * 1000) + 1000)
  end
end
if blocked > now then
  return {0, fmt(blocked - now), fmt(now), note}
end
redis.call('ZREMRANGEBYSCORE', sent, '-inf', fmt(now - window))
local future = redis.call('ZRANGEBYSCORE', sent, '(' .. fmt(now), '+inf')
if #future > 0 then
  for _, m in ipairs(future) do redis.call('ZADD', sent, fmt(now), m) end
  note = 'send times in the future count as now'
end
local count = redis.call('ZCARD', sent)
if count < limit then
  redis.call('ZADD', sent, fmt(now), ARGV[4])
  redis.call('PEXPIRE', sent, math.ceil(window * 1000) + 1000)
  return {1, '0', fmt(now), note}
end
local oldest = redis.call('ZRANGE', sent, count - limit, count - limit, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 0.001 then wait = 0.001 end
return {0, fmt(wait), fmt(now), note}
"""

# KEYS: blocked. ARGV: hold s (already clamped to [0, max block]), max block s. Returns the new end.
_BLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local hold, max_block = tonumber(ARGV[1]), tonumber(ARGV[2])
local until_ = now + hold
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == nil or current ~= current or current > now + max_block then current = 0 end
if until_ > current then
  redis.call('SET', KEYS[1], string.format('%.6f', until_), 'PX', math.ceil(hold * 1000) + 1000)
end
return string.format('%.6f', until_)
"""

# KEYS: sent. ARGV: window s. Returns how many sends the window holds, by Redis's clock.
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.6f', now - tonumber(ARGV[1])), '+inf')
"""


def redacted(url: str) -> str:
    """`scheme://host:port/db` of a Redis URL: what logs and errors may show (no user, no password)."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        return "(an unparsable URL)"
    return f"{parts.scheme}://{parts.hostname or '?'}:{port}{parts.path or ''}"


def check_url(url: str, conn_id: str, extra_name: str = URL_EXTRA) -> SplitResult:
    """The parts of a usable `rate_budget_url`, or `LightspeedConfigError` saying what is wrong."""

    def refuse(why: str) -> LightspeedConfigError:
        return LightspeedConfigError(
            f"Lightspeed connection '{conn_id}': extra {extra_name} ({redacted(url)}) {why}; "
            f"expected redis://[:password@]host:port/db or rediss://... (TLS)"
        )

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise refuse("is not a URL") from None
    if parts.scheme not in SCHEMES:
        raise refuse(f"has the scheme {parts.scheme or '(none)'!r}, not redis or rediss")
    if not parts.hostname:
        raise refuse("names no host")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise refuse("has a database that is not a number")
    if parts.query:
        raise refuse("has a query string (options are not taken from the URL)")
    return parts


def url_from_connection(redis_conn: Any, redis_conn_id: str) -> str:
    """The Redis URL of an Airflow connection (type redis): host, port, login, password; extras
    `db` (default 0) and `ssl` (true: `rediss://`). The password stays in that connection's
    password field, out of the Lightspeed connection's extras (which the UI shows in clear)."""
    extra = redis_conn.extra_dejson or {}
    ssl = str(extra.get("ssl", "")).strip().lower() in ("true", "1", "yes", "on")
    auth = ""
    if redis_conn.login or redis_conn.password:
        auth = f"{quote(redis_conn.login or '', safe='')}:{quote(redis_conn.password or '', safe='')}@"
    host = (redis_conn.host or "").strip()
    port = redis_conn.port or DEFAULT_PORT
    db = str(extra.get("db", 0)).strip()
    if not host:
        raise LightspeedConfigError(f"Redis connection '{redis_conn_id}' (the request budget's) has no host")
    return f"{'rediss' if ssl else 'redis'}://{auth}{host}:{port}/{db}"


class RedisRateBudget(RequestBudget):
    """The Redis backend of `RequestBudget` (see the module docstring).

    `conn_id` and `extra_name` name where the URL came from in error messages. `clock` (this
    host's epoch seconds) only turns `block_until(epoch)` into a hold length; the window itself runs
    on Redis's clock. `client` (a `redis.Redis`) is injectable; by default one is built from `url`.
    """

    def __init__(
        self,
        key: str,
        limit: int,
        window_seconds: float = WINDOW_SECONDS,
        *,
        url: str,
        conn_id: str = "lightspeed_default",
        extra_name: str = URL_EXTRA,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_wait_log_interval: float = 30.0,
        max_block_seconds: float = MAX_BLOCK_SECONDS,
        socket_timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        super().__init__(
            limit,
            window_seconds,
            sleep=sleep,
            max_wait_log_interval=max_wait_log_interval,
            max_block_seconds=max_block_seconds,
        )
        parts = check_url(url, conn_id, extra_name)
        self.key = key
        self.where = redacted(url)
        self.source = f"connection '{conn_id}', extra {extra_name}"
        self._password = unquote(parts.password) if parts.password else None
        digest = budget_digest(key)
        self.sent_key = f"{KEY_PREFIX}:{{{digest}}}:sent"
        self.blocked_key = f"{KEY_PREFIX}:{{{digest}}}:blocked"
        self._clock = clock
        self._redis = client or redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._block = self._redis.register_script(_BLOCK)
        self._count = self._redis.register_script(_COUNT)

    @classmethod
    def for_store(
        cls,
        base_url: str,
        registers: int = 1,
        *,
        url: str,
        conn_id: str = "lightspeed_default",
        extra_name: str = URL_EXTRA,
        reserve: int | None = None,
        window_seconds: float = WINDOW_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RedisRateBudget:
        """The budget of one store (keyed by its API base URL), sized as the file backend's."""
        return cls(
            base_url.rstrip("/"),
            budget_limit(registers, reserve),
            window_seconds,
            url=url,
            conn_id=conn_id,
            extra_name=extra_name,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return (
            f"RedisRateBudget(limit={self.limit}, window_seconds={self.window_seconds}, "
            f"redis={self.where!r}, key={self.sent_key!r})"
        )

    # -- the interface ---------------------------------------------------------------------------

    def block_until(self, until: float) -> None:
        """Hold every host back until `until` (this host's epoch), as a hold length on Redis's clock."""
        hold = float(until) - self._clock()
        if math.isnan(hold) or hold <= 0:
            return
        hold = min(hold, self.max_block_seconds)
        self._run(self._block, [self.blocked_key], [_num(hold), _num(self.max_block_seconds)])

    def in_window(self) -> int:
        return int(self._run(self._count, [self.sent_key], [_num(self.window_seconds)]))

    # -- internals ------------------------------------------------------------------------------

    def _try_take(self) -> float:
        member = uuid.uuid4().hex
        args = [str(self.limit), _num(self.window_seconds), _num(self.max_block_seconds), member]
        reply = self._run(self._acquire, [self.sent_key, self.blocked_key], args)
        taken, wait, now, note = (_text(x) for x in reply)
        if note:
            log.warning("Lightspeed request budget in Redis %s (key %s): %s", self.where, self.sent_key, note)
        if taken == "1":
            self.last_taken = float(now)
            return 0.0
        return max(float(wait), 0.001)

    def _run(self, script: Any, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run one script; every Redis failure becomes `RateBudgetUnavailable` (nothing was sent)."""
        try:
            return script(keys=list(keys), args=list(args))
        except redis.exceptions.RedisError as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if self._password:
                problem = problem.replace(self._password, "***")
            log.error("Lightspeed request budget in Redis %s unusable (%s)", self.where, self.source)
        raise RateBudgetUnavailable(
            f"Lightspeed request budget in Redis {self.where} ({self.source}) cannot be used: {problem}. "
            f"No request was sent unbudgeted; start or fix that Redis server, or correct the extra"
        )


def _num(value: float) -> str:
    return f"{value:.6f}"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
