"""The master CSV, tier history and tier changes, and the `compute_tiers` task body.

Outputs must be reproducible: a re-run or backfill of a run writes byte-identical files. So the
CSV holds nothing but the run's as-of view (no wall-clock time), rows are sorted by Customer ID,
and "Previous Tier" comes from the newest run published before this run's key (ledger.previous_run,
not from whatever file is newest). Publishing is the ledger's serialized step: the shared "latest"
copies are only replaced by the latest run, so a backfill never rolls them back.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.tier_sync import fileio, ledger, spreadsheet
from include.tier_sync.clv import (
    I64,
    NAT,
    QUARANTINED_ATTR,
    US_PER_DAY,
    arrow_strings,
    as_of_us,
    checked_sales,
    compute_customer_metrics,
    customer_metrics,
    customer_positions,
    live_customers,
)
from include.tier_sync.ledger import run_key
from include.tier_sync.rules import ALL_TIERS, NO_TIER, TierRules
from include.tier_sync.runtime import iso, to_utc

if TYPE_CHECKING:
    from include.tier_sync.ledger import RunPaths

log = logging.getLogger(__name__)

# Sales columns read as dictionaries (Parquet's dictionary pages: indices, not millions of strings;
# the store writes them so, store._DICTIONARY_COLUMNS); customer ids become positions as each
# segment is read, each distinct id looked up once per dictionary.
SALES_DICTIONARY = ("status", "state", "customer_id")

MASTER_COLUMNS: tuple[str, ...] = (
    "Customer ID",
    "Customer Code",
    "Name",
    "Email",
    "Phone",
    "Lifetime Value",
    "Order Count",
    "Avg Order Value",
    "First Order",
    "Last Order",
    "Days Since Last Order",
    "Purchases Last 30 Days",
    "Loyalty Member",
    "Tier",
    "Previous Tier",
    "Tier Changed At",
    "Last Updated",
)
# Who the customer is and how to reach them: left out of the git copy when the Variable
# tier_sync_git_without_contacts is true (the data dir keeps the full master).
CONTACT_COLUMNS: tuple[str, ...] = ("Name", "Email", "Phone")
CHANGES_COLUMNS: tuple[str, ...] = ("Customer ID", "From", "To", "as_of")
HISTORY_COLUMNS: tuple[str, ...] = ("as_of", "run_id", "tier", "count")
_TEXT_COLUMNS = ("Customer ID", "Customer Code", "Name", "Email", "Phone")
_STR = pd.StringDtype("pyarrow", na_value=np.nan)  # pandas' default str, backed by Arrow
# Columns written as plain numbers (never "'"-prefixed, e.g. a refund's -12.50); "count" is tier_history's.
NUMERIC_COLUMNS: tuple[str, ...] = (
    "Lifetime Value",
    "Order Count",
    "Avg Order Value",
    "Days Since Last Order",
    "Purchases Last 30 Days",
    "count",
)


class StoreReader(Protocol):
    """What compute_tiers needs from the order store (an `OrderStore`'s `read_table`, returning
    Arrow, is used instead of `read` when the store has it: no pandas copy of millions of sales)."""

    def read(self, resource: str) -> pd.DataFrame: ...


def _cents_text(cents: I64) -> pa.Array:
    """Vectorised money.format_cents as Arrow strings: -1234 -> "-12.34"."""
    cents = np.asarray(cents, dtype=np.int64)
    magnitude = np.abs(cents)
    whole = pc.cast(pa.array(magnitude // 100), pa.string())
    frac = pc.utf8_lpad(pc.cast(pa.array(magnitude % 100), pa.string()), 2, "0")
    sign = pc.if_else(pa.array(cents < 0), "-", "")
    return pc.binary_join_element_wise(sign, whole, ".", frac, "")


def format_cents_array(cents: I64) -> np.ndarray[Any, np.dtype[np.object_]]:
    """Vectorised money.format_cents: -1234 -> "-12.34"."""
    return np.asarray(_cents_text(cents).to_numpy(zero_copy_only=False), dtype=object)


def div_half_up(num: I64, den: I64) -> I64:
    """Integer num/den rounded half away from zero (as money.to_cents rounds); den must be > 0."""
    q = (2 * np.abs(num) + den) // (2 * den)
    return np.where(num < 0, -q, q).astype(np.int64)


def _ints_text(values: I64, present: npt.NDArray[np.bool_] | None = None) -> pa.Array:
    """Integers as decimal text ("" where not `present`)."""
    text = pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.string())
    return text if present is None else pc.if_else(pa.array(present), text, "")


def _instants_text(us: I64) -> pa.Array:
    """Microsecond instants as ISO-8601 UTC `YYYY-MM-DDTHH:MM:SSZ` (the second floored); NaT as "".

    The civil date comes from integer arithmetic on the day number (H. Hinnant's days-to-civil
    algorithm) and every digit is written straight into an Arrow string buffer: several times
    cheaper than numpy's datetime formatting. Years outside 0000-9999 go the plain way."""
    us = np.asarray(us, dtype=np.int64)
    valid = us != NAT
    seconds = us[valid] // 1_000_000  # floor, also before 1970
    days, second_of_day = np.divmod(seconds, 86_400)
    year, month, day = _civil(days)
    if len(year) and (int(year.min()) < 0 or int(year.max()) > 9999):
        iso_text = np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s")
        text = np.full(len(us), "", dtype=object)
        text[valid] = np.char.add(iso_text, "Z")
        return pa.array(text.tolist(), type=pa.string())
    hour, rest = np.divmod(second_of_day, 3600)
    minute, second = np.divmod(rest, 60)
    codes = np.empty((len(seconds), 20), dtype=np.uint8)
    for at, value, width in ((0, year, 4), (5, month, 2), (8, day, 2), (11, hour, 2), (14, minute, 2), (17, second, 2)):
        for k in range(width):
            codes[:, at + width - 1 - k] = value // 10**k % 10 + ord("0")
    for at, char in ((4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":"), (19, "Z")):
        codes[:, at] = ord(char)
    offsets = np.zeros(len(us) + 1, dtype=np.int32)
    np.cumsum(np.where(valid, 20, 0), out=offsets[1:])
    return pa.StringArray.from_buffers(len(us), pa.py_buffer(offsets), pa.py_buffer(codes.tobytes()))


