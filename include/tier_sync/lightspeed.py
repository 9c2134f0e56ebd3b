"""The one Lightspeed Retail X-Series API 2.0 client every task uses.

Why a plain `requests.Session` and not providers-http's `HttpHook`: `HttpHook.run()` with its
default `check_response=True` raises `AirflowException("429:...")` and drops the response, so the
`Retry-After` and `X-RateLimit-*` headers this client lives on are lost; it sends the connection
password only as Basic auth (a bearer token has to be added by hand); its default method is POST;
and importing it costs about 3 s. So the client takes the Airflow *Connection* (host, password,
extras) and does its own HTTP. That keeps the module importable without Airflow (stdlib + requests
only) and unit-testable with `requests_mock`; Airflow is imported lazily in `from_connection`.

What it guarantees (docs/contracts.md, "The client"; API doc "Decisions for this project"):
- bearer auth; the token is never logged, never in `repr`, never in an error message; response
  bodies (customer PII) are never logged: errors log method, path and status only;
- version-cursor pagination (`iter_pages`) that stops only on an empty `data` page;
- explicit timeouts on every request; bounded retries with jittered exponential backoff on 5xx,
  timeouts and connection errors; 429 waits until `Retry-After` (HTTP-date or seconds), capped;
  pacing when `X-RateLimit-Remaining` runs low; an optional process-shared `RateBudget`;
- JSON numbers are `Decimal` both ways: money never passes through a binary float.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import requests

from include.tier_sync.rate_budget import WINDOW_SECONDS, RateBudget, store_limit

if TYPE_CHECKING:
    from airflow.sdk import Connection

log = logging.getLogger(__name__)

API_PATH = "/api/2.0"
DEFAULT_CONN_ID = "lightspeed_default"
DEFAULT_PAGE_SIZE = 1000
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 5
MAX_GROUP_BATCH = 100
MAX_RETRY_AFTER = 360.0  # one 5-minute window plus slack; a longer Retry-After is not believed
MAX_BACKOFF = 60.0
LOW_REMAINING_FRACTION = 0.05  # pace once fewer than 5 % of the window's requests are left
MAX_PACING_PAUSE = 30.0

_RETRYABLE_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)


# -- errors ----------------------------------------------------------------------------------------


class LightspeedError(Exception):
    """Base of every error this client raises."""


class LightspeedAuthError(LightspeedError):
    """401/403: the token is wrong, expired or lacks a scope. Never retried: retrying cannot help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LightspeedNotFound(LightspeedError):
    """404: the record does not exist (a single customer: report it and go on)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


class LightspeedClientError(LightspeedError):
    """Any other 4xx (not 429): the request itself was refused; retrying the same request cannot help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LightspeedUnavailable(LightspeedError):
    """5xx, network errors, timeouts or 429 that outlasted the bounded retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- value types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One page of a version-cursor list. `version_max` is the cursor to resume after it.

    Field order keeps `Page(data, version_max)` of docs/contracts.md; `version_min` is extra.
    """

    data: list[dict[str, Any]]
    version_max: int | None
    version_min: int | None = None


@dataclass
class ApiStats:
    """Counts for the run report: every HTTP attempt, every 429 received, every re-send."""

    requests: int = 0
    rate_limited: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "rate_limited": self.rate_limited, "retries": self.retries}


@dataclass
class _Pacer:
    """When the server says few requests are left, spread the rest instead of running into 429."""

    not_before: float = 0.0
    last_remaining: int | None = None
    last_limit: int | None = None
    pauses: list[float] = field(default_factory=list)


# -- JSON helpers ----------------------------------------------------------------------------------


def _loads(raw: bytes) -> Any:
    """Parse a JSON body with Decimal floats; an empty body is None."""
    if not raw or not raw.strip():
        return None
    return json.loads(raw, parse_float=Decimal)


