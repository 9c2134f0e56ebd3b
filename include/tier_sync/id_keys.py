"""Fixed-width ids as 64-bit words: the engine's grouping and lookups of ids (clv.py).

Lightspeed ids are 36-character UUIDs, so every non-null id of a column has one byte length.
Their bytes are then read in place from the Arrow buffers as rows of uint64 words (`Words`),
hashed with whole-array numpy operations, and grouped or looked up by the 64-bit hashes, which
is several times cheaper than hashing millions of strings. Exactness never rests on the hash:
every row grouped or matched is checked against the bytes, and a collision (or a column that is
not fixed-width) falls back to Arrow's hash of the strings themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

I64 = np.ndarray[Any, np.dtype[np.int64]]

_MIX = np.uint64(0x9E3779B97F4A7C15)
# From this many rows on, hashing and sorting are split over two threads; below, threads cost more than they save.
_PARALLEL_ROWS = 1 << 20
_STEP_ROWS = 1 << 20  # rows per step of a scan that needs a temporary per row
_U64 = np.dtype(np.uint64)
T = TypeVar("T")
R = TypeVar("R")


class Words:
    """The non-null values of a text column whose values all have one byte length (Lightspeed ids
    are 36-character UUIDs) as rows of 64-bit words, read in place from the Arrow buffers (a
    strided view per chunk; the last word overlaps the one before when the length is not a
    multiple of 8). Equal words <=> equal strings, so hashing and checking them is whole-array
    numpy work instead of hashing millions of Python-visible strings."""

    def __init__(self, parts: list[list[npt.NDArray[np.uint64]]], valid: npt.NDArray[np.bool_]) -> None:
        self.parts = parts  # per chunk, one strided view per word column
        self.valid = valid  # per row of the column
        self.starts = np.cumsum([0] + [len(p[0]) for p in parts])  # valid-row number of each part
        self.width = len(parts[0]) if parts else 0

    @classmethod
    def of(cls, arr: pa.Array | pa.ChunkedArray) -> Words | None:
        """None unless every non-null value has the same length (>= 8 bytes) and nulls are empty."""
        chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
        width = -1
        parts: list[list[npt.NDArray[np.uint64]]] = []
        valids: list[npt.NDArray[np.bool_]] = []
        for chunk in chunks:
            if pa.types.is_string(chunk.type):
                offset_type: type[np.signedinteger[Any]] = np.int32
            elif pa.types.is_large_string(chunk.type):
                offset_type = np.int64
            else:
                return None
            if len(chunk) == 0:
                continue
            _, offsets_buf, data_buf = chunk.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
            lengths = np.diff(offsets)
            if chunk.null_count == 0:
                valid = np.ones(len(chunk), dtype=bool)
            else:
                valid = np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            valids.append(valid)
            rows = int(valid.sum())
            if rows == 0:
                continue
            w = int(lengths[valid][0])
            if w < 8 or (width >= 0 and w != width) or (lengths[valid] != w).any() or lengths[~valid].any():
                return None
            width = w
            at = [8 * j for j in range(w // 8)] + ([w - 8] if w % 8 else [])
            start = int(offsets[0])
            parts.append(
                [np.ndarray(shape=(rows,), dtype=_U64, buffer=data_buf, offset=start + o, strides=(w,)) for o in at]
            )
        if width < 0:
            return None
        return cls(parts, np.concatenate(valids))

    def hashes(self) -> I64:
        """A 64-bit hash of each valid row, in valid-row order (equal strings, equal hashes); the
        chunks are hashed on both cores when there are millions of rows (numpy frees the GIL)."""
        out = np.empty(int(self.starts[-1]), dtype=np.uint64)

        def hash_part(p: int) -> None:  # writes its rows of `out`
            part, lo = self.parts[p], int(self.starts[p])
            h = out[lo : lo + len(part[0])]
            h[:] = 0
            with np.errstate(over="ignore"):
                for word in part:
                    h ^= word
                    h *= _MIX
                    h ^= h >> np.uint64(31)

        _on_both_cores(hash_part, range(len(self.parts)), len(out))
        return out.view(np.int64)

    def rows(self, index: I64) -> npt.NDArray[np.uint64]:
        """The words of the given valid-row numbers, in that order."""
        ascending = bool((index[1:] >= index[:-1]).all())
        order = None if ascending else np.argsort(index, kind="stable")
        wanted = index if order is None else index[order]
        out = np.empty((len(index), self.width), dtype=np.uint64)
        bounds = np.searchsorted(wanted, self.starts)
        for p, part in enumerate(self.parts):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            if hi > lo:
                local = wanted[lo:hi] - self.starts[p]
                for j, word in enumerate(part):
                    out[lo:hi, j] = word[local]
        if order is not None:
            unsorted = np.empty_like(out)
            unsorted[order] = out
            return unsorted
        return out

    def match(self, other: npt.NDArray[np.uint64], position: I64) -> bool:
        """Whether each valid row with `position` >= 0 equals row `position` of `other` (words of
        the same width, e.g. `rows` of a small key column), compared in place, part by part."""
        for part, lo in zip(self.parts, self.starts, strict=False):
            at = position[lo : lo + len(part[0])]
            hit = at >= 0
            at = np.where(hit, at, 0)
            for j, word in enumerate(part):
                if not ((word == other[at, j]) | ~hit).all():
                    return False
        return True


def codes_exact(arr: pa.Array | pa.ChunkedArray) -> tuple[I64, int]:
    """Dense integer codes of a text column (-1 for null) and how many distinct values, by
    Arrow's hash kernel on the strings themselves."""
    encoded = pc.dictionary_encode(arr)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    if not chunks:
        return np.zeros(0, dtype=np.int64), 0
    size = len(chunks[-1].dictionary)
    if any(len(c.dictionary) != size for c in chunks):  # not one shared dictionary: be safe
        codes, uniques = pd.factorize(arr.to_pandas())
        return codes.astype(np.int64), len(uniques)
    parts = [pc.fill_null(c.indices, -1).to_numpy(zero_copy_only=False) for c in chunks]
    return np.concatenate(parts).astype(np.int64), size


