"""The one Lightspeed Retail X-Series API 2.0 client every task uses: `LightspeedClient`.

This module is the client's API: building it from the Airflow connection, the version-cursor
walk, and the customer / customer-group calls the pipeline makes. How one request is sent (retries,
429, pacing, budget, counters, Decimal JSON) lives in `lightspeed_http.HttpTransport`, the
client's base class; the errors live in `lightspeed_errors` and are re-exported here, so callers
import everything they catch from this module.

Why a plain `requests.Session` and not providers-http's `HttpHook`: `HttpHook.run()` with its
default `check_response=True` raises `AirflowException("429:...")` and drops the response, so the
`Retry-After` and `X-RateLimit-*` headers this client lives on are lost; it sends the connection
password only as Basic auth (a bearer token has to be added by hand); its default method is POST;
and importing it costs about 3 s. So the client takes the Airflow *Connection* (host, password,
extras) and does its own HTTP. That keeps the module importable without Airflow (stdlib + requests
only) and unit-testable with `requests_mock`; Airflow is imported lazily in `from_connection`.

What it guarantees (docs/contracts.md, "The client"; API doc "Decisions for this project"):
- bearer auth; the token (stripped, refused with whitespace or control characters inside) is never
  logged, never in `repr`, never in an error message; it is never sent over plain http unless the
  connection opts in with the extra `allow_insecure_http: true` (a local test server);
  response bodies (customer PII) are never logged: errors name method, path and status only;
- version-cursor pagination (`iter_pages`) that stops only on an explicit empty `data` page; a
  2xx that is not the endpoint's envelope (a `200 {"error": ...}` from a gateway) is a
  `LightspeedProtocolError`, retried like a 5xx, never read as "the end"; a feed that does not
  advance honestly (cursor stuck or creeping, the same records again, past `max_pages`) raises
  `LightspeedFeedError`;
- a socket timeout and a wall-clock deadline on every attempt; bounded retries with jittered
  exponential backoff on 5xx, timeouts and connection errors; 429 waits until `Retry-After`
  (HTTP-date or seconds), capped; pacing when `X-RateLimit-Remaining` runs low; an optional
  shared `RequestBudget` (a file per host, or Redis across hosts);
- JSON numbers are `Decimal` both ways: money never passes through a binary float.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from include.tier_sync.lightspeed_errors import (
    LightspeedAuthError,
    LightspeedClientError,
    LightspeedConfigError,
    LightspeedError,
    LightspeedFeedError,
    LightspeedNotFound,
    LightspeedProtocolError,
    LightspeedRateLimited,
    LightspeedTimeout,
    LightspeedUnavailable,
)
from include.tier_sync.lightspeed_http import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_REQUEST_DEADLINE,
    DEFAULT_TIMEOUT,
    LOW_REMAINING_FRACTION,
    MAX_RETRY_AFTER,
    HttpTransport,
    check_base_url,
    int_or_none,
)
from include.tier_sync.rate_budget import WINDOW_SECONDS, RequestBudget, budget_for_connection

if TYPE_CHECKING:
    import requests
    from airflow.sdk import Connection

__all__ = [
    "DEFAULT_CONN_ID",
    "LightspeedAuthError",
    "LightspeedClient",
    "LightspeedClientError",
    "LightspeedConfigError",
    "LightspeedError",
    "LightspeedFeedError",
    "LightspeedNotFound",
    "LightspeedProtocolError",
    "LightspeedRateLimited",
    "LightspeedTimeout",
    "LightspeedUnavailable",
    "Page",
    "resolve_base_url",
]

log = logging.getLogger(__name__)

API_PATH = "/api/2.0"
DEFAULT_CONN_ID = "lightspeed_default"
DEFAULT_PAGE_SIZE = 1000
DEFAULT_MAX_PAGES = 100_000  # 100 M records at 1000 a page: beyond that a feed is looping, not long
MAX_GROUP_BATCH = 100
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


# -- value types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One page of a version-cursor list. `version_max` is the cursor to resume after it.

    Field order keeps `Page(data, version_max)` of docs/contracts.md; `version_min` is extra.
    """

    data: list[dict[str, Any]]
    version_max: int | None
    version_min: int | None = None