def dumps_exact(body: Any) -> str:
    """JSON-encode `body`, writing each Decimal as the exact number it holds (never via float).

    `json` cannot emit a Decimal as a bare number, so each one is swapped for a unique string token,
    encoded, and the quoted token replaced by the Decimal's own text.
    """
    salt = uuid.uuid4().hex
    numbers: dict[str, str] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, Decimal):
            if not value.is_finite():
                raise ValueError(f"cannot send a non-finite number: {value}")
            token = f"__dec_{salt}_{len(numbers)}__"
            numbers[token] = str(value)
            return token
        if isinstance(value, Mapping):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(body), separators=(",", ":"))
    for token, number in numbers.items():
        text = text.replace(f'"{token}"', number)
    return text


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_N = TypeVar("_N", int, float)


def _coerce(value: Any, default: _N, cast: Callable[[str], _N]) -> _N:
    """Connection extras may arrive as strings ("2"); fall back to the default on junk."""
    if value is None or value == "":
        return default
    try:
        return cast(str(value).strip())
    except ValueError:
        log.warning("Ignoring a non-numeric Lightspeed connection setting; using %s", default)
        return default


def resolve_base_url(
    host: str | None,
    *,
    domain_prefix: str | None = None,
    port: int | None = None,
    schema: str | None = None,
) -> str:
    """API base URL from a connection: host with a scheme as-is; else `domain_prefix`; else host[:port].

    A bare host gets `https` (or the connection's `schema` when that is http/https) and `/api/2.0`.
    """
    host = (host or "").strip()
    if "://" in host:
        return host.rstrip("/")
    if not host and domain_prefix:
        return f"https://{domain_prefix.strip()}.retail.lightspeed.app{API_PATH}"
    if not host:
        raise LightspeedError("Lightspeed connection has neither a host nor a domain_prefix extra")
    scheme = schema if schema in ("http", "https") else "https"
    host = host.rstrip("/")
    netloc, _, path = host.partition("/")
    if port:
        netloc = f"{netloc}:{port}"
    path = f"/{path}" if path else API_PATH
    return f"{scheme}://{netloc}{path}".rstrip("/")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP-date. None when unusable."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


# -- the client ------------------------------------------------------------------------------------


