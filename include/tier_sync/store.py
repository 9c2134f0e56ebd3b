"""The order store: every version seen of every sale and customer, as Parquet segments + a manifest.

Why this shape (docs/contracts.md "The order store"):

* Appending a chunk writes one new segment and rewrites a small manifest, so it costs O(chunk),
  never O(store), even at millions of sales.
* `manifest.json` is the only commit point. It names the live segments and, per resource, the
  cursor (`version.max`) the data has been read up to; both change in the one atomic write, so
  a crash can never advance a cursor past data that is not stored. A segment the manifest does
  not name (a crashed append, a segment replaced by compaction) does not exist for readers.
* Everything goes through fsspec / `fileio`, so the store works on a local folder, a file://
  URL or object storage shared by workers on several machines.
* Versions are kept, not overwritten, so a re-run for an older `as_of` sees records as they were.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from include.tier_sync import fileio
from include.tier_sync.money import sale_amount_cents

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tier_sync.order_store/1"
SALES = "sales"
CUSTOMERS = "customers"
RESOURCES: tuple[str, ...] = (SALES, CUSTOMERS)

_TS = pa.timestamp("us", tz="UTC")

SALES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("customer_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("state", pa.string()),
        pa.field("sale_date", _TS),
        pa.field("created_at", _TS),
        pa.field("updated_at", _TS),
        pa.field("deleted_at", _TS),
        pa.field("amount_cents", pa.int64(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
    ]
)

CUSTOMERS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("customer_code", pa.string()),
        pa.field("first_name", pa.string()),
        pa.field("last_name", pa.string()),
        pa.field("name", pa.string()),
        pa.field("email", pa.string()),
        pa.field("phone", pa.string()),
        pa.field("mobile", pa.string()),
        pa.field("enable_loyalty", pa.bool_(), nullable=False),
        pa.field("customer_group_id", pa.string()),
        pa.field("created_at", _TS),
        pa.field("updated_at", _TS),
        pa.field("deleted_at", _TS),
        pa.field("version", pa.int64(), nullable=False),
    ]
)

SCHEMAS: Mapping[str, pa.Schema] = {SALES: SALES_SCHEMA, CUSTOMERS: CUSTOMERS_SCHEMA}
SALES_COLUMNS: tuple[str, ...] = tuple(SALES_SCHEMA.names)
CUSTOMERS_COLUMNS: tuple[str, ...] = tuple(CUSTOMERS_SCHEMA.names)

_SALE_TIMESTAMPS = ("sale_date", "created_at", "updated_at", "deleted_at")
_SALE_STRINGS = ("customer_id", "status", "state")
_CUSTOMER_TIMESTAMPS = ("created_at", "updated_at", "deleted_at")
_CUSTOMER_STRINGS = (
    "customer_code",
    "first_name",
    "last_name",
    "name",
    "email",
    "phone",
    "mobile",
    "customer_group_id",
)

# zstd: about half the bytes of snappy on these columns and still decodes 5M rows in well under a second.
_COMPRESSION = "zstd"
_READ_ATTEMPTS = 3


class StoreError(RuntimeError):
    """The store is unusable (bad manifest, unknown resource, a committed segment missing)."""


class ConcurrentWriteError(StoreError):
    """Another writer committed since this one read its cursor; committing now could lose its data."""


class MalformedRecordError(ValueError):
    """An API record the store cannot hold. Names resource, record id and field, never the values."""

    def __init__(self, resource: str, record_id: str | None, field: str, problem: str) -> None:
        self.resource = resource
        self.record_id = record_id
        self.field = field
        self.problem = problem
        rid = record_id if record_id is not None else "<no id>"
        super().__init__(f"malformed {resource} record id={rid}: field {field!r} {problem}")


# -- raw API dict -> row ---------------------------------------------------------------------------


def _record_id(resource: str, raw: Mapping[str, Any]) -> str:
    if not isinstance(raw, Mapping):
        raise MalformedRecordError(resource, None, "<record>", "is not a JSON object")
    value = raw.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise MalformedRecordError(resource, None, "id", "is missing or not a string")
    return str(value)


def _version(resource: str, rid: str, raw: Mapping[str, Any]) -> int:
    value = raw.get("version")
    if isinstance(value, bool):
        raise MalformedRecordError(resource, rid, "version", "is not an integer")
    if isinstance(value, int):
        out = value
    elif isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        out = int(value)
    else:
        raise MalformedRecordError(resource, rid, "version", "is missing or not an integer")
    if out < 0:
        raise MalformedRecordError(resource, rid, "version", "is negative")
    return out


def _timestamp(resource: str, rid: str, raw: Mapping[str, Any], field: str) -> datetime | None:
    value = raw.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedRecordError(resource, rid, field, "is not an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise MalformedRecordError(resource, rid, field, "is not an ISO-8601 timestamp") from None
    # The API documents every instant as UTC; a legacy offset-less form is read as UTC too.
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _string(resource: str, rid: str, raw: Mapping[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        return str(value)
    raise MalformedRecordError(resource, rid, field, "is not a string")


def sale_to_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One API sale (2.0 shape, JSON numbers as Decimal) -> one row of the sales columns."""
    rid = _record_id(SALES, raw)
    row: dict[str, Any] = {"id": rid}
    for field in _SALE_STRINGS:
        row[field] = _string(SALES, rid, raw, field)
    for field in _SALE_TIMESTAMPS:
        row[field] = _timestamp(SALES, rid, raw, field)
    try:
        row["amount_cents"] = sale_amount_cents(raw)
    except (ValueError, ArithmeticError):
        field = "total_price_incl" if raw.get("total_price_incl") is not None else "total_price/total_tax"
        raise MalformedRecordError(SALES, rid, field, "is not a decimal amount") from None
    row["version"] = _version(SALES, rid, raw)
    return row