def repeated(arr: pa.Array | pa.ChunkedArray) -> tuple[I64, I64, int]:
    """The rows whose (non-null) value occurs more than once, dense codes of their values among
    them, and how many such values. Every other non-null row holds a value of its own.

    Fixed-width ids: sort the 64-bit hashes (a plain sort, several times cheaper than an argsort)
    to find the hashes that repeat, then pick their rows through a bit table of those hashes,
    checking their bytes; in a daily store most ids have one version.
    """
    words = Words.of(arr)
    if words is not None:
        h = words.hashes()
        dup = _repeated_hashes(h)
        if len(dup) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
        cand, codes = _rows_of(h, dup)
        ref = np.empty(len(dup), dtype=np.int64)
        ref[codes] = np.arange(len(codes), dtype=np.int64)
        found = words.rows(cand)  # each candidate's bytes, and (by index) those of its value's first row
        if bool((found == found[ref[codes]]).all()):
            return np.flatnonzero(words.valid)[cand], codes, len(dup)
        log.warning("id hash collision: using the exact string hash (slower)")
    all_codes, size = codes_exact(arr)
    counts = np.bincount(all_codes[all_codes >= 0], minlength=size)
    rows = np.flatnonzero((all_codes >= 0) & (counts[np.maximum(all_codes, 0)] > 1))
    dense, uniques = pd.factorize(all_codes[rows])
    return rows, np.asarray(dense, dtype=np.int64), len(uniques)


def _repeated_hashes(h: I64) -> I64:
    """The values that occur more than once in `h`, each once, ascending. Negative and
    non-negative hashes cannot be equal, so the two sides are sorted apart, one per core."""
    sides = [h[h < 0], h[h >= 0]] if len(h) >= _PARALLEL_ROWS else [h.copy()]  # copies: sorted in place

    def repeats(side: I64) -> I64:
        side.sort()
        dup = side[1:][side[1:] == side[:-1]]
        return dup[np.concatenate(([True], dup[1:] != dup[:-1]))] if len(dup) else dup  # each once

    return np.concatenate(_on_both_cores(repeats, sides, len(h)))


def _on_both_cores(work: Callable[[T], R], items: Sequence[T], rows: int) -> list[R]:
    """[work(item) for item in items], on two threads when the column is large (numpy frees the GIL)."""
    if rows < _PARALLEL_ROWS or len(items) < 2:
        return [work(item) for item in items]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(work, items))