def _civil(days: I64) -> tuple[I64, I64, I64]:
    """(year, month, day) of days since 1970-01-01, proleptic Gregorian (Hinnant's civil_from_days)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    return yoe + era * 400 + (month <= 2), month, day


def _clean_text(col: pd.Series | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Text for the CSV (null as ""): a bare CR becomes LF.

    Python 3.11's csv writer quotes a field with "\\n" but not one with a lone "\\r" when the line
    terminator is "\\n"; readers then take that CR for a row break. LF inside quotes is safe.
    """
    arr = arrow_strings(col) if isinstance(col, pd.Series) else col
    arr = pc.fill_null(arr.cast(pa.string()), "")
    return pc.replace_substring(pc.replace_substring(arr, "\r\n", "\n"), "\r", "\n")


def _str_column(arr: pa.Array | pa.ChunkedArray) -> pd.Series:
    """An Arrow string array as a pandas "str" column without copying (to_csv_bytes writes it as is)."""
    return pd.Series(pd.array(arr, dtype=_STR))


def build_master(metrics: pd.DataFrame, previous: pd.DataFrame | None, as_of: datetime) -> pd.DataFrame:
    """The master CSV table (all columns str, MASTER_COLUMNS order, sorted by Customer ID).

    `previous` is the previous run's master (at least Customer ID, Tier, Tier Changed At) or None.
    Previous Tier is the previous run's tier ("" when the customer was not in it); Tier Changed At
    is `as_of` when the tier differs from that (a new customer changes only if their tier is not
    "None"), else carried from the previous row. Built with Arrow kernels: no Python string per cell.
    """
    as_of_iso = iso(as_of)
    cut = as_of_us(as_of)
    m = metrics
    if not m["customer_id"].astype("str").is_monotonic_increasing:
        m = m.sort_values("customer_id", kind="stable", ignore_index=True)
    ltv = m["lifetime_value_cents"].to_numpy(dtype=np.int64)
    count = m["order_count"].to_numpy(dtype=np.int64)
    last = m["last_order_us"].to_numpy(dtype=np.int64)
    has_order = count > 0
    avg = pc.if_else(pa.array(has_order), _cents_text(div_half_up(ltv, np.maximum(count, 1))), "")
    tier = pa.array(m["tier"].astype("str").to_numpy(dtype=object), type=pa.string())
    raw_ids = arrow_strings(m["customer_id"].astype("str"))

    n = len(m)
    if previous is not None and len(previous):
        prev = previous.drop_duplicates("Customer ID", keep="last")
        at = pc.index_in(raw_ids, value_set=arrow_strings(prev["Customer ID"].astype("str")))
        prev_tier = pc.take(arrow_strings(prev["Tier"].astype("str")), at)
        prev_changed = pc.take(arrow_strings(prev["Tier Changed At"].astype("str")), at)
        known = pc.is_valid(prev_tier)  # a previous row without a tier: treated as a new customer
    else:
        prev_tier = prev_changed = pa.nulls(n, pa.string())
        known = pa.array(np.zeros(n, dtype=bool))
    prev_tier_text = pc.fill_null(prev_tier, "")
    changed = pc.if_else(known, pc.not_equal(prev_tier_text, tier), pc.not_equal(tier, NO_TIER))
    as_of_text = pc.fill_null(pa.nulls(n, pa.string()), as_of_iso)
    jobs = {"Customer ID": lambda: _clean_text(raw_ids), **_text_jobs(m), **_number_jobs(m, ltv, count, last, cut)}
    with ThreadPoolExecutor(2) as pool:  # column by column on both cores (numpy and Arrow kernels free the GIL)
        running = {name: pool.submit(job) for name, job in jobs.items()}
        columns = {name: job.result() for name, job in running.items()}
    columns.update({
        "Avg Order Value": avg,
        "Loyalty Member": pc.if_else(pa.array(m["loyalty_member"].to_numpy(dtype=bool)), "true", "false"),
        "Tier": tier,
        "Previous Tier": prev_tier_text,
        "Tier Changed At": pc.if_else(changed, as_of_text, pc.fill_null(prev_changed, "")),
        "Last Updated": as_of_text,
    })  # fmt: skip
    return pd.DataFrame({name: _str_column(columns[name]) for name in MASTER_COLUMNS})


