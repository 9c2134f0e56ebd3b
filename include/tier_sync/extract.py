"""`extract_orders`: the Lightspeed change feeds (sales, customers) -> the order store, cursor-safe.

Why it is safe to crash and re-run at any point: rows are committed to the store together with
the cursor of the last page they came from (one manifest write), every `commit_every_pages` pages
and at the end. A crash loses only pages read since the last commit; the next run starts from the
committed cursor and reads them again. Reading a page twice is harmless because the store keeps
one row per (id, version).

Why a feed that does not move forward is an error here too (the client already refuses one): the
cursor stored with the rows is the only thing that says what has been read, so a page that does
not take it past where it was would store rows under a cursor that promises nothing new, and a
feed repeating itself would fill the store for ever. The error names the resource and the cursor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from include.tier_sync.lightspeed_errors import LightspeedFeedError
from include.tier_sync.store import CUSTOMERS, ROW_CONVERTERS, SALES, OrderStore

log = logging.getLogger(__name__)

PROGRESS_EVERY_PAGES = 10
DEFAULT_COMMIT_EVERY_PAGES = 20
DEFAULT_COMPACT_ABOVE_SEGMENTS = 50

# /sales may return deleted sales unasked; /customers needs `deleted` so deletions reach the store.
FEEDS: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    (SALES, "/sales", {}),
    (CUSTOMERS, "/customers", {"deleted": "true"}),
)


class _Page(Protocol):
    @property
    def data(self) -> list[dict[str, Any]]: ...

    @property
    def version_max(self) -> int | None: ...


class _Stats(Protocol):
    def as_dict(self) -> dict[str, int]: ...


class FeedClient(Protocol):
    """What extraction needs of `lightspeed.LightspeedClient` (a fake in tests)."""

    @property
    def stats(self) -> _Stats: ...

    def iter_pages(
        self, path: str, after: int = 0, page_size: int | None = None, params: Mapping[str, Any] | None = None
    ) -> Iterable[_Page]: ...


def extract_orders(
    client: FeedClient,
    store: OrderStore,
    *,
    full_refresh: bool = False,
    commit_every_pages: int = DEFAULT_COMMIT_EVERY_PAGES,
    compact_above_segments: int = DEFAULT_COMPACT_ABOVE_SEGMENTS,
) -> dict[str, Any]:
    """Read both feeds from their stored cursors onwards into the store; the XCom summary dict.

    The result follows docs/contracts.md ("XCom payloads", extract_orders) and adds a per-resource
    breakdown; it never carries the data itself.
    """
    if commit_every_pages < 1:
        raise ValueError("commit_every_pages must be >= 1")
    api_before = client.stats.as_dict()
    if full_refresh:
        log.info("order store %s: full refresh requested, starting from an empty store", store.uri)
        store.reset()

    records: dict[str, int] = {}
    pages: dict[str, int] = {}
    started_at: dict[str, int] = {}
    for resource, path, params in FEEDS:
        started_at[resource] = store.cursor(resource)
        n_pages, n_records = _extract_feed(
            client, store, resource, path, params, started_at[resource], commit_every_pages
        )
        pages[resource] = n_pages
        records[resource] = n_records

    compacted: dict[str, int] = {}
    too_many = [r for r, _, _ in FEEDS if len(store.segments(r)) > compact_above_segments]
    if too_many:
        compacted = store.compact(too_many)

    api_after = client.stats.as_dict()
    api = {key: int(api_after.get(key, 0)) - int(api_before.get(key, 0)) for key in api_after}
    committed = store.manifest()["resources"]
    cursors = {r: int(committed[r]["cursor"]) for r, _, _ in FEEDS}
    result: dict[str, Any] = {
        "store": store.uri,
        "cursors": cursors,
        "records": records,
        "pages": sum(pages.values()),
        "api": api,
        "pages_by_resource": pages,
        "started_from": started_at,
        "full_refresh": bool(full_refresh),
        "segments": {r: len(committed[r]["segments"]) for r, _, _ in FEEDS},
        "compacted": compacted,
    }
    log.info(
        "extract_orders: %s sales and %s customer records in %d pages; %d API requests, %d x 429, "
        "%d retries; cursors %s; store %s",
        f"{records[SALES]:,}",
        f"{records[CUSTOMERS]:,}",
        result["pages"],
        api.get("requests", 0),
        api.get("rate_limited", 0),
        api.get("retries", 0),
        cursors,
        store.uri,
    )
    return result


def _extract_feed(
    client: FeedClient,
    store: OrderStore,
    resource: str,
    path: str,
    params: Mapping[str, Any],
    cursor: int,
    commit_every_pages: int,
) -> tuple[int, int]:
    """One feed from `cursor`: (pages, records) read. Commits complete pages, also on the way out
    of an error, so an API failure late in a long first load does not throw away the early pages."""
    convert: Callable[[Mapping[str, Any]], dict[str, Any]] = ROW_CONVERTERS[resource]
    buffered: list[dict[str, Any]] = []
    buffered_pages = 0
    committed_cursor = cursor
    page_cursor = cursor
    n_pages = 0
    n_records = 0

    def commit() -> None:
        nonlocal buffered, buffered_pages, committed_cursor
        if buffered_pages:
            store.append(resource, buffered, page_cursor)
            committed_cursor = page_cursor
            buffered, buffered_pages = [], 0

    log.info("%s: reading %s after version %d", resource, path, cursor)
    try:
        for page in client.iter_pages(path, after=cursor, params=dict(params) or None):
            rows = [convert(raw) for raw in page.data]
            page_max = page.version_max
            if page_max is None:
                page_max = max((row["version"] for row in rows), default=page_cursor)
            if int(page_max) <= page_cursor:
                raise LightspeedFeedError(
                    f"{resource}: page {n_pages + 1} of {path} does not move the cursor past {page_cursor} "
                    f"(its version.max is {int(page_max)}); refusing to store a feed that repeats itself",
                    method="GET",
                    path=path,
                )
            buffered.extend(rows)
            buffered_pages += 1
            page_cursor = max(page_cursor, int(page_max))
            n_pages += 1
            n_records += len(rows)
            if n_pages % PROGRESS_EVERY_PAGES == 0:
                log.info("%s: %d pages, %s records read", resource, n_pages, f"{n_records:,}")
            if buffered_pages >= commit_every_pages:
                commit()
    except Exception:
        pending = buffered_pages
        try:
            commit()
        except Exception:
            log.exception("%s: could not commit %d complete pages after an error", resource, pending)
        log.error(
            "%s: extraction failed after %d pages; committed up to version %d, the next run resumes there",
            resource,
            n_pages,
            committed_cursor,
        )
        raise
    commit()
    log.info(
        "%s: %d pages, %s records read; cursor %d -> %d",
        resource,
        n_pages,
        f"{n_records:,}",
        cursor,
        committed_cursor,
    )
    return n_pages, n_records
