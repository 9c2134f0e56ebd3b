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
- bearer auth; the token is never logged, never in `repr`, never in an error message; response
  bodies (customer PII) are never logged: errors log method, path and status only;
- version-cursor pagination (`iter_pages`) that stops only on an empty `data` page;
- explicit timeouts on every request; bounded retries with jittered exponential backoff on 5xx,
  timeouts and connection errors; 429 waits until `Retry-After` (HTTP-date or seconds), capped;
  pacing when `X-RateLimit-Remaining` runs low; an optional process-shared `RateBudget`;
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
    LightspeedError,
    LightspeedNotFound,
    LightspeedUnavailable,
)
from include.tier_sync.lightspeed_http import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    LOW_REMAINING_FRACTION,
    MAX_RETRY_AFTER,
    HttpTransport,
    int_or_none,
)
from include.tier_sync.rate_budget import WINDOW_SECONDS, RateBudget

if TYPE_CHECKING:
    import requests
    from airflow.sdk import Connection

__all__ = [
    "DEFAULT_CONN_ID",
    "LightspeedAuthError",
    "LightspeedClient",
    "LightspeedClientError",
    "LightspeedError",
    "LightspeedNotFound",
    "LightspeedUnavailable",
    "Page",
    "resolve_base_url",
]

log = logging.getLogger(__name__)

API_PATH = "/api/2.0"
DEFAULT_CONN_ID = "lightspeed_default"
DEFAULT_PAGE_SIZE = 1000
MAX_GROUP_BATCH = 100


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

    `budget`: the shared `RateBudget`; `from_connection` always attaches one (sized from the
    `registers` extra). Built directly with `budget=None` there is no client-side budget, only the
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
            sleep=sleep,
            clock=clock,
            rng=rng,
            session=session,
        )
        self.page_size = max(1, int(page_size))

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
                for v in (int_or_none(r.get("version")) for r in data if isinstance(r, Mapping))
                if v is not None
            ]
            vmax = int_or_none(version.get("max"))
            if vmax is None and record_versions:
                vmax = max(record_versions)
            vmin = int_or_none(version.get("min"))
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
            if current is None or (int_or_none(record.get("version")) or -1) >= (
                int_or_none(current.get("version")) or -1
            ):
                best[key] = record
    return list(best.values())