_TEXT_SOURCES = {"Customer Code": "customer_code", "Name": "name", "Email": "email", "Phone": "phone"}


def _text_jobs(m: pd.DataFrame) -> dict[str, Callable[[], Any]]:
    """The master's text columns from the customer, each as a job for build_master's pool."""
    def job(source: str) -> Callable[[], Any]:
        return lambda: _clean_text(m[source])

    return {column: job(source) for column, source in _TEXT_SOURCES.items()}


def _number_jobs(m: pd.DataFrame, ltv: I64, count: I64, last: I64, cut: int) -> dict[str, Callable[[], Any]]:
    """The master's money, count and date columns as text, each as a job for build_master's pool."""
    first = m["first_order_us"].to_numpy(dtype=np.int64)
    window = m["purchases_in_window"].to_numpy(dtype=np.int64)
    return {
        "Lifetime Value": lambda: _cents_text(ltv),
        "Order Count": lambda: _ints_text(count),
        "First Order": lambda: _instants_text(first),
        "Last Order": lambda: _instants_text(last),
        "Days Since Last Order": lambda: _ints_text((cut - last) // US_PER_DAY, last != NAT),
        "Purchases Last 30 Days": lambda: _ints_text(window),
    }


def tier_changes(master: pd.DataFrame, as_of: datetime) -> pd.DataFrame:
    """Customers whose tier changed in this run (Tier Changed At == as_of): Customer ID, From, To, as_of."""
    changed = master.loc[master["Tier Changed At"] == iso(as_of), ["Customer ID", "Previous Tier", "Tier"]]
    return pd.DataFrame(  # str columns (Arrow-backed in pandas 3): to_csv_bytes writes them as they are
        {
            "Customer ID": changed["Customer ID"].astype(_STR).array,
            "From": changed["Previous Tier"].astype(_STR).array,
            "To": changed["Tier"].astype(_STR).array,
            "as_of": pd.array([iso(as_of)] * len(changed), dtype=_STR),
        },
        columns=list(CHANGES_COLUMNS),
    )


def tier_breakdown(master: pd.DataFrame) -> dict[str, int]:
    """Customers per tier, every tier present (zeros included), in ALL_TIERS order."""
    counts = master["Tier"].value_counts()
    return {t: int(counts.get(t, 0)) for t in ALL_TIERS}


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    """Spreadsheet-safe (spreadsheet.py: text cells that would evaluate get a leading "'", numbers
    stay plain), UTF-8 with BOM, minimal quoting, "\\n" rows: the same frame always gives the same bytes.

    A frame of text columns (the master, tier changes, tier history) is written column by column
    with Arrow's string kernels, byte for byte what `spreadsheet.to_safe_csv_bytes` writes
    (tests/unit/test_master_csv.py compares them) at a fraction of the time of a per-cell
    Python pass; any other frame goes through `spreadsheet.to_safe_csv_bytes` itself.
    """
    fast = _columnar_safe_csv(df, NUMERIC_COLUMNS)
    return fast if fast is not None else spreadsheet.to_safe_csv_bytes(df, numeric_columns=NUMERIC_COLUMNS)


# spreadsheet.neutralise's test as bytes: the first byte is a trigger (all ASCII), or a "'" that
# RE2 (Arrow's regex engine) then checks; _is_plain_number in RE2: \p{Nd} is Python's Unicode
# \d, and Python's "$" also matches before one final "\n".
_TRIGGER_BYTES = np.zeros(256, dtype=bool)
_TRIGGER_BYTES[[ord(c) for c in spreadsheet.TRIGGERS]] = True
_RE2_NEEDS_PREFIX = "^'+[" + "".join("\\" + c if c in "-]\\^[" else c for c in spreadsheet.TRIGGERS) + "]"
_RE2_PLAIN_NUMBER = "^-?\\p{Nd}+(\\.\\p{Nd}+)?\n?$"
# What csv.writer(QUOTE_MINIMAL, lineterminator="\n") quotes on Python 3.11: the delimiter, the
# quote character and the line terminator's characters (a lone "\r" is not quoted: _clean_text).
_QUOTE_CHARS = (",", '"', "\n")


def _columnar_safe_csv(df: pd.DataFrame, numeric_columns: tuple[str, ...]) -> bytes | None:
    """`df` as spreadsheet.to_safe_csv_bytes would write it, or None when a column is not all
    text, a header is not a string, or there are fewer than two columns (csv quotes a lone
    empty field)."""

    if len(df.columns) < 2 or not all(isinstance(c, str) for c in df.columns):
        return None
    arrays = []
    for name in df.columns:
        col = df[name]
        if col.dtype != object and not isinstance(col.dtype, pd.StringDtype):
            return None
        try:
            if isinstance(col.dtype, pd.StringDtype) and col.dtype.storage == "pyarrow":
                arr = pa.array(col.array).cast(pa.string())  # pandas' Arrow-backed str: no Python strs
            else:
                arr = pa.array(col.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            return None
        arrays.append((arr, name in numeric_columns))
    header = _quoted(pa.array(list(df.columns), type=pa.string())).to_pylist()
    head = (",".join(header) + "\n").encode("utf-8")
    if len(df) == 0:
        return spreadsheet.BOM + head
    # Each half of the rows on its own core, every column and the joining of the lines (numpy and
    # Arrow free the GIL): a cell's text depends on that cell only, so the halves are independent.
    half = (len(df) + 1) // 2
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda lo: _csv_lines(arrays, lo, half), (0, half)))
    return b"".join([spreadsheet.BOM, head, *parts])


