"""The order store: every version seen of every sale and customer, as Parquet segments + a manifest.

Why this shape (docs/contracts.md "The order store"):

* Appending a chunk writes one new segment and rewrites a small manifest, so it costs O(chunk),
  never O(store), even at millions of sales.
* `manifest.json` is the only commit point. It names the live segments and, per resource, the
  cursor (`version.max`) the data has been read up to; both change in the one atomic write, so
  a crash can never advance a cursor past data that is not stored. A segment the manifest does
  not name (a crashed append, a segment replaced by compaction) does not exist for readers.
* A commit is a compare-and-swap on the manifest's (generation, etag): under an flock locally; on
  S3 one conditional PUT (If-Match the object ETag of the manifest it was checked against,
  If-None-Match '*' for the first), so of two writers from the same read exactly one lands and
  the other gets ConcurrentWriteError. gs, az and memory:// have neither here: an optimistic
  re-check, with Airflow serialising the writer. A file that cannot be read raises
  StoreCorruptError naming it and full_refresh, which sets damage aside.
* Everything goes through fsspec / `fileio`, so the store works on a local folder, a file://
  URL or object storage shared by workers on several machines.
* Versions are kept, not overwritten, so a re-run for an older `as_of` sees records as they were.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from include.tier_sync import fileio
from include.tier_sync.store_manifest import (
    MANIFEST_NAME,
    RECOVERY,
    ConcurrentWriteError,
    StoreCorruptError,
    StoreError,
    read_manifest,
    store_root,
)
from include.tier_sync.store_manifest import empty_manifest as _empty_manifest
from include.tier_sync.store_records import (
    CUSTOMERS,
    CUSTOMERS_COLUMNS,
    CUSTOMERS_SCHEMA,
    RESOURCES,
    ROW_CONVERTERS,
    SALES,
    SALES_COLUMNS,
    SALES_SCHEMA,
    SCHEMAS,
    MalformedRecordError,
    customer_to_row,
    sale_to_row,
)

if TYPE_CHECKING:
    import pandas as pd

# The record names are re-exported: callers import the store's whole vocabulary from here.
__all__ = [
    "CUSTOMERS",
    "CUSTOMERS_COLUMNS",
    "CUSTOMERS_SCHEMA",
    "RESOURCES",
    "ROW_CONVERTERS",
    "SALES",
    "SALES_COLUMNS",
    "SALES_SCHEMA",
    "SCHEMAS",
    "ConcurrentWriteError",
    "MalformedRecordError",
    "OrderStore",
    "StoreCorruptError",
    "StoreError",
    "customer_to_row",
    "rows_to_table",
    "sale_to_row",
]

log = logging.getLogger(__name__)

LOCK_NAME = "manifest.lock"
# zstd: about half the bytes of snappy on these columns and still decodes 5M rows in well under a second.
_COMPRESSION = "zstd"
# Columns written with Parquet dictionary encoding (all others plain), and a dictionary page large
# enough to hold a whole segment's customer ids (Parquet's 1 MB default gives up on them after
# about 29,000 distinct ids). A reader asking for them as dictionaries (read_table(dictionary=))
# then gets the file's own dictionary, so compute_tiers looks up each distinct customer id once per
# segment instead of once per sale. On the 200k-customer bench store: 7% fewer bytes than the
# default encoding and reads a third faster. Segments written before read as they always did.
_DICTIONARY_COLUMNS = {"sales": ["customer_id", "status", "state"]}
_DICTIONARY_PAGE_BYTES = 64 << 20
_READ_ATTEMPTS = 3
# read_table(each=...): two segments at a time (a segment is one row group, decoded by one thread:
# two keep both cores busy), a few batches decoded ahead (Arrow's defaults keep 4 files and 16
# batches in flight: hundreds of MB of strings about to be replaced anyway).
_STREAM: dict[str, int] = {"fragment_readahead": 2, "batch_readahead": 4}


# -- rows -> Arrow ---------------------------------------------------------------------------------


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


def _token(manifest: Mapping[str, Any]) -> tuple[int, Any]:
    """What a commit is compared on: the generation counter and the random etag of that commit."""
    return int(manifest.get("generation", 0)), manifest.get("etag")


class OrderStore:
    """Append-only Parquet segments per resource under `root`, committed by `root/manifest.json`.

    Single writer at a time (the `extract_orders` task); any number of concurrent readers. Every
    read loads the manifest afresh, so workers on other machines see each commit at once.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = store_root(root)
        # (generation, etag) of the manifest this writer last read its cursor from or committed.
        self._seen: tuple[int, Any] | None = None
        # S3: commits are conditional PUTs on the manifest object's ETag (fileio.write_bytes_if).
        self._conditional = fileio.has_conditional_write(self.root)
        # S3: (generation, etag) of a manifest read -> its object ETag (None: there was none).
        self._object_tags: dict[tuple[int, Any], str | None] = {}

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
        """The committed manifest (empty for a new store); StoreCorruptError when it is unreadable
        (`store_manifest.read_manifest`, which reads it without pyarrow)."""
        data, tag = read_manifest(self.root, tagged=self._conditional)
        if self._conditional:
            self._remember_tag(_token(data), tag)
        return data

    def _remember_tag(self, token: tuple[int, Any], tag: str | None) -> None:
        """S3: the object ETag of the first manifest seen with `token`. A commit built on that
        manifest lands only over those very bytes: a manifest rewritten since, even with the same
        (generation, etag), is refused. A token missing here at commit time means If-None-Match,
        which can only fail, never overwrite."""
        self._object_tags.setdefault(token, tag)
        while len(self._object_tags) > 16:
            self._object_tags.pop(next(iter(self._object_tags)))

    def _manifest_for_write(self, expected: tuple[int, Any] | None = None) -> dict[str, Any]:
        """The manifest to build a commit on; ConcurrentWriteError when it is no longer `expected`
        (by default: what this writer last read its cursor from or committed)."""
        manifest = self.manifest()
        expected = self._seen if expected is None else expected
        if expected is not None and _token(manifest) != expected:
            raise ConcurrentWriteError(
                f"order store {self.root}: another writer committed (generation {expected[0]} -> "
                f"{_token(manifest)[0]}) since this one read it; run one extraction at a time and retry"
            )
        return manifest

    def _commit_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Serialises commits: an flock on `manifest.lock` of a local store (closing releases it).
        Object storage has no lock in fsspec: on S3 the write itself is conditional (see _commit);
        on gs, az and memory:// the check in _commit is optimistic."""
        return fileio.exclusive_lock(fileio.join(self.root, LOCK_NAME))

    def _commit(self, manifest: dict[str, Any]) -> None:
        """Compare-and-swap: write `manifest` only while the committed one is the one it was built on.

        Locally the re-check and the write happen under the flock. On S3 the write is a PUT with
        If-Match the object ETag of the manifest it was built on (If-None-Match '*' when there was
        none), so a commit landing after that read, even between the re-check and the write, makes
        S3 refuse this one: ConcurrentWriteError, as for a lost re-check. On gs, az and memory://
        a commit can still land between the re-check and the write (the DAG runs one
        extract_orders at a time).
        """
        with self._commit_lock():
            base = self._manifest_for_write(_token(manifest))
            self._write_manifest(manifest, base=_token(base))

    def _write_manifest(self, manifest: dict[str, Any], base: tuple[int, Any] | None) -> None:
        """Write `manifest` as the next generation; on S3 only over the manifest read as `base`."""
        generation = int(manifest.get("generation", 0)) + 1
        manifest["generation"] = generation
        manifest["etag"] = uuid.uuid4().hex
        manifest["updated_at"] = datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if not self._conditional:
            fileio.write_json(self.manifest_url, manifest)
        else:
            tag = self._object_tags.get(base) if base is not None else None
            try:
                written = fileio.write_bytes_if(self.manifest_url, fileio.json_bytes(manifest), etag=tag)
            except fileio.WriteConflict as exc:
                raise ConcurrentWriteError(
                    f"order store {self.root}: another writer committed while this one was committing "
                    f"generation {generation} ({exc}; S3 refused the conditional write, nothing of "
                    "this commit is visible); run one extraction at a time and retry"
                ) from None
            self._remember_tag(_token(manifest), written)
        self._seen = _token(manifest)

    def cursor(self, resource: str) -> int:
        """The version the resource has been read up to (0: nothing stored). A writer reads its
        cursor here; its later appends fail if another writer commits in between."""
        _schema(resource)
        manifest = self.manifest()
        self._seen = _token(manifest)
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
        manifest = self._manifest_for_write()
        seq = int(manifest.get("next_segment", 1))
        segment = self._write_segment(resource, seq, table) if table.num_rows else None
        entry = manifest["resources"][resource]
        if segment is not None:
            manifest["next_segment"] = seq + 1
            entry["segments"].append(segment)
        new_cursor = max(int(entry["cursor"]), int(cursor))
        if segment is None and new_cursor == int(entry["cursor"]):
            return
        entry["cursor"] = new_cursor
        self._commit(manifest)

    def _write_segment(self, resource: str, seq: int, table: pa.Table) -> dict[str, Any]:
        name = f"{seq:08d}-{uuid.uuid4().hex[:12]}.parquet"
        buf = io.BytesIO()
        encoding: dict[str, Any] = {}
        if resource in _DICTIONARY_COLUMNS:
            names = [c for c in _DICTIONARY_COLUMNS[resource] if c in table.column_names]
            encoding = {"use_dictionary": names, "dictionary_pagesize_limit": _DICTIONARY_PAGE_BYTES}
        pq.write_table(table, buf, compression=_COMPRESSION, **encoding)
        fileio.write_bytes(self.segment_url(resource, name), buf.getvalue())
        versions = table.column("version")
        return {
            "name": name,
            "rows": table.num_rows,
            "min_version": int(pc.min(versions).as_py()),
            "max_version": int(pc.max(versions).as_py()),
        }

    def reset(self) -> str | None:
        """Full refresh: an empty store. A corrupt manifest and the segments are moved (not deleted) to
        `damaged-<UTC time>-<id>/`, returned; else old segments wait for compact() to collect them."""
        with self._commit_lock():
            try:
                old, damaged = self.manifest(), None
                base: tuple[int, Any] | None = _token(old)
            except StoreCorruptError as exc:
                # On S3 the new manifest is then written only if none has appeared (If-None-Match).
                base = None
                old, stamp = _empty_manifest(), datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
                damaged = fileio.join(self.root, f"damaged-{stamp}-{uuid.uuid4().hex[:6]}")
                log.warning("%s; full refresh: moving the damaged store to %s", exc, damaged)
                for name in ("segments", MANIFEST_NAME):  # segments first: a half-done move stays damaged
                    if fileio.exists(fileio.join(self.root, name)):
                        _move(fileio.join(self.root, name), fileio.join(damaged, name))
            self._write_manifest(
                _empty_manifest(int(old["generation"]), int(old.get("next_segment", 1))), base=base
            )
        return damaged

    def compact(
        self, resources: Iterable[str] | None = None, *, collect_garbage: bool = True
    ) -> dict[str, int]:
        """Merge each resource's segments into one (every distinct (id, version) kept).

        The new segment is committed before anything is deleted, so a crash at any point leaves a
        readable store. Returns the number of segments merged per resource.
        """
        wanted = list(resources) if resources is not None else list(RESOURCES)
        manifest = self._manifest_for_write()
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
            self._commit(manifest)
            log.info("order store %s: compacted %s", self.root, merged)
        for url in replaced:
            _remove(url)
        if collect_garbage:
            self.collect_garbage(wanted)
        return merged

    def drop_rows(self, column_by_resource: Mapping[str, str], value: str, *, dry_run: bool = False) -> dict[str, int]:
        """Rewrite every segment holding rows whose column (per resource) equals `value` without
        them: the erasure of one customer (include/tier_sync/erasure.py). Like `compact`, the new
        segments are committed (compare-and-swap) before the replaced ones are deleted. Returns
        the rows dropped per resource and `segments_rewritten`; `dry_run` only counts."""
        manifest = self._manifest_for_write(_token(self.manifest()))
        counts = {resource: 0 for resource in column_by_resource} | {"segments_rewritten": 0}
        replaced: list[str] = []
        for resource, column in column_by_resource.items():
            kept = []
            for seg in manifest["resources"][resource]["segments"]:
                table = self._read_table(resource, [seg])
                hit = pc.fill_null(pc.equal(table.column(column), value), False)
                n = int(pc.sum(hit).as_py() or 0)
                if n:
                    counts[resource] += n
                    counts["segments_rewritten"] += 1
                if not n or dry_run:
                    kept.append(seg)
                    continue
                rest = table.filter(pc.invert(hit))
                if rest.num_rows:
                    seq = int(manifest.get("next_segment", 1))
                    manifest["next_segment"] = seq + 1
                    kept.append(self._write_segment(resource, seq, rest))
                replaced.append(self.segment_url(resource, seg["name"]))
            manifest["resources"][resource]["segments"] = kept
        if replaced:
            self._commit(manifest)
            for url in replaced:
                _remove(url)
            self.collect_garbage()  # unnamed segments (a crashed append) may hold the rows too
        return counts

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

    def read_table(
        self,
        resource: str,
        *,
        dictionary: Sequence[str] = (),
        each: Callable[[pa.Table], pa.Table] | None = None,
    ) -> pa.Table:
        """As read(), as an Arrow table (row order is not meaningful). The text columns named in
        `dictionary` come as dictionary arrays straight from Parquet's dictionary pages (a status
        column of a few values costs indices, not millions of strings). `each` is applied to every
        piece read (a segment, or the deduplicated overlapping ones) before they are put together,
        so a column can be replaced by something smaller while the rest is still being read; it
        must return the same schema for every piece."""
        _schema(resource)
        for attempt in range(_READ_ATTEMPTS):
            segs = self.manifest()["resources"][resource]["segments"]
            try:
                return self._read_distinct(resource, segs, tuple(dictionary), each)
            except FileNotFoundError as exc:
                # A compaction committed and deleted the segments we were about to read: reload.
                if attempt == _READ_ATTEMPTS - 1:
                    urls = (self.segment_url(resource, s["name"]) for s in segs)
                    missing = " and ".join(u for u in urls if not fileio.exists(u)) or str(exc)
                    raise StoreCorruptError(f"order store segment {missing} is missing: {RECOVERY}") from None
        raise AssertionError("unreachable")

    def _read_distinct(
        self,
        resource: str,
        segs: Sequence[Mapping[str, Any]],
        dictionary: tuple[str, ...] = (),
        each: Callable[[pa.Table], pa.Table] | None = None,
    ) -> pa.Table:
        """Each segment is unique in (id, version), and segments with disjoint version ranges cannot
        share one, so only overlapping segments pay for the dedupe."""
        clean, overlapping = _split_overlapping(segs)
        table = self._read_table(resource, clean, dictionary, each)
        if not overlapping:
            return table
        deduped = _dedupe_table(self._read_table(resource, overlapping, dictionary))
        return pa.concat_tables([table, each(deduped) if each is not None else deduped])

    def _read_table(
        self,
        resource: str,
        segs: Sequence[Mapping[str, Any]],
        dictionary: tuple[str, ...] = (),
        each: Callable[[pa.Table], pa.Table] | None = None,
    ) -> pa.Table:
        """The segments as one table (with `each` applied to every batch as it is read: Arrow still
        decodes ahead in parallel); StoreCorruptError naming a segment that cannot be read."""
        schema = _schema(resource)
        fmt: Any = "parquet"
        if dictionary:
            for name in dictionary:
                at = schema.get_field_index(name)
                if at < 0 or schema.field(name).type != pa.string():
                    raise StoreError(f"{resource}.{name} is not a text column of the order store")
                schema = schema.set(at, schema.field(name).with_type(pa.dictionary(pa.int32(), pa.string())))
            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=list(dictionary)))
        if not segs:
            return each(schema.empty_table()) if each is not None else schema.empty_table()
        urls = [self.segment_url(resource, s["name"]) for s in segs]
        try:
            local = fileio.is_local(self.root)
            fs = None if local else fileio.filesystem(self.root)[0]
            paths = [fileio.local_path(u) if local else fileio.filesystem(u)[1] for u in urls]
            dataset = ds.dataset(paths, schema=schema, format=fmt, filesystem=fs)
            if each is None:
                return dataset.to_table()
            pieces = [each(pa.Table.from_batches([batch], schema=schema)) for batch in dataset.to_batches(**_STREAM)]
            return pa.concat_tables(pieces) if pieces else each(schema.empty_table())
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            for seg in segs if len(segs) > 1 else ():
                self._read_table(resource, [seg], dictionary)  # raises, naming the culprit
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise StoreCorruptError(
                f"order store segment {' or '.join(urls)} cannot be read ({reason}): {RECOVERY}"
            ) from exc


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


def _move(src: str, dst: str) -> None:
    """Rename a file or folder (on object storage: copy each object, then delete the sources).

    Object by object, because fsspec's recursive mv also copies the folder itself, which on S3 is
    no object at all: s3fs then fails with NoSuchKey after copying part of it.
    """
    if fileio.is_local(src):
        os.makedirs(os.path.dirname(fileio.local_path(dst)), exist_ok=True)
        return os.rename(fileio.local_path(src), fileio.local_path(dst))
    fs, path = fileio.filesystem(src)
    target = fileio.filesystem(dst)[1].rstrip("/")
    path = path.rstrip("/")
    found = fs.find(path) if fs.isdir(path) else [path]
    files = [f for f in found if f == path or f.startswith(f"{path}/")]
    if len(files) != len(found):
        raise StoreError(f"cannot move {src}: its listing names objects outside it ({found[:3]})")
    for name in files:
        fs.cp_file(name, target + name[len(path) :])
    for name in files:
        fs.rm_file(name)


def _remove(url: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if fileio.is_local(url):
            return os.remove(fileio.local_path(url))
        fs, path = fileio.filesystem(url)
        fs.rm_file(path)
