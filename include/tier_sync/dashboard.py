"""What the "Loyalty tiers" page in the Airflow UI shows, computed from the files the pipeline writes.

Pure functions over a data dir (a local folder or any fsspec URL): no Airflow, no writes. The
page must stay fast with 200,000 customers, so the big files (the master CSV, the per-run tier
changes, the order store's sales) are parsed once per version of the file - the cache is keyed
by the file's mtime/size (local) or its etag/mtime/size (object storage) - and the API only ever
returns aggregates, one page of a list, or the few customers a search matched.

Heavy modules (pandas, numpy, pyarrow) are imported inside the functions that need them: the
Airflow plugin imports this module when the api-server starts.

"At risk" (docs/tier-rules.md): a customer whose tier is Sprout only because of the 30-day purchase
rule (Purchases Last 30 Days >= 3 while Lifetime Value is below the Sprout threshold) drops to Seed
(loyalty member) or First Time Buyer as soon as their third-newest purchase in the window leaves
it. The date is exact: it comes from the sale dates in the order store, taken through the same
as-of view the engine uses. Only when the store cannot be read (or disagrees with the CSV) is it
approximated from the CSV's Last Order as "at the latest".
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
import os
import posixpath
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from include.tier_sync import fileio
from include.tier_sync.money import format_cents
from include.tier_sync.runtime import RUN_KEY_FORMAT, iso, to_utc
from include.tier_sync.settings import (
    ALL_TIERS,
    BLOOM,
    EVERGREEN,
    FIRST_TIME_BUYER,
    NO_TIER,
    SEED,
    SPROUT,
    VAR_DATA_DIR,
    VAR_RULES,
    TierRules,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MASTER_FILE = "customer_analytics_master.csv"
HISTORY_FILE = "tier_history.csv"
CHANGES_FILE = "tier_changes.csv"
SYNC_LOG_FILE = "tier_sync_log.json"
LATEST_FILE = "latest.json"
VALIDATION_LATEST = "validation/latest.json"
DATA_DOCS_DIR = "validation/data_docs"

# Higher is better; a change to a higher rank is an upgrade.
TIER_RANK: dict[str, int] = {EVERGREEN: 5, BLOOM: 4, SPROUT: 3, SEED: 2, FIRST_TIME_BUYER: 1, NO_TIER: 0}

MAX_PAGE = 200  # the most rows any list endpoint returns at once
MAX_SEARCH = 25
LISTING_TTL_S = 10.0  # how long a listing of runs/ (an ls on object storage) is reused
SETTINGS_TTL_S = 30.0  # how long a resolved data dir / rule set is reused


# -- configuration -----------------------------------------------------------------------------------


_settings_cache: dict[str, tuple[float, str | None]] = {}


def _variable(name: str) -> str | None:
    """A Variable as the api-server sees it (settings.variable), cached for SETTINGS_TTL_S."""
    now = time.monotonic()
    hit = _settings_cache.get(name)
    if hit is not None and now - hit[0] < SETTINGS_TTL_S:
        return hit[1]
    from include.tier_sync import settings

    value = settings.variable(name)
    _settings_cache[name] = (now, value)
    return value


def resolve_data_dir() -> str:
    """The pipeline's data dir, as the api-server sees it (same default as settings.data_dir)."""
    from include.tier_sync import settings

    return _variable(VAR_DATA_DIR) or settings.data_dir()


def resolve_rules() -> TierRules:
    raw = _variable(VAR_RULES)
    if not raw:
        return TierRules()
    try:
        return TierRules.from_mapping(json.loads(raw))
    except (ValueError, TypeError) as exc:
        log.warning("Variable %s is not usable (%s); the dashboard uses the default rules", VAR_RULES, exc)
        return TierRules()


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


def _cached(kind: str, url: str, key: Any, load: Callable[[], T]) -> T:
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


def _ttl(kind: str, url: str, ttl: float, load: Callable[[], T]) -> T:
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


def warm_up(data_dir: str, rules: TierRules | None = None) -> None:
    """Parse the master and compute the at-risk dates now (e.g. in a background thread), so the
    first person to open the page after a run does not wait for them."""
    try:
        _at_risk_all(data_dir, rules or TierRules())
    except Exception:  # a half-written or unreadable data dir: the request will report it
        log.exception("Dashboard: warm-up of %s failed", data_dir)


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _ttl_cache.clear()
        _settings_cache.clear()