def _csv_lines(arrays: list[tuple[Any, bool]], offset: int, length: int) -> bytes:
    """Rows offset .. offset+length of the columns as CSV lines, each ending in "\n"."""
    fields = [_quoted(_neutralised(arr.slice(offset, length), plain_numbers=plain)) for arr, plain in arrays]
    if not fields or len(fields[0]) == 0:
        return b""
    # One pass: field, ",", field, ..., field, "\n" joined with "" (scalars broadcast).
    pieces: list[Any] = []
    for field in fields:
        pieces += [field, ","]
    pieces[-1] = "\n"
    data, offsets = _string_buffers(pc.binary_join_element_wise(*pieces, ""))
    return data[int(offsets[0]) : int(offsets[-1])].tobytes()


def _string_buffers(arr: Any) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], np.ndarray[Any, np.dtype[np.int32]]]:
    """The UTF-8 bytes and the offsets of a string array (one chunk), in place."""

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return data, offsets


def _neutralised(arr: Any, *, plain_numbers: bool) -> Any:
    """spreadsheet.neutralise of every cell (nulls written as ""); with `plain_numbers`, cells that
    are plain numbers are left alone (spreadsheet.safe_frame's numeric columns)."""

    arr = pc.fill_null(arr, "")
    data, offsets = _string_buffers(arr)
    starts, lengths = offsets[:-1], np.diff(offsets)
    first = np.where(lengths > 0, data[np.minimum(starts, max(len(data) - 1, 0))] if len(data) else 0, 0)
    prefix = (lengths > 0) & _TRIGGER_BYTES[first]
    quoted = np.flatnonzero((lengths > 0) & (first == ord("'")))
    if len(quoted):
        prefix[quoted] = np.asarray(
            pc.match_substring_regex(arr.take(pa.array(quoted)), _RE2_NEEDS_PREFIX).to_numpy(zero_copy_only=False),
            dtype=bool,
        )
    if plain_numbers and prefix.any():
        suspects = np.flatnonzero(prefix)
        plain = pc.match_substring_regex(arr.take(pa.array(suspects)), _RE2_PLAIN_NUMBER)
        prefix[suspects[np.asarray(plain.to_numpy(zero_copy_only=False), dtype=bool)]] = False
    if not prefix.any():
        return arr
    return pc.if_else(pa.array(prefix), pc.binary_join_element_wise("'", arr, ""), arr)