# -- reading the connection ----------------------------------------------------------------------


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


def parse_flag(value: Any, name: str, conn_id: str) -> bool:
    """A yes/no connection extra (JSON bool or the usual strings); anything else is refused."""
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LightspeedConfigError(f"Lightspeed connection '{conn_id}': extra {name} must be true or false")


def describe(body: Any) -> str:
    """A body's JSON type in a few words: what an error may say about it (never its content)."""
    if body is None:
        return "empty or null"
    if isinstance(body, bool):
        return f"JSON {str(body).lower()}"
    if isinstance(body, Mapping):
        return "a JSON object"
    if isinstance(body, list):
        return "a JSON array"
    if isinstance(body, str):
        return "a JSON string"
    return "a JSON number"


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


# -- the client ------------------------------------------------------------------------------------


class LightspeedClient(HttpTransport):
    """Lightspeed X-Series API 2.0 client. Build it inside a task with `from_connection`.

    `budget`: the shared `RequestBudget`; `from_connection` always attaches one (sized from the
    `registers` extra; in Redis when the extra `rate_budget_url` is set). Built directly with `budget=None` there is no client-side budget, only the
    server-header pacing and 429 handling (convenient for tests against a local simulator).
    `sleep`, `clock` and `rng` are injectable so tests never really wait. `clock` is epoch seconds.
    Sending (retries, 429, pacing, `stats`) is inherited from `lightspeed_http.HttpTransport`.
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
        budget: RequestBudget | None = None,
        *,
        max_rate_limit_waits: int | None = None,
        max_retry_after: float = MAX_RETRY_AFTER,
        rate_window_seconds: float = WINDOW_SECONDS,
        low_remaining_fraction: float = LOW_REMAINING_FRACTION,
        backoff_base: float = 1.0,
        request_deadline_seconds: float = DEFAULT_REQUEST_DEADLINE,
        allow_insecure_http: bool = False,
        max_pages: int = DEFAULT_MAX_PAGES,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__(
            base_url,
            token,
            conn_id=conn_id,
            timeout=timeout,
            max_retries=max_retries,
            registers=registers,
            budget=budget,
            max_rate_limit_waits=max_rate_limit_waits,
            max_retry_after=max_retry_after,
            rate_window_seconds=rate_window_seconds,
            low_remaining_fraction=low_remaining_fraction,
            backoff_base=backoff_base,
            request_deadline_seconds=request_deadline_seconds,
            allow_insecure_http=allow_insecure_http,
            sleep=sleep,
            clock=clock,
            rng=rng,
            session=session,
        )
        self.page_size = max(1, int(page_size))
        self.max_pages = int(max_pages)
        if self.max_pages < 1:
            raise LightspeedConfigError(f"Lightspeed connection '{conn_id}': max_pages must be >= 1")

    def __repr__(self) -> str:
        return f"LightspeedClient(base_url={self.base_url!r}, conn_id={self.conn_id!r})"

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
        `max_retries`, `rate_budget_dir`, `rate_budget_url` / `rate_budget_redis_conn_id`,
        `request_deadline_seconds`, `max_pages`,
        `allow_insecure_http` (plain http, e.g. to the simulator: testing only).
        `overrides` go to the constructor (tests, tuning); the budget's window is the client's
        `rate_window_seconds` (the server's window: 300 s unless overridden).
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
            "request_deadline_seconds": _coerce(
                extra.get("request_deadline_seconds"), DEFAULT_REQUEST_DEADLINE, float
            ),
            "max_pages": _coerce(extra.get("max_pages"), DEFAULT_MAX_PAGES, int),
            "allow_insecure_http": parse_flag(
                extra.get("allow_insecure_http"), "allow_insecure_http", conn_id
            ),
        }
        kwargs.update(overrides)
        # Refuse an unsafe URL before anything (the budget file included) is made for it.
        check_base_url(base_url, conn_id, allow_insecure_http=bool(kwargs["allow_insecure_http"]))
        if kwargs.get("budget") is None:
            window = float(kwargs.get("rate_window_seconds", WINDOW_SECONDS))
            kwargs["budget"] = budget_for_connection(
                conn_id, base_url, registers, extra, window_seconds=window, get_connection=_get_connection
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

        Stops only on an explicit empty `data` page (a short page is not the end); a body that is not
        a page is retried and then raises `LightspeedProtocolError`. When a page has no
        `version.max`, the cursor is the highest record `version`. A feed that does not advance
        honestly would loop for ever or feed the same rows again, so `_check_progress` raises.
        """
        cursor = int(after or 0)
        size = int(page_size or self.page_size)
        pages = 0
        previous: frozenset[tuple[str, int | None]] = frozenset()
        while True:
            query = dict(params or {})
            query["after"] = cursor
            query["page_size"] = size
            body = self._request("GET", path, params=query, expect=_expect_page)
            if not body["data"]:
                log.debug("Lightspeed GET %s: end after %d pages, cursor %s", path, pages, cursor)
                return
            page = _page_of(body)
            keys = frozenset((str(r.get("id")), int_or_none(r.get("version"))) for r in page.data)
            self._check_progress(path, cursor, page, pages, repeated=keys <= previous)
            pages += 1
            yield page
            previous = keys
            assert page.version_max is not None  # _page_of guarantees it
            cursor = page.version_max

    def _check_progress(self, path: str, cursor: int, page: Page, pages: int, *, repeated: bool) -> None:
        """Raise `LightspeedFeedError` unless this page moves the feed forward.

        `after` is exclusive, so an honest page is past the cursor: its `version.max` is above it, at
        least one record is newer than it, and it is not the previous page again. A feed that creeps
        (the cursor up by one, the same rows back) fails on its second page; `max_pages` bounds the rest.
        """
        assert page.version_max is not None
        newest = max(
            (v for v in (int_or_none(r.get("version")) for r in page.data) if v is not None), default=None
        )
        if page.version_max <= cursor:
            why = f"the cursor did not advance (version.max={page.version_max})"
        elif newest is not None and newest <= cursor:
            why = f"no record is newer than the cursor (newest version {newest}): `after` is not honoured"
        elif repeated:
            why = "the same records as the previous page came back"
        elif pages >= self.max_pages:
            why = f"more than max_pages={self.max_pages} pages"
        else:
            return
        log.error("Lightspeed GET %s: feed misbehaves at after=%d (page %d)", path, cursor, pages + 1)
        raise LightspeedFeedError(
            f"Lightspeed GET {path} on connection '{self.conn_id}': {why} at after={cursor} "
            f"(page {pages + 1}); refusing to loop on a misbehaving feed",
            200,
            method="GET",
            path=path,
        )

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
                created = self._request(
                    "POST", "/customer_groups", json_body=body, idempotent=False, expect=_expect_record()
                )
                return _data_object(created)
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
                "POST",
                f"/customer_groups/{_seg(group_id)}/customers",
                json_body={"customer_ids": ids},
                expect=_expect_ack,
            )

    def remove_customers_from_group(self, group_id: str, ids: Sequence[str]) -> None:
        """Unlink up to 100 customers from a group (DELETE with a JSON body). Idempotent; retried."""
        ids = _check_batch(ids)
        if ids:
            self._request(
                "DELETE",
                f"/customer_groups/{_seg(group_id)}/customers",
                json_body={"customer_ids": ids},
                expect=_expect_ack,
            )

    def get_customer_group(self, group_id: str) -> dict[str, Any]:
        """One group, also a soft-deleted one (`deleted_at` set); `LightspeedNotFound` on 404."""
        path = f"/customer_groups/{_seg(group_id)}"
        return _data_object(self._request("GET", path, expect=_expect_record(str(group_id))))

    def get_customer(self, customer_id: str) -> dict[str, Any]:
        """One customer (`LightspeedNotFound` on 404)."""
        path = f"/customers/{_seg(customer_id)}"
        return _data_object(self._request("GET", path, expect=_expect_record(str(customer_id))))

    def put_customer(self, customer_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Write a whole customer back (GET, change, PUT: right under merge and replace semantics).

        Idempotent (the same body yields the same state), so it is retried like a read.
        """
        path = f"/customers/{_seg(customer_id)}"
        result = self._request("PUT", path, json_body=dict(body), expect=_expect_record(str(customer_id)))
        return _data_object(result)


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


# -- the envelopes a 2xx must have (API doc §3, §10): each names what is wrong, None when fine ------


def _expect_page(body: Any) -> str | None:
    """A cursor page: an object whose `data` is a list of records; a non-empty one needs a version
    (`version.max`, or record versions). An explicit `data: []` is the end, whatever `version` says."""
    if not isinstance(body, Mapping):
        return f"the body is {describe(body)}, not a page object"
    if "data" not in body:
        return "the page has no `data` (a JSON object without it)"
    data = body["data"]
    if not isinstance(data, list):
        return f"`data` is {describe(data)}, not a list"
    if not data:
        return None
    bad = next((i for i, r in enumerate(data) if not isinstance(r, Mapping)), None)
    if bad is not None:
        return f"`data` item {bad} is {describe(data[bad])}, not a record"
    version = body.get("version")
    if version is not None and not isinstance(version, Mapping):
        return f"`version` is {describe(version)}, not an object"
    for key in ("min", "max"):
        value = (version or {}).get(key)
        if value is not None and int_or_none(value) is None:
            return f"`version.{key}` is {describe(value)}, not an integer"
    if int_or_none((version or {}).get("max")) is None and all(
        int_or_none(r.get("version")) is None for r in data
    ):
        return "a non-empty page carries no version (neither `version.max` nor record versions)"
    return None


def _page_of(body: Mapping[str, Any]) -> Page:
    """The `Page` of a checked non-empty page body; the cursor falls back to the record versions."""
    data = list(body["data"])
    version = body.get("version") or {}
    record_versions = [v for v in (int_or_none(r.get("version")) for r in data) if v is not None]
    vmax = int_or_none(version.get("max"))
    vmin = int_or_none(version.get("min"))
    return Page(
        data=data,
        version_max=vmax if vmax is not None else max(record_versions),
        version_min=vmin if vmin is not None else min(record_versions, default=None),
    )


def _expect_record(record_id: str | None = None) -> Callable[[Any], str | None]:
    """One record: `{"data": {...}}`, or a bare object that is a record (has an `id`, API doc §10),
    never an error object; with `record_id`, the record must be that one."""

    def check(body: Any) -> str | None:
        if not isinstance(body, Mapping):
            return f"the body is {describe(body)}, not an object"
        inner = body.get("data", body)
        if not isinstance(inner, Mapping):
            return f"`data` is {describe(inner)}, not a record"
        if inner.get("id") is None:
            return (
                "the record has no `id`"
                if "data" in body
                else "the body has neither `data` nor a record `id`"
            )
        if record_id is not None and str(inner["id"]) != record_id:
            return "the record's `id` is not the one asked for"
        return None

    return check


def _expect_ack(body: Any) -> str | None:
    """A membership call: any 2xx body is success (API doc Decision 4), except one that says it is not:
    `false`, or an object carrying `error` / `errors`."""
    if body is False:
        return "the body is JSON false, not an acknowledgement"
    if isinstance(body, Mapping) and ("error" in body or "errors" in body):
        return "the body is an error object, not an acknowledgement"
    return None


def _data_object(body: Any) -> dict[str, Any]:
    """`{"data": {...}}` -> the object (a bare record as it is); the shape was checked by `expect`."""
    inner = body.get("data", body)
    return dict(inner)


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
            if current is None or (int_or_none(record.get("version")) or -1) >= (
                int_or_none(current.get("version")) or -1
            ):
                best[key] = record
    return list(best.values())