def _read_json(url: str) -> Any:
    sig = signature(url)
    if sig is None:
        return None
    return _cached("json", url, sig, lambda: json.loads(fileio.read_text(url)))


def _read_csv(url: str, usecols: list[str] | None = None) -> Any:
    """A CSV the pipeline wrote, all columns str, "None"/"" literal."""
    from include.tier_sync.master_csv import read_csv_str

    return read_csv_str(url, usecols=usecols)


# -- helpers -----------------------------------------------------------------------------------------


def _money(cents: int) -> dict[str, Any]:
    return {"cents": int(cents), "dollars": format_cents(int(cents))}


def _iso_us(us: int) -> str:
    return iso(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us)))


def _parse_iso(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return to_utc(value)
    except (ValueError, TypeError):
        return None


def _run_keys(data_dir: str) -> list[str]:
    """Run folder keys, oldest first (keys sort as timestamps); listing reused for a few seconds."""

    def load() -> list[str]:
        keys = []
        for name in fileio.listdir(fileio.join(data_dir, "runs")):
            try:
                datetime.strptime(name, RUN_KEY_FORMAT)
            except ValueError:
                continue
            keys.append(name)
        return sorted(keys)

    return _ttl("runs", data_dir, LISTING_TTL_S, load)


def _cents_array(col: Any) -> Any:
    """'123.45' strings -> int64 cents (empty -> 0), exact for two-decimal dollars."""
    import numpy as np
    import pandas as pd

    values = pd.to_numeric(col.where(col != "", "0"), errors="coerce").fillna(0).to_numpy(dtype=float)
    return np.round(values * 100).astype(np.int64)


def _int_array(col: Any) -> Any:
    import numpy as np
    import pandas as pd

    return pd.to_numeric(col.where(col != "", "0"), errors="coerce").fillna(0).to_numpy(dtype=np.int64)


# -- the latest master ------------------------------------------------------------------------------


class Master:
    """The parsed latest master CSV plus the derived columns the page needs (built once per file)."""

    def __init__(self, df: Any) -> None:
        self.df = df
        self.size = len(df)
        self.ltv_cents = _cents_array(df["Lifetime Value"])
        self.p30 = _int_array(df["Purchases Last 30 Days"])
        self.id_l = df["Customer ID"].str.lower()
        self.code_l = df["Customer Code"].str.lower()
        self.email_l = df["Email"].str.lower().str.strip()
        self.position = {cid: i for i, cid in enumerate(df["Customer ID"].tolist())}
        counts = df["Tier"].value_counts()
        self.tier_counts = {t: int(counts.get(t, 0)) for t in ALL_TIERS}
        for extra, n in counts.items():  # a tier name we do not know still shows up
            if extra not in self.tier_counts:
                self.tier_counts[str(extra)] = int(n)
        import pandas as pd

        sums = pd.Series(self.ltv_cents).groupby(df["Tier"].to_numpy()).sum()
        self.tier_ltv_cents = {t: int(sums.get(t, 0)) for t in self.tier_counts}
        self.last_updated = df["Last Updated"].iloc[0] if self.size else None


def load_master(data_dir: str) -> Master | None:
    url = fileio.join(data_dir, MASTER_FILE)
    sig = signature(url)
    if sig is None:
        return None

    def load() -> Master:
        started = time.monotonic()
        master = Master(_read_csv(url))
        log.info(
            "Dashboard: parsed %s (%d customers) in %.2f s", url, master.size, time.monotonic() - started
        )
        return master

    return _cached("master", url, sig, load)


def _latest(data_dir: str, master: Master | None) -> dict[str, Any]:
    latest = _read_json(fileio.join(data_dir, LATEST_FILE))
    out: dict[str, Any] = dict(latest) if isinstance(latest, dict) else {}
    if not out.get("as_of") and master is not None and master.last_updated:
        out["as_of"] = master.last_updated
    return out


# -- summary ----------------------------------------------------------------------------------------


def _sync_summary(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict):
        return None
    api: dict[str, Any] = doc["api"] if isinstance(doc.get("api"), dict) else {}
    groups = []
    for tier, g in sorted((doc.get("group_counts") or {}).items(), key=lambda kv: -TIER_RANK.get(kv[0], -1)):
        if isinstance(g, dict):
            groups.append(
                {
                    "tier": tier,
                    "expected": g.get("expected"),
                    "actual": g.get("actual"),
                    "missing": g.get("missing"),
                    "unexpected": g.get("unexpected"),
                    "match": g.get("match"),
                }
            )
    breaker: dict[str, Any] = doc["circuit_breaker"] if isinstance(doc.get("circuit_breaker"), dict) else {}
    return {
        "as_of": doc.get("as_of"),
        "run_id": doc.get("run_id"),
        "started_at": doc.get("started_at"),
        "finished_at": doc.get("finished_at"),
        "synced": doc.get("synced"),
        "dry_run": doc.get("dry_run"),
        "skipped_reason": doc.get("skipped_reason"),
        "planned_moves": doc.get("planned_moves"),
        "updated": doc.get("updated"),
        "unchanged": doc.get("unchanged"),
        "protected": doc.get("protected"),
        "skipped": doc.get("skipped"),
        "changed_in_pos": doc.get("changed_in_pos"),
        "deferred_by_limit": doc.get("deferred_by_limit"),
        "errors": doc.get("errors"),
        "failed_batches": doc.get("failed_batches"),
        "error_details": list(doc.get("error_details") or [])[:10],
        "api_requests": api.get("requests"),
        "rate_limited": api.get("rate_limited"),
        "retries": api.get("retries"),
        "group_counts_match": doc.get("group_counts_match"),
        "group_counts": groups,
        "moves": doc.get("moves") or {},
        "circuit_breaker_tripped": breaker.get("tripped"),
        "circuit_breaker_reasons": breaker.get("reasons") or [],
    }


def _check_note(item: Any) -> dict[str, Any]:
    """A failed check or warning, without its example rows (the page shows what, not who)."""
    if not isinstance(item, dict):
        return {"message": str(item)}
    keep = ("expectation", "message", "description", "column", "unexpected_count")
    return {k: item[k] for k in keep if item.get(k) is not None}


def _validation_summary(data_dir: str) -> dict[str, Any] | None:
    doc = _read_json(fileio.join(data_dir, VALIDATION_LATEST))
    if not isinstance(doc, dict):
        return None
    summary: dict[str, Any] = doc["summary"] if isinstance(doc.get("summary"), dict) else {}
    has_docs = fileio.exists(fileio.join(data_dir, DATA_DOCS_DIR, "index.html"))
    return {
        "success": summary.get("success"),
        "run_key": summary.get("run_key"),
        "evaluated": summary.get("evaluated"),
        "successful": summary.get("successful"),
        "failed": summary.get("failed") or [],
        "failed_details": [_check_note(d) for d in list(summary.get("failed_details") or [])[:20]],
        "warnings": [_check_note(w) for w in list(summary.get("warnings") or [])[:20]],
        "notes": summary.get("notes") or [],
        "row_count": summary.get("row_count"),
        "data_docs": has_docs,
    }


def summary(data_dir: str) -> dict[str, Any]:
    """Everything on the top of the page: latest run, tier distribution, last sync, last data-quality."""
    master = load_master(data_dir)
    latest = _latest(data_dir, master)
    sync = _sync_summary(_read_json(fileio.join(data_dir, SYNC_LOG_FILE)))
    validation = _validation_summary(data_dir)
    distribution = []
    total = 0
    if master is not None:
        total = master.size
        for tier, count in master.tier_counts.items():
            distribution.append(
                {
                    "tier": tier,
                    "count": count,
                    "share": (count / total) if total else 0.0,
                    "lifetime_value": _money(master.tier_ltv_cents.get(tier, 0)),
                }
            )
    return {
        "has_data": master is not None or sync is not None or validation is not None,
        "has_master": master is not None,
        "data_dir": data_dir,
        "as_of": latest.get("as_of"),
        "run_id": latest.get("run_id"),
        "total_customers": total,
        "distribution": distribution,
        "sync": sync,
        "validation": validation,
    }


# -- distribution over time ---------------------------------------------------------------------------


def history(data_dir: str, limit: int = 400) -> dict[str, Any]:
    """Customers per tier per run, from tier_history.csv (oldest first, at most `limit` runs)."""
    url = fileio.join(data_dir, HISTORY_FILE)
    sig = signature(url)
    if sig is None:
        return {"tiers": list(ALL_TIERS), "points": []}

    def load() -> list[dict[str, Any]]:
        df = _read_csv(url)
        points: dict[str, dict[str, Any]] = {}
        for as_of, run_id, tier, count in df[["as_of", "run_id", "tier", "count"]].itertuples(index=False):
            point = points.setdefault(as_of, {"as_of": as_of, "run_id": run_id, "counts": {}})
            try:
                point["counts"][tier] = int(count)
            except ValueError:
                continue
        out = [points[k] for k in sorted(points)]
        for p in out:
            p["total"] = sum(p["counts"].values())
        return out

    points = _cached("history", url, sig, load)
    limit = max(1, min(int(limit), 5000))
    return {"tiers": list(ALL_TIERS), "points": points[-limit:]}


# -- moves per run ------------------------------------------------------------------------------------


def classify_move(old: str, new: str) -> str:
    """'new' (first time seen), 'upgrade', 'downgrade' or 'other' (same rank / unknown tier)."""
    if old == "":
        return "new"
    a, b = TIER_RANK.get(old), TIER_RANK.get(new)
    if a is None or b is None or a == b:
        return "other"
    return "upgrade" if b > a else "downgrade"


def _changes_frame(url: str) -> Any:
    """One run's tier_changes.csv indexed by Customer ID (parsed once per file version)."""
    sig = signature(url)
    if sig is None:
        return None

    def load() -> Any:
        df = _read_csv(url, usecols=["Customer ID", "From", "To"])
        df["From"] = df["From"].astype("category")
        df["To"] = df["To"].astype("category")
        return df.set_index("Customer ID")

    return _cached("changes", url, sig, load)


def _run_moves(data_dir: str, key: str) -> dict[str, Any]:
    run_dir = fileio.join(data_dir, "runs", key)
    url = fileio.join(run_dir, CHANGES_FILE)
    counts = {"upgrades": 0, "downgrades": 0, "new": 0, "other": 0}
    transitions: dict[str, int] = {}
    frame = _changes_frame(url)
    if frame is not None and len(frame):
        pairs = frame.groupby(["From", "To"], observed=True).size()
        for (old, new), n in pairs.items():
            kind = classify_move(str(old), str(new))
            counts["upgrades" if kind == "upgrade" else "downgrades" if kind == "downgrade" else kind] += int(
                n
            )
            transitions[f"{old or '(new)'} -> {new}"] = int(n)
    sync = _read_json(fileio.join(run_dir, SYNC_LOG_FILE))
    run = _read_json(fileio.join(run_dir, "run.json"))
    report = _read_json(fileio.join(run_dir, "validation.json"))
    passed = report.get("summary", {}).get("success") if isinstance(report, dict) else None
    as_of = run.get("as_of") if isinstance(run, dict) else None
    if not as_of:
        as_of = iso(datetime.strptime(key, RUN_KEY_FORMAT).replace(tzinfo=UTC))
    return {
        "key": key,
        "as_of": as_of,
        "run_id": run.get("run_id") if isinstance(run, dict) else None,
        "has_changes": frame is not None,
        **counts,
        "changes": sum(counts.values()),
        "top_transitions": dict(sorted(transitions.items(), key=lambda kv: -kv[1])[:8]),
        "validation_passed": passed,
        "synced_updates": sync.get("updated") if isinstance(sync, dict) else None,
        "sync_errors": sync.get("errors") if isinstance(sync, dict) else None,
    }


def moves(data_dir: str, limit: int = 60) -> dict[str, Any]:
    """Upgrades / downgrades / new customers per run (newest `limit` runs, oldest first)."""
    limit = max(1, min(int(limit), 1000))
    keys = _run_keys(data_dir)[-limit:]
    return {"runs": [_run_moves(data_dir, k) for k in keys]}


# -- at-risk customers --------------------------------------------------------------------------------


STORE_BATCH_ROWS = 131_072  # rows decoded at a time while scanning the order store


def _scan_sales(urls: list[str], columns: list[str] | None, key: str, values: Any) -> Any:
    """Rows of the sales segments whose `key` is in `values`, streamed a batch at a time.

    The api-server must not hold the store in memory: Parquet row groups are up to a million rows,
    so the segments are read with iter_batches (pages decoded incrementally), not as a dataset.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from include.tier_sync.store import SALES_SCHEMA

    schema = SALES_SCHEMA if columns is None else pa.schema([SALES_SCHEMA.field(c) for c in columns])
    wanted = sorted({*(columns or SALES_SCHEMA.names), key})
    parts = []
    for url in urls:
        if fileio.is_local(url):
            source: Any = fileio.local_path(url)
            handle = None
        else:
            fs, path = fileio.filesystem(url)
            handle = source = fs.open(path, "rb")
        try:
            with pq.ParquetFile(source) as pf:
                for batch in pf.iter_batches(batch_size=STORE_BATCH_ROWS, columns=wanted, use_threads=False):
                    keep = batch.filter(pc.is_in(batch.column(key), value_set=values))
                    if keep.num_rows:
                        parts.append(pa.Table.from_batches([keep]).select(schema.names).cast(schema))
        finally:
            if handle is not None:
                handle.close()
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _window_purchases(data_dir: str, ids: list[str], as_of: datetime) -> dict[str, list[int]] | None:
    """Sale dates (us) of each customer's qualifying purchases in the window before `as_of`.

    Reads only the sales of these customers from the order store: every version of every sale one
    of them ever owned (so the engine's as-of view picks the same version it did, even for a sale
    moved between customers). None when the store cannot be read.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from include.tier_sync.clv import qualifying_sales
    from include.tier_sync.store import SALES, OrderStore

    root = fileio.join(data_dir, "store")
    try:
        store = OrderStore(root)
        segs = store.segments(SALES)
        if not segs:
            return None
        urls = [store.segment_url(SALES, s["name"]) for s in segs]
        owned = _scan_sales(urls, ["id"], "customer_id", pa.array(ids, type=pa.string()))
        sale_ids = pc.unique(owned.column("id"))
        table = _scan_sales(urls, None, "id", sale_ids) if len(sale_ids) else owned
    except Exception as exc:  # a missing/compacted segment, no store at all, a bad manifest
        log.warning("Dashboard: order store %s not readable for at-risk dates: %s", root, exc)
        return None
    if not len(sale_ids):
        return {cid: [] for cid in ids}
    import pandas as pd

    sales = table.to_pandas()
    del table
    pos, amount, date = qualifying_sales(sales, pd.Series(ids, dtype=object), as_of)
    return _group_dates(pos, amount, date, ids)


def _group_dates(pos: Any, amount: Any, date: Any, ids: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {cid: [] for cid in ids}
    purchase = amount > 0
    for p, d in zip(pos[purchase].tolist(), date[purchase].tolist(), strict=True):
        out[ids[p]].append(int(d))
    return out


def _at_risk_table(data_dir: str, master: Master, as_of: datetime, rules: TierRules) -> list[dict[str, Any]]:
    """Every at-risk customer with the instant the tier would drop, soonest first (cached)."""
    import numpy as np

    from include.tier_sync.clv import US_PER_DAY, as_of_us

    df = master.df
    mask = (
        (df["Tier"].to_numpy() == SPROUT)
        & (master.ltv_cents < rules.sprout_min_cents)
        & (master.p30 >= rules.sprout_min_purchases_in_window)
    )
    rows = np.flatnonzero(mask)
    if not len(rows):
        return []
    ids = df["Customer ID"].to_numpy()[rows].tolist()
    window_us = rules.window_days * US_PER_DAY
    cut = as_of_us(as_of)
    start = cut - window_us
    dates = _window_purchases(data_dir, ids, as_of)
    k = rules.sprout_min_purchases_in_window
    sub = df.iloc[rows]
    columns = zip(
        rows.tolist(),
        ids,
        sub["Customer Code"].tolist(),
        sub["Name"].tolist(),
        sub["Loyalty Member"].tolist(),
        sub["Last Order"].tolist(),
        strict=True,
    )
    out = []
    for r, cid, code, name, loyalty, last_order in columns:
        in_window = sorted((d for d in (dates or {}).get(cid, []) if start <= d < cut), reverse=True)
        if dates is not None and len(in_window) == int(master.p30[r]) and len(in_window) >= k:
            drop_us = in_window[k - 1] + window_us
            method = "exact"
        else:
            last = _parse_iso(last_order)
            if last is None:
                continue
            drop_us = as_of_us(last) + window_us  # the third-newest purchase is no later than the last
            method = "latest_possible"
        out.append(
            {
                "customer_id": cid,
                "customer_code": code,
                "name": name,
                "tier": SPROUT,
                "drops_to": SEED if loyalty == "true" else FIRST_TIME_BUYER,
                "lifetime_value": _money(int(master.ltv_cents[r])),
                "purchases_last_30_days": int(master.p30[r]),
                "last_order": last_order,
                "drop_after_us": int(drop_us),
                "drops_after": _iso_us(drop_us),
                "days_left": max(0, math.floor((drop_us - cut) / US_PER_DAY)),
                "method": method,
            }
        )
    out.sort(key=lambda e: (e["drop_after_us"], e["customer_id"]))
    return out


def _rules_key(rules: TierRules) -> tuple[int, int, int]:
    return (rules.sprout_min_cents, rules.sprout_min_purchases_in_window, rules.window_days)


def _at_risk_all(data_dir: str, rules: TierRules) -> tuple[list[dict[str, Any]], str | None]:
    master = load_master(data_dir)
    if master is None:
        return [], None
    as_of_text = _latest(data_dir, master).get("as_of")
    as_of = _parse_iso(as_of_text)
    if as_of is None:
        return [], None
    store_sig = signature(fileio.join(data_dir, "store", "manifest.json"))
    key = (signature(fileio.join(data_dir, MASTER_FILE)), store_sig, iso(as_of), _rules_key(rules))

    def load() -> list[dict[str, Any]]:
        started = time.monotonic()
        table = _at_risk_table(data_dir, master, as_of, rules)
        log.info("Dashboard: %d at-risk customers in %.2f s", len(table), time.monotonic() - started)
        return table

    return _cached("at_risk", data_dir, key, load), iso(as_of)


def at_risk(
    data_dir: str, rules: TierRules | None = None, within_days: int = 30, limit: int = 50, offset: int = 0
) -> dict[str, Any]:
    """One page of the customers whose tier drops within `within_days` if they buy nothing."""
    rules = rules or TierRules()
    within_days = max(0, min(int(within_days), 3650))
    limit = max(1, min(int(limit), MAX_PAGE))
    offset = max(0, int(offset))
    table, as_of = _at_risk_all(data_dir, rules)
    if as_of is not None:
        horizon = _parse_iso(as_of)
        assert horizon is not None
        horizon_us = (
            int((horizon + timedelta(days=within_days) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
            * 1_000_000
        )
        selected = [e for e in table if e["drop_after_us"] <= horizon_us]
    else:
        selected = []
    by_day: dict[int, int] = {}
    for e in selected:
        by_day[e["days_left"]] = by_day.get(e["days_left"], 0) + 1
    return {
        "as_of": as_of,
        "within_days": within_days,
        "rule": {
            "tier": SPROUT,
            "min_purchases": rules.sprout_min_purchases_in_window,
            "window_days": rules.window_days,
            "below_lifetime_value": _money(rules.sprout_min_cents),
        },
        "total": len(selected),
        "exact": sum(1 for e in selected if e["method"] == "exact"),
        "by_days_left": [{"days_left": d, "count": n} for d, n in sorted(by_day.items())],
        "offset": offset,
        "limit": limit,
        "customers": [
            {k: v for k, v in e.items() if k != "drop_after_us"} for e in selected[offset : offset + limit]
        ],
    }


# -- search and one customer ---------------------------------------------------------------------------


def _customer_row(master: Master, r: int) -> dict[str, Any]:
    row = master.df.iloc[r]
    return {
        "customer_id": row["Customer ID"],
        "customer_code": row["Customer Code"],
        "name": row["Name"],
        "email": row["Email"],
        "tier": row["Tier"],
        "previous_tier": row["Previous Tier"],
        "tier_changed_at": row["Tier Changed At"],
        "lifetime_value": _money(int(master.ltv_cents[r])),
        "order_count": row["Order Count"],
        "purchases_last_30_days": int(master.p30[r]),
        "last_order": row["Last Order"],
        "loyalty_member": row["Loyalty Member"] == "true",
    }


def tier_history_of(data_dir: str, customer_id: str, limit_runs: int = 400) -> list[dict[str, Any]]:
    """The customer's tier changes over the runs, oldest first (from runs/<key>/tier_changes.csv)."""
    out = []
    for key in _run_keys(data_dir)[-limit_runs:]:
        frame = _changes_frame(fileio.join(data_dir, "runs", key, CHANGES_FILE))
        if frame is None or customer_id not in frame.index:
            continue
        hit = frame.loc[[customer_id]].iloc[-1]
        old, new = str(hit["From"]), str(hit["To"])
        out.append(
            {
                "run_key": key,
                "as_of": iso(datetime.strptime(key, RUN_KEY_FORMAT).replace(tzinfo=UTC)),
                "from": old or None,
                "to": new,
                "kind": classify_move(old, new),
            }
        )
    return out


def search(data_dir: str, query: str, limit: int = 10, rules: TierRules | None = None) -> dict[str, Any]:
    """Customers whose email, code or id is `query` (case-insensitive); prefix matches if none is exact."""
    q = (query or "").strip().lower()
    limit = max(1, min(int(limit), MAX_SEARCH))
    master = load_master(data_dir)
    if master is None or len(q) < 2:
        return {"query": query, "match": "none", "total": 0, "customers": []}
    exact = (master.id_l == q) | (master.code_l == q) | (master.email_l == q)
    match = "exact"
    hits = exact.to_numpy().nonzero()[0]
    if not len(hits) and len(q) >= 3:
        prefix = (
            master.code_l.str.startswith(q) | master.email_l.str.startswith(q) | master.id_l.str.startswith(q)
        )
        hits = prefix.to_numpy().nonzero()[0]
        match = "prefix"
    if not len(hits):
        return {"query": query, "match": "none", "total": 0, "customers": []}
    customers = [_customer_row(master, int(r)) for r in hits[:limit]]
    if match != "exact":  # a partial query lists candidates: no emails until one is picked
        for c in customers:
            c.pop("email", None)
    if len(customers) <= 3:  # few enough to show each one's history and drop date
        risk = {e["customer_id"]: e for e in _at_risk_all(data_dir, rules or TierRules())[0]}
        for c in customers:
            c["tier_history"] = tier_history_of(data_dir, c["customer_id"])
            entry = risk.get(c["customer_id"])
            c["at_risk"] = (
                {k: entry[k] for k in ("drops_after", "drops_to", "days_left", "method")} if entry else None
            )
    return {"query": query, "match": match, "total": len(hits), "customers": customers}


def customer(data_dir: str, customer_id: str, rules: TierRules | None = None) -> dict[str, Any] | None:
    master = load_master(data_dir)
    if master is None:
        return None
    r = master.position.get(customer_id)
    if r is None:
        return None
    out = _customer_row(master, r)
    out["tier_history"] = tier_history_of(data_dir, customer_id)
    entry = {e["customer_id"]: e for e in _at_risk_all(data_dir, rules or TierRules())[0]}.get(customer_id)
    out["at_risk"] = (
        {k: entry[k] for k in ("drops_after", "drops_to", "days_left", "method")} if entry else None
    )
    return out


# -- Data Docs -----------------------------------------------------------------------------------------


def data_docs_file(data_dir: str, path: str) -> tuple[bytes, str] | None:
    """A file of the Data Docs site (bytes, content type); None if absent or outside the site."""
    clean = posixpath.normpath("/" + (path or "index.html")).lstrip("/")
    if not clean or clean.startswith("..") or "\\" in clean:
        return None
    url = fileio.join(data_dir, DATA_DOCS_DIR, clean)
    if signature(url) is None:
        return None
    ctype = mimetypes.guess_type(clean)[0] or "application/octet-stream"
    return fileio.read_bytes(url), ctype