def _quoted(arr: Any) -> Any:
    """csv.QUOTE_MINIMAL of each cell: in double quotes, inner quotes doubled, when it needs them."""

    data, offsets = _string_buffers(arr)
    body = data[int(offsets[0]) : int(offsets[-1])].tobytes() if len(offsets) else b""
    if not any(c.encode() in body for c in _QUOTE_CHARS):
        return arr
    needs = pc.match_substring(arr, _QUOTE_CHARS[0])
    for c in _QUOTE_CHARS[1:]:
        needs = pc.or_(needs, pc.match_substring(arr, c))
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(arr, '"', '""'), '"', "")
    return pc.if_else(needs, quoted, arr)


def read_csv_str(url: str, usecols: list[str] | None = None) -> pd.DataFrame:
    """A CSV we wrote, every column as str, "None"/"" kept literally, every cell its raw value
    (spreadsheet.raw_value: the "'" that neutralised a formula-like cell removed)."""
    return spreadsheet.read_raw_csv(fileio.read_bytes(url), usecols=usecols)


def previous_run_master(paths: RunPaths) -> str | None:
    """The master CSV published by the newest earlier run, if any (never an unvalidated one)."""
    found = ledger.previous_run(paths)
    return found[1] if found else None


def upsert_tier_history(url: str, as_of: datetime, run_id: str, breakdown: dict[str, int]) -> pd.DataFrame:
    """Replace this as_of's rows in tier_history.csv with one row per tier; rows sorted by as_of."""
    as_of_iso = iso(as_of)
    rows = pd.DataFrame(
        {
            "as_of": as_of_iso,
            "run_id": run_id,
            "tier": list(breakdown),
            "count": [str(v) for v in breakdown.values()],
        },
        columns=list(HISTORY_COLUMNS),
    )
    if fileio.exists(url):
        old = read_csv_str(url)
        same_day = old.loc[old["as_of"] == as_of_iso]
        counts = dict(zip(same_day["tier"], same_day["count"], strict=True))
        if counts == dict(zip(rows["tier"], rows["count"], strict=True)):
            # A rerun that reproduces the same counts leaves the file byte-identical (keeping the
            # run id that first wrote them), so the git commit step sees no change.
            return old
        old = old.loc[old["as_of"] != as_of_iso, list(HISTORY_COLUMNS)]
        rows = pd.concat([old, rows], ignore_index=True)
    rows = rows.sort_values("as_of", kind="stable", ignore_index=True)
    fileio.write_bytes(url, to_csv_bytes(rows))
    return rows


def _previous_master(paths: RunPaths) -> tuple[str | None, pd.DataFrame | None]:
    """The previous validated run's master (its URL, and the columns build_master needs), if any."""
    url = previous_run_master(paths)
    return url, read_csv_str(url, usecols=["Customer ID", "Tier", "Tier Changed At"]) if url else None


def _metrics(store: StoreReader, as_of: datetime, rules: TierRules) -> pd.DataFrame:
    """compute_customer_metrics over the store; an OrderStore is read as Arrow."""
    read_table = getattr(store, "read_table", None)
    if not callable(read_table):
        customers = store.read("customers")
        return compute_customer_metrics(store.read("sales"), customers, as_of, rules)
    # An OrderStore: Arrow, customer ids turned into positions as read; the live customers are
    # worked out on a second thread while the first sales are decoded.
    customers = read_table("customers")
    with ThreadPoolExecutor(1) as pool:
        found = pool.submit(live_customers, customers, as_of)
        sales = read_table("sales", dictionary=SALES_DICTIONARY, each=customer_positions(lambda: found.result()["id"]))
        live = found.result()
    release_freed_memory()  # the batches' customer id strings are gone: before the engine runs
    qualifying = checked_sales(sales, live["id"].astype("str"), as_of, rules)
    del sales  # only the qualifying sales' figures are needed from here: the table's memory goes back
    release_freed_memory()
    return customer_metrics(live, qualifying, as_of, rules)