def customer_to_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One API customer -> one row of the customers columns (a missing `enable_loyalty` is False)."""
    rid = _record_id(CUSTOMERS, raw)
    row: dict[str, Any] = {"id": rid}
    for field in _CUSTOMER_STRINGS:
        row[field] = _string(CUSTOMERS, rid, raw, field)
    loyalty = raw.get("enable_loyalty")
    if loyalty is None:
        row["enable_loyalty"] = False
    elif isinstance(loyalty, bool):
        row["enable_loyalty"] = loyalty
    else:
        raise MalformedRecordError(CUSTOMERS, rid, "enable_loyalty", "is not a boolean")
    for field in _CUSTOMER_TIMESTAMPS:
        row[field] = _timestamp(CUSTOMERS, rid, raw, field)
    row["version"] = _version(CUSTOMERS, rid, raw)
    return row


ROW_CONVERTERS = {SALES: sale_to_row, CUSTOMERS: customer_to_row}


def rows_to_table(resource: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (as from sale_to_row / customer_to_row) -> an Arrow table, one row per (id, version)."""
    schema = _schema(resource)
    unique: dict[tuple[str, int], Mapping[str, Any]] = {}
    for row in rows:
        unique[(row["id"], row["version"])] = row
    kept = list(unique.values())
    columns = [pa.array([r.get(name) for r in kept], type=schema.field(name).type) for name in schema.names]
    return pa.Table.from_arrays(columns, schema=schema)


def _schema(resource: str) -> pa.Schema:
    try:
        return SCHEMAS[resource]
    except KeyError:
        raise StoreError(f"unknown resource {resource!r}; known: {list(RESOURCES)}") from None


# -- the store -------------------------------------------------------------------------------------


def _empty_manifest(generation: int = 0, next_segment: int = 1) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "generation": generation,
        "next_segment": next_segment,
        "updated_at": None,
        "resources": {r: {"cursor": 0, "segments": []} for r in RESOURCES},
    }