def _rows_of(h: I64, wanted: I64) -> tuple[I64, I64]:
    """The rows of `h` whose value is among the (unique) `wanted`, ascending, and the index of
    that value in `wanted`. A bit table of the wanted values' low bits rules out almost every row
    with one gather; only the few left are looked up in a hash index."""
    bits = min(max(int(len(wanted)).bit_length() + 4, 16), 28)
    # The table is indexed by the hash's top bits: the multiply in Words.hashes carries every byte
    # into them, while the low bits of ids that differ only in their last characters barely differ.
    shift = np.uint64(64 - bits)
    table = np.zeros(1 << bits, dtype=bool)
    table[wanted.view(np.uint64) >> shift] = True
    near = _marked_rows(h, table, shift)
    del table
    at = np.asarray(pd.Index(wanted).get_indexer(h[near]), dtype=np.int64)
    hit = at >= 0
    return near[hit].astype(np.int64), at[hit]


def _marked_rows(h: I64, table: npt.NDArray[np.bool_], shift: np.uint64) -> I64:
    """The rows whose hash's top bits are marked in `table`, ascending; a million rows at a time
    (no whole-column temporary), on both cores when there are millions."""
    step = _STEP_ROWS

    def scan(lo: int) -> I64:
        return np.flatnonzero(table[h[lo : lo + step].view(np.uint64) >> shift]) + lo

    found = _on_both_cores(scan, range(0, len(h), step), len(h))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


class Lookup:
    """Positions of values among unique keys (the live customer ids), built once and applied to
    a column or to each dictionary of a dictionary column."""

    def __init__(self, keys: pa.Array | pa.ChunkedArray) -> None:
        self.keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        self.words = Words.of(self.keys)
        self.index: pd.Index | None = None
        self.dense: npt.NDArray[np.uint64] | None = None
        # Dictionary (by its buffers) -> (that dictionary, its keys' positions). The batches of one
        # Parquet row group share its dictionary, and a reader's `each` sees them one call at a
        # time: each dictionary is looked up once, not once per batch (on the bench store, 6
        # lookups of ~100,000 ids instead of 42). The dictionary is kept so its buffers' addresses
        # cannot be reused by another one while the entry exists.
        self._done: dict[tuple[int, ...], tuple[pa.Array, pa.Array]] = {}
        if self.words is not None and self.words.valid.all():
            index = pd.Index(self.words.hashes())
            if index.is_unique:
                self.index = index
                self.dense = self.words.rows(np.arange(len(index), dtype=np.int64))

    def __call__(self, values: pa.Array | pa.ChunkedArray) -> I64:
        """For each value, the position of the equal key, -1 for null or absent."""
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        if any(pa.types.is_dictionary(c.type) for c in chunks):
            parts = []
            for c in chunks:
                if pa.types.is_dictionary(c.type):
                    d = c.dictionary
                    key = (d.offset, len(d), *(b.address if b is not None else 0 for b in d.buffers()))
                    if key not in self._done:
                        self._done[key] = (d, pa.array(self(d)))
                    parts.append(ints(pc.take(self._done[key][1], c.indices), len(c)))
                else:
                    parts.append(self(c))
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        vw = Words.of(values)
        same_width = vw is not None and self.words is not None and vw.width == self.words.width
        if vw is not None and self.index is not None and self.dense is not None and same_width:
            found = np.asarray(self.index.get_indexer(vw.hashes()), dtype=np.int64)
            if vw.match(self.dense, found):
                pos = np.full(len(vw.valid), -1, dtype=np.int64)
                pos[vw.valid] = found
                return pos
            log.warning("id hash collision: using the exact string lookup (slower)")
        return ints(pc.index_in(values, value_set=self.keys), len(values))


def index_in(values: pa.Array | pa.ChunkedArray, keys: pa.Array | pa.ChunkedArray) -> I64:
    """For each value, the position of the equal key (keys are unique), -1 for null or absent.
    Fixed-width ids: by their 64-bit hashes, every match checked against the bytes; a
    dictionary column is looked up one dictionary at a time and taken by index."""
    return Lookup(keys)(values)


def ints(arr: pa.Array | pa.ChunkedArray, n: int) -> I64:
    """An Arrow integer result as int64 numpy, null as -1."""
    out = np.asarray(pc.fill_null(arr, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return out if len(out) == n else np.full(n, -1, dtype=np.int64)
