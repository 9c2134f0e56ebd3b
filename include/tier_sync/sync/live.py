"""The live customers: each customer's newest extracted version (group, deleted, version) at a cursor.

All that plan_sync and plan_progress need of the order store's customers. Reading it from the
Parquet segments costs pyarrow and pandas in two tasks that otherwise need neither (issue 17), so
`extract_orders`, which has the store open anyway, writes it after its last commit to
``runs/<key>/live_customers.json.gz`` (`LiveCustomersDoc`) with the customers cursor it was
computed at. A plan uses the file only while the store's cursor (read from the manifest, no
pyarrow) is still that one; otherwise (no file, a run folder from before it, another run extracted
since) it builds the same mapping from the store, saying why at INFO. Both go through
`newest_states`, the one rule for "the newest version of each customer".

A file that cannot be read is an error naming it (never "no customers"); deleting it makes the
plan read the store instead.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio
from include.tier_sync.store_manifest import CUSTOMERS, read_cursor
from include.tier_sync.sync.contracts import (
    FORMAT_VERSION,
    LiveCustomersDoc,
    UnsupportedFormatVersion,
    format_version_of,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.store import OrderStore

log = logging.getLogger(__name__)

# id -> (customer_group_id or None, deleted, version) of the newest extracted version
LiveState = tuple[str | None, bool, int]
LiveCustomers = dict[str, LiveState]


class LiveCustomersError(ValueError):
    """The live-customers file exists but is not one: the plan must not read it as "no customers"."""


def is_blank(value: Any) -> bool:
    """No group: None or a blank string (what the store's Arrow columns hold for a missing value)."""
    return value is None or (isinstance(value, str) and value.strip() == "")


def newest_states(
    rows: Iterable[tuple[Any, Any, Any, bool]], *, is_null: Callable[[Any], bool] = is_blank
) -> LiveCustomers:
    """(id, version, customer_group_id, deleted) rows -> each id's newest version, by id.

    The highest version wins; of equal versions (or no versions: None) the later row, as a stable
    sort by (id, version) keeping the last would. A null group (`is_null`) is None.
    """
    best: dict[str, tuple[int, Any, bool]] = {}
    for cid, version, group, deleted in rows:
        key, v = str(cid), int(version) if version is not None else 0
        seen = best.get(key)
        if seen is None or v >= seen[0]:
            best[key] = (v, group, bool(deleted))
    return {
        cid: (None if is_null(group) else str(group), deleted, v)
        for cid, (v, group, deleted) in sorted(best.items())
    }


def from_table(table: pa.Table) -> LiveCustomers:
    """`newest_states` of the store's customers table (`OrderStore.read_table("customers")`)."""
    ids = table.column("id").to_pylist()
    versions = table.column("version").to_pylist()
    groups = table.column("customer_group_id").to_pylist()
    deleted = table.column("deleted_at").is_valid().to_pylist()
    return newest_states(zip(ids, versions, groups, deleted, strict=True))


def as_live(current: pd.DataFrame | Mapping[str, LiveState]) -> LiveCustomers:
    """The live customers, given as such or as a customers frame (``id``, ``customer_group_id``,
    optionally ``deleted_at`` and ``version``: the newest version per id is used). pandas is
    imported only for a frame (its nulls: None, blank, NaN, NaT)."""
    if not hasattr(current, "columns"):
        return dict(current)
    import pandas as pd

    def is_null(value: Any) -> bool:
        if is_blank(value):
            return True
        try:
            return bool(pd.isna(value))
        except (TypeError, ValueError):
            return False

    n = len(current)
    versions = current["version"] if "version" in current.columns else [None] * n
    deleted_at = current["deleted_at"] if "deleted_at" in current.columns else [None] * n
    deleted = [not is_null(v) for v in deleted_at]
    return newest_states(zip(current["id"], versions, current["customer_group_id"], deleted, strict=True), is_null=is_null)


def from_store(store: OrderStore) -> LiveCustomers:
    return from_table(store.read_table(CUSTOMERS))


# -- the file ------------------------------------------------------------------------------------


def write_live_customers(url: str, cursor: int, live: Mapping[str, LiveState]) -> None:
    doc: LiveCustomersDoc = {
        "format_version": FORMAT_VERSION,
        "customers_cursor": int(cursor),
        "customers": {cid: [group, deleted, version] for cid, (group, deleted, version) in live.items()},
    }
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    fileio.write_bytes(url, gzip.compress(data, compresslevel=3, mtime=0))  # 6 MB at 200,000 customers, in 0.15 s


def _corrupt(url: str, why: str) -> LiveCustomersError:
    return LiveCustomersError(
        f"{url} is not a live-customers file ({why}); nothing was planned from it. Delete it to have "
        "the plan read the order store instead (the next extract_orders writes it again)."
    )


def _state(url: str, cid: str, value: Any) -> LiveState:
    """One entry, checked: [group id or None, deleted, version]."""
    if isinstance(value, list) and len(value) == 3:
        group, deleted, version = value
        group_ok = group is None or isinstance(group, str)
        if group_ok and isinstance(deleted, bool) and isinstance(version, int) and not isinstance(version, bool):
            return group, deleted, version
    raise _corrupt(url, f"customer {cid!r} is not [group, deleted, version]")


def read_live_customers(url: str) -> tuple[int, LiveCustomers] | None:
    """(customers cursor, live customers) of the file; None when there is none; else LiveCustomersError."""
    try:
        raw = fileio.read_bytes(url)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(gzip.decompress(raw).decode("utf-8"))
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _corrupt(url, f"not gzip'd JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("customers"), dict):
        raise _corrupt(url, "no `customers` object")
    try:
        format_version_of(doc, url)
    except UnsupportedFormatVersion as exc:
        raise _corrupt(url, str(exc)) from exc
    cursor = doc.get("customers_cursor")
    if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        raise _corrupt(url, f"customers_cursor {cursor!r}")
    return cursor, {cid: _state(url, cid, value) for cid, value in doc["customers"].items()}


# -- the two sides -------------------------------------------------------------------------------


def write_for_run(paths: RunPaths, store: OrderStore) -> str | None:
    """extract_orders, after its last commit: the run's live-customers file; its path (None when
    another writer committed while it was being built: the plan then reads the store)."""
    cursor = store.cursor(CUSTOMERS)
    live = from_store(store)
    now = store.cursor(CUSTOMERS)
    if now != cursor:
        log.warning("Live customers not written: the customers cursor moved from %s to %s meanwhile", cursor, now)
        return None
    write_live_customers(paths.run_live_customers, cursor, live)
    log.info("Live customers: %s at customers cursor %s -> %s", f"{len(live):,}", cursor, paths.run_live_customers)
    return paths.run_live_customers


def store_cursor(paths: RunPaths) -> int:
    """The order store's customers cursor, from its manifest (no pyarrow)."""
    return read_cursor(paths.store, CUSTOMERS)


def live_customers(paths: RunPaths, cursor: int) -> LiveCustomers:
    """The live customers at the store's customers ``cursor``: the run's file when it was made at
    that cursor, else built from the store (lazily importing it; the reason logged at INFO)."""
    found = read_live_customers(paths.run_live_customers)
    if found is not None and found[0] == cursor:
        return found[1]
    if found is None:
        why = f"{paths.run_live_customers} does not exist (a run folder from before it, or extract_orders did not write it)"
    else:
        why = f"{paths.run_live_customers} was made at customers cursor {found[0]}, the store is at {cursor}"
    log.info("Live customers read from the order store: %s", why)
    from include.tier_sync.store import OrderStore

    return from_store(OrderStore(paths.store))