class OrderStore:
    """Append-only Parquet segments per resource under `root`, committed by `root/manifest.json`.

    Single writer at a time (the `extract_orders` task); any number of concurrent readers. Every
    read loads the manifest afresh, so workers on other machines see each commit at once.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        text = os.fspath(root)
        if "://" not in text:
            text = os.path.abspath(text)
        self.root = text.rstrip("/") or "/"
        # The manifest generation this writer last read its cursor from or committed itself.
        self._seen_generation: int | None = None

    def __repr__(self) -> str:
        return f"OrderStore({self.root!r})"

    @property
    def uri(self) -> str:
        return self.root

    @property
    def manifest_url(self) -> str:
        return fileio.join(self.root, MANIFEST_NAME)

    def segment_url(self, resource: str, name: str) -> str:
        return fileio.join(self.root, "segments", resource, name)

    # -- manifest -----------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The committed manifest (an empty one when the store has never been written)."""
        data = fileio.read_json(self.manifest_url)
        if data is None:
            return _empty_manifest()
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise StoreError(f"{self.manifest_url}: not an order-store manifest ({MANIFEST_FORMAT})")
        resources = data.setdefault("resources", {})
        for resource in RESOURCES:
            resources.setdefault(resource, {"cursor": 0, "segments": []})
        return data

    def _manifest_for_write(self) -> dict[str, Any]:
        """The manifest to build the next commit on, refused when another writer has moved it.

        Optimistic, not a lock (object storage offers no portable compare-and-swap): it catches
        overlapping writers except within the few milliseconds of one manifest read-then-write.
        """
        manifest = self.manifest()
        generation = int(manifest.get("generation", 0))
        if self._seen_generation is not None and generation != self._seen_generation:
            raise ConcurrentWriteError(
                f"order store {self.root}: another writer committed (generation {self._seen_generation} "
                f"-> {generation}); run one extraction at a time and retry"
            )
        return manifest

    def _commit(self, manifest: dict[str, Any]) -> None:
        manifest["generation"] = int(manifest.get("generation", 0)) + 1
        manifest["updated_at"] = datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        fileio.write_json(self.manifest_url, manifest)
        self._seen_generation = manifest["generation"]

    def cursor(self, resource: str) -> int:
        """The version the resource has been read up to; 0 when nothing is stored.

        A writer reads its cursor here; later appends by this instance fail if another writer
        commits in between.
        """
        _schema(resource)
        manifest = self.manifest()
        self._seen_generation = int(manifest.get("generation", 0))
        return int(manifest["resources"][resource]["cursor"])

    def cursors(self) -> dict[str, int]:
        resources = self.manifest()["resources"]
        return {r: int(resources[r]["cursor"]) for r in RESOURCES}

    def segments(self, resource: str) -> list[dict[str, Any]]:
        """Manifest entries of the committed segments: name, rows, min_version, max_version."""
        _schema(resource)
        return list(self.manifest()["resources"][resource]["segments"])

    # -- writes -------------------------------------------------------------------------------------

    def append(self, resource: str, rows: Sequence[Mapping[str, Any]] | pa.Table, cursor: int) -> None:
        """Write rows as one new segment, then commit it and the cursor in one manifest write.

        The cursor never moves backwards: data above it may be re-read, data below it never skipped.
        """
        table = rows if isinstance(rows, pa.Table) else rows_to_table(resource, rows)
        table = table.select(_schema(resource).names).cast(_schema(resource))
        seq = int(self._manifest_for_write().get("next_segment", 1))
        segment = self._write_segment(resource, seq, table) if table.num_rows else None
        manifest = self._manifest_for_write()
        entry = manifest["resources"][resource]
        if segment is not None:
            manifest["next_segment"] = max(int(manifest.get("next_segment", 1)), seq + 1)
            entry["segments"].append(segment)
        new_cursor = max(int(entry["cursor"]), int(cursor))
        if segment is None and new_cursor == int(entry["cursor"]):
            return
        entry["cursor"] = new_cursor
        self._commit(manifest)

    def _write_segment(self, resource: str, seq: int, table: pa.Table) -> dict[str, Any]:
        name = f"{seq:08d}-{uuid.uuid4().hex[:12]}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=_COMPRESSION)
        fileio.write_bytes(self.segment_url(resource, name), buf.getvalue())
        versions = table.column("version")
        return {
            "name": name,
            "rows": table.num_rows,
            "min_version": int(pc.min(versions).as_py()),
            "max_version": int(pc.max(versions).as_py()),
        }

    def reset(self) -> None:
        """Full refresh: commit an empty store. Old segments stay on disk until compact() collects them."""
        old = self.manifest()
        fresh = _empty_manifest(int(old.get("generation", 0)), int(old.get("next_segment", 1)))
        self._commit(fresh)

    def compact(
        self, resources: Iterable[str] | None = None, *, collect_garbage: bool = True
    ) -> dict[str, int]:
        """Merge each resource's segments into one (every distinct (id, version) kept).

        The new segment is committed before anything is deleted, so a crash at any point leaves a
        readable store. Returns the number of segments merged per resource.
        """
        wanted = list(resources) if resources is not None else list(RESOURCES)
        manifest = self._manifest_for_write()
        based_on = int(manifest.get("generation", 0))
        merged: dict[str, int] = {}
        replaced: list[str] = []
        for resource in wanted:
            entry = manifest["resources"][resource]
            segs = entry["segments"]
            if len(segs) <= 1:
                continue
            table = self._read_distinct(resource, segs)
            seq = int(manifest.get("next_segment", 1))
            manifest["next_segment"] = seq + 1
            entry["segments"] = [self._write_segment(resource, seq, table)] if table.num_rows else []
            replaced += [self.segment_url(resource, s["name"]) for s in segs]
            merged[resource] = len(segs)
        if merged:
            if int(self.manifest().get("generation", 0)) != based_on:
                raise ConcurrentWriteError(
                    f"order store {self.root}: a commit landed during compaction; retry"
                )
            self._commit(manifest)
            log.info("order store %s: compacted %s", self.root, merged)
        for url in replaced:
            _remove(url)
        if collect_garbage:
            self.collect_garbage(wanted)
        return merged

    def collect_garbage(self, resources: Iterable[str] | None = None) -> int:
        """Delete segment files the manifest does not name (crashed appends, replaced segments)."""
        manifest = self.manifest()
        removed = 0
        for resource in resources if resources is not None else RESOURCES:
            live = {s["name"] for s in manifest["resources"][resource]["segments"]}
            folder = fileio.join(self.root, "segments", resource)
            for name in fileio.listdir(folder):
                if name.endswith(".parquet") and name not in live:
                    _remove(fileio.join(folder, name))
                    removed += 1
        return removed

    # -- reads --------------------------------------------------------------------------------------

    def read(self, resource: str) -> pd.DataFrame:
        """Every stored version of the resource's records, one row per distinct (id, version)."""
        return self.read_table(resource).to_pandas(split_blocks=True, self_destruct=True)

    def read_table(self, resource: str) -> pa.Table:
        """As read(), as an Arrow table (row order is not meaningful)."""
        _schema(resource)
        for attempt in range(_READ_ATTEMPTS):
            segs = self.manifest()["resources"][resource]["segments"]
            try:
                return self._read_distinct(resource, segs)
            except FileNotFoundError:
                # A compaction committed and deleted the segments we were about to read: reload.
                if attempt == _READ_ATTEMPTS - 1:
                    raise StoreError(f"{self.root}: a committed {resource} segment is missing") from None
                continue
        raise AssertionError("unreachable")

    def _read_distinct(self, resource: str, segs: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Each segment is unique in (id, version), and segments with disjoint version ranges cannot
        share one, so only overlapping segments pay for the dedupe."""
        clean, overlapping = _split_overlapping(segs)
        table = self._read_table(resource, clean)
        if overlapping:
            table = pa.concat_tables([table, _dedupe_table(self._read_table(resource, overlapping))])
        return table

    def _read_table(self, resource: str, segs: Sequence[Mapping[str, Any]]) -> pa.Table:
        schema = _schema(resource)
        if not segs:
            return schema.empty_table()
        urls = [self.segment_url(resource, s["name"]) for s in segs]
        if fileio.is_local(self.root):
            paths = [fileio.local_path(u) for u in urls]
            dataset = ds.dataset(paths, schema=schema, format="parquet")
        else:
            fs, _ = fileio.filesystem(self.root)
            paths = [fileio.filesystem(u)[1] for u in urls]
            dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=fs)
        return dataset.to_table()


def _split_overlapping(
    segs: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Segments whose version range overlaps no other, and the rest."""
    ordered = sorted(segs, key=lambda s: (int(s["min_version"]), int(s["max_version"])))
    groups: list[list[Mapping[str, Any]]] = []
    group_max = -1
    for seg in ordered:
        if groups and int(seg["min_version"]) <= group_max:
            groups[-1].append(seg)
        else:
            groups.append([seg])
        group_max = max(group_max, int(seg["max_version"]))
    clean = [g[0] for g in groups if len(g) == 1]
    overlapping = [seg for g in groups if len(g) > 1 for seg in g]
    return clean, overlapping


def _dedupe_table(table: pa.Table) -> pa.Table:
    """Keep the last committed row of each (id, version), in commit order.

    Hashing 5M string ids is slow, so only rows whose integer version repeats are grouped.
    """
    versions = table.column("version")
    if table.num_rows == 0 or pc.count_distinct(versions).as_py() == table.num_rows:
        return table
    counts = pc.value_counts(versions)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    suspect = pc.is_in(versions, value_set=repeated)
    idx = pa.array(np.arange(table.num_rows, dtype=np.int64))
    keyed = pa.table({"id": table.column("id"), "version": versions, "_i": idx}).filter(suspect)
    last = keyed.group_by(["id", "version"], use_threads=False).aggregate([("_i", "max")])
    keep = pc.or_(pc.invert(suspect), pc.is_in(idx, value_set=last.column("_i_max")))
    return table.filter(keep)


def _remove(url: str) -> None:
    try:
        if fileio.is_local(url):
            os.remove(fileio.local_path(url))
        else:
            fs, path = fileio.filesystem(url)
            fs.rm_file(path)
    except FileNotFoundError:
        pass
