"""Reading the data dir's files once per version, for the "Loyalty tiers" page (dashboard.py).

The page must stay fast with 200,000 customers, so every file it reads is parsed once per version:
this module gives each file a signature that changes whenever the file does - its mtime/size
(local) or its etag/mtime/size (object storage) - and keeps one parsed value per (kind, file),
replaced when the signature changes. Listings of runs/ (an ls on object storage) and the
Variables the api-server resolves are reused for a few seconds instead. `clear_cache` forgets all
of it.

No heavy module (pandas, numpy, pyarrow) at module level: the Airflow plugin imports this
(through dashboard.py) when the api-server starts; pandas is imported inside `read_csv`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from include.tier_sync import fileio, ledger

T = TypeVar("T")

LISTING_TTL_S = 10.0  # how long a listing of runs/ (an ls on object storage) is reused
SETTINGS_TTL_S = 30.0  # how long a resolved data dir / rule set is reused


# -- Variables ---------------------------------------------------------------------------------------


_settings_cache: dict[str, tuple[float, str | None]] = {}


def variable(name: str) -> str | None:
    """A Variable as the api-server sees it (settings.variable), cached for SETTINGS_TTL_S."""
    now = time.monotonic()
    hit = _settings_cache.get(name)
    if hit is not None and now - hit[0] < SETTINGS_TTL_S:
        return hit[1]
    from include.tier_sync import settings

    value = settings.variable(name)
    _settings_cache[name] = (now, value)
    return value


# -- file signatures and the cache -------------------------------------------------------------------

_SIGNATURE_KEYS = (
    "ETag",
    "etag",
    "md5",
    "mtime",
    "LastModified",
    "last_modified",
    "updated",
    "created",
    "size",
)

_lock = threading.RLock()
_cache: dict[tuple[str, str], tuple[Any, Any]] = {}
_ttl_cache: dict[tuple[str, str], tuple[float, Any]] = {}


def signature(url: str) -> tuple[str, ...] | None:
    """Something that changes whenever the file does; None when it does not exist."""
    if fileio.is_local(url):
        try:
            st = os.stat(fileio.local_path(url))
        except FileNotFoundError:
            return None
        return (str(st.st_mtime_ns), str(st.st_size))
    fs, path = fileio.filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    return tuple(f"{k}={info[k]}" for k in _SIGNATURE_KEYS if info.get(k) is not None)


_loading: dict[tuple[str, str], threading.Lock] = {}


def cached(kind: str, url: str, key: Any, load: Callable[[], T]) -> T:
    """`load()` once per (kind, url, key); a new key (a new file version) replaces the old entry.

    Concurrent requests for the same entry wait for one load instead of each parsing the file
    (two page loads right after a run must not double the memory the parse needs).
    """
    with _lock:
        hit = _cache.get((kind, url))
        if hit is not None and hit[0] == key:
            value: T = hit[1]
            return value
        loading = _loading.setdefault((kind, url), threading.Lock())
    with loading:
        with _lock:
            hit = _cache.get((kind, url))
            if hit is not None and hit[0] == key:
                done: T = hit[1]
                return done
        value = load()
        with _lock:
            _cache[(kind, url)] = (key, value)
    return value


def ttl_cached(kind: str, url: str, ttl: float, load: Callable[[], T]) -> T:
    """`load()` at most once per `ttl` seconds per (kind, url), for what has no file signature."""
    now = time.monotonic()
    with _lock:
        hit = _ttl_cache.get((kind, url))
        if hit is not None and now - hit[0] < ttl:
            value: T = hit[1]
            return value
    value = load()
    with _lock:
        _ttl_cache[(kind, url)] = (now, value)
    return value


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _ttl_cache.clear()
        _settings_cache.clear()


# -- readers -----------------------------------------------------------------------------------------


def read_json(url: str) -> Any:
    """A JSON file the pipeline wrote, parsed once per version; None when it does not exist."""
    sig = signature(url)
    if sig is None:
        return None
    return cached("json", url, sig, lambda: json.loads(fileio.read_text(url)))


def read_csv(url: str, usecols: list[str] | None = None) -> Any:
    """A CSV the pipeline wrote, all columns str, "None"/"" literal."""
    from include.tier_sync.master_csv import read_csv_str

    return read_csv_str(url, usecols=usecols)


def run_keys(data_dir: str) -> list[str]:
    """The ledger's run keys, oldest first (future ones ignored); listing reused for a few seconds."""

    return ttl_cached("runs", data_dir, LISTING_TTL_S, lambda: ledger.list_run_keys(data_dir))
