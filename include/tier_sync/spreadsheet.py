"""Spreadsheet-safe CSVs (OWASP "CSV Injection"): what people open in Excel or Sheets never evaluates.

Names, emails, phones and codes are typed at the till. A text cell that begins with `=`, `+`,
`-`, `@`, TAB, CR (or LF) is a formula to a spreadsheet, so `neutralise` puts a `'` in front of it
(after any trimming, so "\\t=1+1" stripped to "=1+1" is caught too). The prefix is also added to a
cell that already starts with `'`s followed by a trigger, which makes `raw_value` an exact inverse:
machine readers apply `raw_value` (or `read_raw_csv`, or `read_raw_columns` without pandas) to get
back what the order store holds.
Numeric cells (e.g. -12.50 in Lifetime Value) stay plain numbers. Files are UTF-8 with a BOM
(`utf-8-sig`) so Excel shows "Zoë", not "ZoÃ«"; read them back with `encoding="utf-8-sig"`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio

if TYPE_CHECKING:  # pandas is imported inside the functions: validation.py must stay light to import
    import pandas as pd

TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\n")
ENCODING = "utf-8-sig"
BOM = "\ufeff".encode()
_TRIGGER_CLASS = "[" + re.escape("".join(TRIGGERS)) + "]"
_NEEDS_PREFIX = re.compile("^'*" + _TRIGGER_CLASS)
_PREFIXED = re.compile("^'+" + _TRIGGER_CLASS)
# What a spreadsheet would evaluate: a cell starting with a trigger (the gate's check).
_UNSAFE_CELL = re.compile("^" + _TRIGGER_CLASS)
_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def neutralise(text: Any) -> Any:
    """`text` with a leading `'` when it would evaluate in a spreadsheet; non-strings unchanged."""
    if isinstance(text, str) and _NEEDS_PREFIX.match(text):
        return "'" + text
    return text


def raw_value(cell: Any) -> Any:
    """The inverse of `neutralise`: one leading `'` removed when `'`s and then a trigger follow."""
    if isinstance(cell, str) and _PREFIXED.match(cell):
        return cell[1:]
    return cell


def _is_plain_number(cell: Any) -> bool:
    return not isinstance(cell, str) or bool(_PLAIN_NUMBER.match(cell))


def safe_frame(df: pd.DataFrame, numeric_columns: Iterable[str] = ()) -> pd.DataFrame:
    """A copy of `df` with every text cell neutralised.

    Numeric-dtype columns and the cells of `numeric_columns` that are plain numbers (`-12.50`)
    are left alone; any other cell of a `numeric_columns` column is text and is neutralised.
    """
    import pandas as pd

    numeric = set(numeric_columns)
    out = df.copy()
    for name in out.columns:
        if pd.api.types.is_numeric_dtype(out[name]) or pd.api.types.is_bool_dtype(out[name]):
            continue
        col = out[name]
        if name in numeric:
            out[name] = col.map(lambda v: v if _is_plain_number(v) else neutralise(v)).astype(col.dtype)
        else:
            out[name] = col.map(neutralise).astype(col.dtype)
    return out


def to_safe_csv_bytes(df: pd.DataFrame, numeric_columns: Iterable[str] = ()) -> bytes:
    """`df` as a spreadsheet-safe CSV: UTF-8 with BOM, minimal quoting, "\\n" rows, deterministic."""
    text = safe_frame(df, numeric_columns).to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    return text.encode(ENCODING)


def read_raw_csv(data: bytes, usecols: list[str] | None = None) -> pd.DataFrame:
    """The documented raw reader: a CSV of ours, every column str, `raw_value` applied to every cell."""
    import pandas as pd

    df = pd.read_csv(
        io.BytesIO(data), dtype=str, keep_default_na=False, na_filter=False, usecols=usecols, encoding=ENCODING
    )
    return df.apply(_raw_column) if len(df.columns) else df


def read_raw_columns(data: bytes, columns: Sequence[str], *, where: str = "CSV") -> dict[str, list[str]]:
    """`read_raw_csv(data, usecols=columns)` without pandas, as column -> cells (the light tasks').

    The same cells: every one a str, `raw_value` applied, "None" and "" kept literally. A missing
    or repeated column, a row with another number of cells than the header, or no header at all
    is a ValueError naming `where` (a file we wrote never has one).
    """
    reader = csv.reader(io.StringIO(data.decode(ENCODING), newline=""))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{where} is empty: no header row")
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{where} has no column {missing} (columns: {header})")
    repeated = sorted({c for c in columns if header.count(c) > 1})
    if repeated:
        raise ValueError(f"{where} names column {repeated} more than once")
    at = [header.index(c) for c in columns]
    out: list[list[str]] = [[] for _ in columns]
    for row in reader:
        if len(row) != len(header):
            raise ValueError(f"{where} line {reader.line_num} has {len(row)} cells, the header {len(header)}")
        for values, i in zip(out, at, strict=True):
            values.append(raw_value(row[i]))
    return dict(zip(columns, out, strict=True))


def _raw_column(col: pd.Series) -> pd.Series:
    """`raw_value` of each cell; only a cell starting with "'" can change, so only those are mapped."""
    quoted = col.str.startswith("'").to_numpy(dtype=bool)
    if not quoted.any():
        return col
    out = col.copy()
    out[quoted] = col[quoted].map(raw_value)
    return out


def without_columns(data: bytes, columns: Iterable[str]) -> bytes:
    """A CSV of ours with `columns` left out; every other cell exactly as written (already safe)."""
    rows = list(csv.reader(io.StringIO(data.decode(ENCODING), newline="")))
    if not rows:
        return data
    names = set(columns)
    keep = [i for i, name in enumerate(rows[0]) if name not in names]
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerows([row[i] for i in keep] for row in rows)
    return out.getvalue().encode(ENCODING)


def unsafe_cells(source: pd.DataFrame | str | bytes, columns: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """(0-based row, column) of each text cell, as stored in the file, that a spreadsheet would evaluate.

    `source` is a frame read as str without `raw_value`, a local path or the CSV's bytes.
    Plain numbers (`-12.50`) are not formulas and are not reported.
    """
    import pandas as pd

    if isinstance(source, (str, bytes)):
        data = source if isinstance(source, bytes) else fileio.read_bytes(source)
        df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_filter=False, encoding=ENCODING)
    else:
        df = source
    names = list(df.columns) if columns is None else [c for c in columns if c in df.columns]
    found: list[tuple[int, str]] = []
    for name in names:
        for i, cell in enumerate(df[name].tolist()):
            if isinstance(cell, str) and _UNSAFE_CELL.match(cell) and not _PLAIN_NUMBER.match(cell):
                found.append((i, name))
    return sorted(found)