def release_freed_memory() -> None:
    """Hand memory freed by the last step back to the system, so the next step's peak does not
    sit on top of it: Arrow's pool (jemalloc keeps freed pages for seconds) and, on glibc, the C
    heap (numpy's temporaries, kept in one arena per thread). On the bench store the master's
    formatting then peaks about 0.15 GiB lower (bench/transform.py)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, from the symbols the interpreter already has loaded; None elsewhere
    (musl, macOS): the memory is then kept a while, not lost."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def use_jemalloc() -> None:
    """Arrow's jemalloc pool for the engine, unless the deployer chose one (ARROW_DEFAULT_MEMORY_POOL).

    Reading the order store allocates about a gigabyte in a few seconds. Arrow's default mimalloc
    pool spends more time in the kernel than in decoding on that pattern: on the 200k-customer
    bench store it took 2.8 s of system time against 0.9 s under jemalloc, for the same peak RSS
    (bench/transform.py). Buffers keep the pool that allocated them, so switching is safe at any time.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or pa.default_memory_pool().backend_name == "jemalloc":
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc: slower, not wrong
        log.info("pyarrow has no jemalloc pool here: the order store is read with %s",
                 pa.default_memory_pool().backend_name)


def compute_tiers(
    store: StoreReader, paths: RunPaths, identity: dict[str, Any], rules: TierRules
) -> dict[str, Any]:
    """Task body of compute_tiers: store -> metrics -> the run folder's master CSV and changes.

    Nothing leaves the run folder here: the tier history and the stable "latest" copies are
    written by publish_run once validation has passed. Returns the XCom dict of
    docs/contracts.md (plus `previous_run`, the previous validated run's master).
    """
    as_of = to_utc(identity.get("as_of") or paths.as_of)
    if run_key(as_of) != paths.key:
        raise ValueError(f"identity as_of {iso(as_of)} does not match the run paths' {paths.key}")
    use_jemalloc()

    with ThreadPoolExecutor(1) as pool:  # the previous master is read while the engine runs
        earlier = pool.submit(_previous_master, paths)
        metrics = _metrics(store, as_of, rules)
        prev_url, previous = earlier.result()
    release_freed_memory()  # the per-customer figures' temporaries are gone too: before the CSVs
    master = build_master(metrics, previous, as_of)
    with ThreadPoolExecutor(1) as pool:  # the master is formatted and written while the changes are worked out
        written = pool.submit(lambda: fileio.write_bytes(paths.run_master_csv, to_csv_bytes(master)))
        changes = tier_changes(master, as_of)
        breakdown = tier_breakdown(master)
        changes_csv = to_csv_bytes(changes)
        written.result()
    fileio.write_bytes(paths.run_tier_changes, changes_csv)

    log.info(
        "compute_tiers as of %s: %d customers, %d tier changes, breakdown %s, previous validated run %s",
        iso(as_of),
        len(master),
        len(changes),
        breakdown,
        prev_url,
    )
    return {
        "as_of": iso(as_of),
        "master_csv": paths.run_master_csv,
        "run_dir": paths.run_dir,
        "total_customers": len(master),
        "tier_breakdown": breakdown,
        "changes": len(changes),
        "previous_run": prev_url,
        # Sales left out as implausible (tier_sync_rules implausible_amounts = "quarantine").
        "quarantined_sales": list(metrics.attrs.get(QUARANTINED_ATTR, [])),
    }


def publish_run(paths: RunPaths, identity: dict[str, Any], breakdown: dict[str, int]) -> bool:
    """After validation passed, as one serialized step (ledger.publishing): keep the run's master
    as what it published, record the day in tier_history.csv and, for the latest run, copy the
    master CSV and tier changes to their stable paths and stamp latest.json. Returns whether this
    run became "latest". Nothing unvalidated ever reaches the stable paths or the history.
    """
    with ledger.publishing(paths):
        ledger.record_published(paths, identity, breakdown)
        upsert_tier_history(paths.tier_history, paths.as_of, str(identity.get("run_id") or ""), breakdown)
        if not ledger.is_newest_run(paths):
            log.info("Run %s is older than the newest published run; stable copies left alone", paths.key)
            return False
        fileio.copy(paths.run_master_csv, paths.master_csv)
        fileio.copy(paths.run_tier_changes, paths.tier_changes)
        fileio.write_json(paths.latest_json, {"as_of": iso(paths.as_of), "run_id": identity.get("run_id")})
        return True