class LightspeedClient:
    """Lightspeed X-Series API 2.0 client. Build it inside a task with `from_connection`.

    `budget`: the shared `RateBudget`; `from_connection` always attaches one (sized from the
    `registers` extra). Built directly with `budget=None` there is no client-side budget, only the
    server-header pacing and 429 handling (convenient for tests against a local simulator).
    `sleep`, `clock` and `rng` are injectable so tests never really wait. `clock` is epoch seconds.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        conn_id: str = DEFAULT_CONN_ID,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        registers: int = 1,
        budget: RateBudget | None = None,
        *,
        max_rate_limit_waits: int | None = None,
        max_retry_after: float = MAX_RETRY_AFTER,
        rate_window_seconds: float = WINDOW_SECONDS,
        low_remaining_fraction: float = LOW_REMAINING_FRACTION,
        backoff_base: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if not token:
            raise LightspeedAuthError(
                f"Lightspeed connection '{conn_id}' has no token: set its password to a personal token",
                status=401,
            )
        self.base_url = base_url.rstrip("/")
        self.conn_id = conn_id
        self.page_size = max(1, int(page_size))
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        # 429s are the server asking us to wait, not a failure: allow a few more of them.
        self.max_rate_limit_waits = (
            max(self.max_retries, 8) if max_rate_limit_waits is None else max(0, max_rate_limit_waits)
        )
        self.max_retry_after = float(max_retry_after)
        # The server's window (5 min on X-Series; short in simulator tests) and when to start pacing
        # (0 turns header pacing off).
        self.rate_window_seconds = float(rate_window_seconds)
        self.low_remaining_fraction = max(0.0, float(low_remaining_fraction))
        self.backoff_base = float(backoff_base)
        self.registers = max(1, int(registers))
        self.budget = budget
        self.stats = ApiStats()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._pacer = _Pacer()
        self._session = session or requests.Session()
        self._session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "customer-tier-sync/0.1 (python-requests)",
            }
        )

    def __repr__(self) -> str:
        return f"LightspeedClient(base_url={self.base_url!r}, conn_id={self.conn_id!r})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> LightspeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- construction from Airflow ------------------------------------------------------------------

    @classmethod
    def from_connection(cls, conn_id: str = DEFAULT_CONN_ID, **overrides: Any) -> LightspeedClient:
        """Build the client from an Airflow connection (call inside tasks, never at parse time).

        host = API base URL (or empty + extra `domain_prefix`), password = personal token. Extras,
        all optional, strings accepted: `domain_prefix`, `registers`, `page_size`, `timeout`,
        `max_retries`, `rate_budget_dir`. `overrides` go to the constructor (tests, tuning).
        """
        conn = _get_connection(conn_id)
        extra = conn.extra_dejson or {}
        base_url = resolve_base_url(
            conn.host,
            domain_prefix=extra.get("domain_prefix") or None,
            port=conn.port,
            schema=conn.schema,
        )
        registers = max(1, _coerce(extra.get("registers"), 1, int))
        kwargs: dict[str, Any] = {
            "conn_id": conn_id,
            "page_size": max(1, _coerce(extra.get("page_size"), DEFAULT_PAGE_SIZE, int)),
            "timeout": _coerce(extra.get("timeout"), DEFAULT_TIMEOUT, float),
            "max_retries": max(0, _coerce(extra.get("max_retries"), DEFAULT_MAX_RETRIES, int)),
            "registers": registers,
        }
        kwargs.update(overrides)
        if kwargs.get("budget") is None:
            kwargs["budget"] = RateBudget.for_store(
                base_url, registers, directory=extra.get("rate_budget_dir") or None
            )
        return cls(base_url, conn.password or "", **kwargs)

    # -- the calls the pipeline needs ----------------------------------------------------------------

    def iter_pages(
        self,
        path: str,
        after: int = 0,
        page_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[Page]:
        """Walk a version-cursor list from `after` (exclusive), one `Page` at a time.

        Stops only on an empty `data` page (a short page is not the end). When a page has no
        `version.max`, the cursor is the highest record `version`. A server whose cursor does not
        advance would loop forever, so that raises instead.
        """
        cursor = int(after or 0)
        size = int(page_size or self.page_size)
        pages = 0
        while True:
            query = dict(params or {})
            query["after"] = cursor
            query["page_size"] = size
            body = self._request("GET", path, params=query)
            data = body.get("data") if isinstance(body, Mapping) else None
            if data is None:
                data = []
            if not isinstance(data, list):
                raise LightspeedError(
                    f"Lightspeed GET {path}: `data` is not a list (connection '{self.conn_id}')"
                )
            if not data:
                log.debug("Lightspeed GET %s: end after %d pages, cursor %s", path, pages, cursor)
                return
            version = body.get("version") if isinstance(body, Mapping) else None
            version = version if isinstance(version, Mapping) else {}
            record_versions = [
                v
                for v in (_int_or_none(r.get("version")) for r in data if isinstance(r, Mapping))
                if v is not None
            ]
            vmax = _int_or_none(version.get("max"))
            if vmax is None and record_versions:
                vmax = max(record_versions)
            vmin = _int_or_none(version.get("min"))
            if vmin is None and record_versions:
                vmin = min(record_versions)
            if vmax is None:
                raise LightspeedError(
                    f"Lightspeed GET {path}: a non-empty page carries no version; cannot continue the cursor"
                )
            if vmax <= cursor:
                raise LightspeedError(
                    f"Lightspeed GET {path}: cursor did not advance (after={cursor}, version.max={vmax}); "
                    "refusing to loop"
                )
            pages += 1
            yield Page(data=data, version_max=vmax, version_min=vmin)
            cursor = vmax

    def iter_sales(self, after: int = 0, page_size: int | None = None) -> Iterator[Page]:
        """The sales feed (deleted sales may be included: honour `deleted_at`)."""
        return self.iter_pages("/sales", after=after, page_size=page_size)

    def iter_customers(self, after: int = 0, page_size: int | None = None) -> Iterator[Page]:
        """The customer feed."""
        return self.iter_pages("/customers", after=after, page_size=page_size)

    def list_customer_groups(self) -> list[dict[str, Any]]:
        """Every live customer group, newest version of each id (deleted groups left out)."""
        groups = _latest_by_id(page.data for page in self.iter_pages("/customer_groups"))
        return [g for g in groups if not g.get("deleted_at")]

    def create_customer_group(self, name: str, group_id: str | None = None) -> dict[str, Any]:
        """Create a group. Not idempotent, so an ambiguous failure (5xx, lost response) is followed by
        a look for a group of that name before trying again: one call never makes two groups."""
        body: dict[str, Any] = {"name": name}
        if group_id:
            body["group_id"] = group_id
        last: LightspeedUnavailable | None = None
        for attempt in range(self.max_retries + 1):
            try:
                created = self._request("POST", "/customer_groups", json_body=body, idempotent=False)
                return _data_object(created, "POST /customer_groups")
            except LightspeedUnavailable as exc:
                last = exc
                existing = [g for g in self.list_customer_groups() if g.get("name") == name]
                if existing:
                    log.info("Lightspeed POST /customer_groups: found the group after an ambiguous failure")
                    return existing[0]
                if attempt < self.max_retries:
                    self.stats.retries += 1
                    self._sleep(self._backoff(attempt))
        assert last is not None
        raise last

    def list_group_members(self, group_id: str) -> list[dict[str, Any]]:
        """The live customers of a group, newest version of each id.

        A customer whose newest version names another group (moved while we paged) or is deleted
        is left out, so the result is the group as it stands.
        """
        path = f"/customer_groups/{_seg(group_id)}/customers"
        members = _latest_by_id(page.data for page in self.iter_pages(path))
        return [
            c for c in members if not c.get("deleted_at") and c.get("customer_group_id") in (None, group_id)
        ]

    def add_customers_to_group(self, group_id: str, ids: Sequence[str]) -> None:
        """Move up to 100 customers into a group (one group per customer, so adding moves them).

        Any 2xx body (`true`, `{}`, empty) is success. Idempotent (re-adding yields the same state),
        so it is retried like a read. A 4xx other than 429 raises `LightspeedClientError`; the
        per-customer PUT fallback belongs to the sync module.
        """
        ids = _check_batch(ids)
        if ids:
            self._request(
                "POST", f"/customer_groups/{_seg(group_id)}/customers", json_body={"customer_ids": ids}
            )

    def remove_customers_from_group(self, group_id: str, ids: Sequence[str]) -> None:
        """Unlink up to 100 customers from a group (DELETE with a JSON body). Idempotent; retried."""
        ids = _check_batch(ids)
        if ids:
            self._request(
                "DELETE", f"/customer_groups/{_seg(group_id)}/customers", json_body={"customer_ids": ids}
            )

    def get_customer(self, customer_id: str) -> dict[str, Any]:
        """One customer (`LightspeedNotFound` on 404)."""
        return _data_object(self._request("GET", f"/customers/{_seg(customer_id)}"), "GET /customers/{id}")

    def put_customer(self, customer_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Write a whole customer back (GET, change, PUT: right under merge and replace semantics).

        Idempotent (the same body yields the same state), so it is retried like a read.
        """
        result = self._request("PUT", f"/customers/{_seg(customer_id)}", json_body=dict(body))
        return _data_object(result, "PUT /customers/{id}")

    # -- transport -----------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        idempotent: bool = True,
    ) -> Any:
        """Send one logical request with budget, pacing, timeouts and bounded retries; parsed JSON back."""
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        data = dumps_exact(json_body).encode("utf-8") if json_body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        failures = 0
        waits_429 = 0
        while True:
            self._wait_for_pacing()
            if self.budget is not None:
                self.budget.acquire()
            self.stats.requests += 1
            try:
                resp = self._session.request(
                    method, url, params=params, data=data, headers=headers, timeout=self.timeout
                )
            except _RETRYABLE_NETWORK_ERRORS as exc:
                # A non-idempotent write may have been applied before the error: its caller decides.
                failures = self._retry_transient(method, path, type(exc).__name__, failures, idempotent)
                continue

            status = resp.status_code
            self._observe_rate_headers(resp)
            if 200 <= status < 300:
                try:
                    return _loads(resp.content)
                except ValueError:
                    # A cut-off body: transient, like a 5xx.
                    failures = self._retry_transient(
                        method, path, f"{status} with an unreadable body", failures, idempotent, status
                    )
                    continue

            if status in (401, 403):
                log.error("Lightspeed %s %s -> %d", method, path, status)
                what = "rejected the token" if status == 401 else "refused access (missing scope?)"
                raise LightspeedAuthError(
                    f"Lightspeed {what} of connection '{self.conn_id}' ({status}) on {method} {path}: "
                    f"regenerate the personal token (Setup > Personal Tokens) and store it as the "
                    f"password of Airflow connection '{self.conn_id}'",
                    status=status,
                )
            if status == 404:
                log.info("Lightspeed %s %s -> 404", method, path)
                raise LightspeedNotFound(
                    f"Lightspeed {method} {path}: not found (connection '{self.conn_id}')", status=404
                )
            if status == 429:
                self.stats.rate_limited += 1
                wait = self._retry_after(resp, waits_429)
                if waits_429 >= self.max_rate_limit_waits:
                    log.error("Lightspeed %s %s -> 429 (after %d waits)", method, path, waits_429)
                    raise LightspeedUnavailable(
                        f"Lightspeed {method} {path}: still rate limited (429) on connection "
                        f"'{self.conn_id}' after {waits_429} waits",
                        status=429,
                    )
                waits_429 += 1
                log.warning(
                    "Lightspeed %s %s -> 429; waiting %.1f s (wait %d/%d)",
                    method,
                    path,
                    wait,
                    waits_429,
                    self.max_rate_limit_waits,
                )
                if self.budget is not None:
                    self.budget.block_until(self._clock() + wait)
                self.stats.retries += 1
                self._sleep(wait)
                continue
            if 400 <= status < 500:
                log.warning("Lightspeed %s %s -> %d", method, path, status)
                raise LightspeedClientError(
                    f"Lightspeed {method} {path} refused with {status} (connection '{self.conn_id}')",
                    status=status,
                )
            # 5xx (and anything unexpected, e.g. a 3xx we did not follow): transient.
            failures = self._retry_transient(method, path, str(status), failures, idempotent, status)

    def _retry_transient(
        self, method: str, path: str, what: str, failures: int, idempotent: bool, status: int | None = None
    ) -> int:
        """Back off before re-sending after a transient failure; raise once the retries are spent.

        Returns the new failure count. A non-idempotent request is never re-sent: it may have been
        applied, and only its caller can tell.
        """
        if failures >= self.max_retries or not idempotent:
            log.error("Lightspeed %s %s -> %s (after %d retries)", method, path, what, failures)
            raise LightspeedUnavailable(
                f"Lightspeed {method} {path} -> {what} on connection '{self.conn_id}' (after {failures} retries)",
                status=status,
            ) from None
        delay = self._backoff(failures)
        failures += 1
        log.warning("Lightspeed %s %s -> %s; retry %d/%d in %.1f s", method, path, what, failures, self.max_retries, delay)
        self.stats.retries += 1
        self._sleep(delay)
        return failures

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter (half fixed, half random) so parallel tasks spread out."""
        ceiling = min(MAX_BACKOFF, self.backoff_base * (2.0**failures))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _retry_after(self, resp: requests.Response, waits: int) -> float:
        """Seconds a 429 asks for: header, else a body `retry-after`, else backoff; capped."""
        now = self._clock()
        wait = parse_retry_after(resp.headers.get("Retry-After"), now)
        if wait is None:
            try:
                body = _loads(resp.content)
            except ValueError:
                body = None
            if isinstance(body, Mapping):
                for key in ("retry-after", "retry_after", "Retry-After"):
                    if body.get(key) is not None:
                        wait = parse_retry_after(str(body[key]), now)
                        if wait is not None:
                            break
        if wait is None:
            wait = self._backoff(waits)
        return min(wait, self.max_retry_after)

    def _observe_rate_headers(self, resp: requests.Response) -> None:
        """Read X-RateLimit-Limit/Remaining; when few are left, set a pause before the next send."""
        remaining = _int_or_none(resp.headers.get("X-RateLimit-Remaining"))
        limit = _int_or_none(resp.headers.get("X-RateLimit-Limit"))
        if remaining is None:
            return
        if limit is None or limit <= 0:
            limit = store_limit(self.registers)
        self._pacer.last_remaining, self._pacer.last_limit = remaining, limit
        if self.low_remaining_fraction <= 0:
            return
        threshold = max(1, int(limit * self.low_remaining_fraction))
        if remaining >= threshold:
            return
        # The server counts one window for every machine; spread what is left over the window, and
        # more slowly the closer we are to zero (one average interval per missing request).
        interval = self.rate_window_seconds / limit
        pause = min(MAX_PACING_PAUSE, interval * (threshold - remaining))
        self._pacer.not_before = max(self._pacer.not_before, self._clock() + pause)

    def _wait_for_pacing(self) -> None:
        pause = self._pacer.not_before - self._clock()
        if pause > 0:
            log.info(
                "Lightspeed rate limit nearly used up (remaining %s): pacing %.1f s",
                self._pacer.last_remaining,
                pause,
            )
            self._pacer.pauses.append(pause)
            self._sleep(pause)
            self._pacer.not_before = 0.0


# -- helpers ---------------------------------------------------------------------------------------


def _get_connection(conn_id: str) -> Connection:
    """The Airflow connection, via the Task SDK (works in tasks and, with env/secrets, outside)."""
    try:
        from airflow.sdk import BaseHook
    except ImportError:  # pragma: no cover - older layouts only
        from airflow.hooks.base import BaseHook  # type: ignore[no-redef,attr-defined]
    return BaseHook.get_connection(conn_id)


def _seg(value: str) -> str:
    """One URL path segment: an id can never inject a path."""
    return quote(str(value), safe="")


def _check_batch(ids: Sequence[str] | Iterable[str]) -> list[str]:
    ids = [str(i) for i in ids]
    if len(ids) > MAX_GROUP_BATCH:
        raise ValueError(f"at most {MAX_GROUP_BATCH} customer ids per membership call, got {len(ids)}")
    return ids


def _data_object(body: Any, what: str) -> dict[str, Any]:
    """`{"data": {...}}` -> the object; tolerate a bare object too."""
    if isinstance(body, Mapping):
        inner = body.get("data", body)
        if isinstance(inner, Mapping):
            return dict(inner)
    raise LightspeedError(f"Lightspeed {what}: unexpected response shape")


def _latest_by_id(pages: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Records seen across pages, keeping the highest `version` of each id (first-seen order)."""
    best: dict[str, dict[str, Any]] = {}
    for data in pages:
        for record in data:
            rid = record.get("id")
            if rid is None:
                continue
            key = str(rid)
            current = best.get(key)
            if current is None or (_int_or_none(record.get("version")) or -1) >= (
                _int_or_none(current.get("version")) or -1
            ):
                best[key] = record
    return list(best.values())
