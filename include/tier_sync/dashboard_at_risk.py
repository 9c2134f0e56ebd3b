"""Which customers of the latest master are "at risk", to which tier they drop and when.

"At risk" (docs/tier-rules.md): a customer whose tier is Sprout only because of the 30-day purchase
rule (Purchases Last 30 Days >= 3 while Lifetime Value is below the Sprout threshold) drops to Seed
(loyalty member) or First Time Buyer as soon as their third-newest purchase in the window leaves
it. Which customers, to which tier and when all come from the one tier table in
`include.tier_sync.rules` (`tiers_after_window`, `window_drop_us`) with the configured thresholds.
The date is exact: it comes from the sale dates in the order store, taken through the same as-of
view the engine uses. Only when the store cannot be read (or disagrees with the CSV) is it
approximated from the CSV's Last Order as "at the latest".

This part of the page reads the order store (as does the customer view's list of sales,
dashboard_customer.py, through `customer_sales`), so it lives apart from the page's aggregates
(dashboard.py). The table is computed once per version of the master, the store's
manifest, the as-of and the thresholds (dashboard_cache), streaming only the at-risk customers'
sales. pandas, numpy and pyarrow are imported inside the functions that need them: the Airflow
plugin imports this module (through dashboard.py) when the api-server starts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio
from include.tier_sync.dashboard_cache import cached, signature
from include.tier_sync.dashboard_master import Master, latest_run, load_master, money
from include.tier_sync.ledger import MASTER_FILE, STORE_DIR
from include.tier_sync.runtime import iso, to_utc

if TYPE_CHECKING:
    from include.tier_sync.rules import TierRules

log = logging.getLogger(__name__)

STORE_BATCH_ROWS = 131_072  # rows decoded at a time while scanning the order store


def iso_us(us: int) -> str:
    """Microseconds since the epoch -> the ISO-8601 UTC text the page shows."""
    return iso(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us)))


def parse_iso(value: Any) -> datetime | None:
    """An ISO-8601 instant from a file the pipeline wrote; None when absent or unreadable."""
    if not value or not isinstance(value, str):
        return None
    try:
        return to_utc(value)
    except (ValueError, TypeError):
        return None


# -- the order store ----------------------------------------------------------------------------------


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


def customer_sales(data_dir: str, ids: list[str]) -> Any:
    """Every stored version of every sale one of these customers ever owned (an Arrow table), so
    the engine's as-of view picks the same version it did, even for a sale moved between
    customers. Reads only those sales from the order store. None when the store cannot be read
    or holds no sales."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from include.tier_sync.store import SALES, OrderStore

    root = fileio.join(data_dir, STORE_DIR)
    try:
        store = OrderStore(root)
        segs = store.segments(SALES)
        if not segs:
            return None
        urls = [store.segment_url(SALES, s["name"]) for s in segs]
        owned = _scan_sales(urls, ["id"], "customer_id", pa.array(ids, type=pa.string()))
        sale_ids = pc.unique(owned.column("id"))
        return _scan_sales(urls, None, "id", sale_ids)
    except Exception as exc:  # a missing/compacted segment, no store at all, a bad manifest
        log.warning("Dashboard: order store %s not readable for customers' sales: %s", root, exc)
        return None


def purchase_dates(
    data_dir: str, ids: list[str], as_of: datetime, rules: TierRules
) -> dict[str, list[int]] | None:
    """Sale dates (us) of each customer's qualifying purchases before `as_of` (see `purchases`)."""
    found = purchases(data_dir, ids, as_of, rules)
    return None if found is None else {cid: [d for d, _ in bought] for cid, bought in found.items()}


def purchases(
    data_dir: str, ids: list[str], as_of: datetime, rules: TierRules
) -> dict[str, list[tuple[int, int]]] | None:
    """(sale date us, amount cents) of each customer's qualifying purchases before `as_of`, from
    `customer_sales`. None when the store cannot be read."""
    table = customer_sales(data_dir, ids)
    if table is None:
        return None
    if not table.num_rows:
        return {cid: [] for cid in ids}
    import pandas as pd

    from include.tier_sync.clv import checked_sales

    sales = table.to_pandas()
    del table
    # The engine's own reading, implausible amounts left out (a run that met one failed or
    # quarantined it; the page never shows it as a purchase either way).
    page_rules = replace(rules, implausible_amounts="quarantine")
    pos, amount, date, _ = checked_sales(sales, pd.Series(ids, dtype=object), as_of, page_rules)
    return _group_purchases(pos, amount, date, ids)


def _group_purchases(pos: Any, amount: Any, date: Any, ids: list[str]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {cid: [] for cid in ids}
    purchase = amount > 0
    for p, d, a in zip(pos[purchase].tolist(), date[purchase].tolist(), amount[purchase].tolist(), strict=True):
        out[ids[p]].append((int(d), int(a)))
    return out


# -- the table ----------------------------------------------------------------------------------------


def _at_risk_table(data_dir: str, master: Master, as_of: datetime, rules: TierRules) -> list[dict[str, Any]]:
    """Every at-risk customer with the instant the tier would drop, soonest first (cached).

    At risk: the CSV's tier is the rule's tier and the rule gives a lower one once too few purchases
    remain in the window (`rules.tiers_after_window`): the tier is held only by the window condition.
    """
    import numpy as np

    from include.tier_sync.clv import US_PER_DAY, as_of_us
    from include.tier_sync.rules import assign_tiers, in_window, tiers_after_window, window_drop_us

    df = master.df
    inputs = (master.ltv_cents, master.orders, master.p30, master.loyal)
    now = assign_tiers(*inputs, rules)
    after = tiers_after_window(*inputs, rules)
    mask = (df["Tier"].to_numpy() == now) & (now != after)
    rows = np.flatnonzero(mask)
    if not len(rows):
        return []
    ids = df["Customer ID"].to_numpy()[rows].tolist()
    cut = as_of_us(as_of)
    dates = purchase_dates(data_dir, ids, as_of, rules)
    sub = df.iloc[rows]
    columns = zip(
        rows.tolist(),
        ids,
        sub["Customer Code"].tolist(),
        sub["Name"].tolist(),
        sub["Last Order"].tolist(),
        strict=True,
    )
    out = []
    for r, cid, code, name, last_order in columns:
        mine = (dates or {}).get(cid, [])
        exact = window_drop_us(mine, cut, rules) if dates is not None else None
        if exact is not None and int(in_window(mine, cut, rules).sum()) == int(master.p30[r]):
            drop_us = exact
            method = "exact"
        else:
            last = parse_iso(last_order)
            if last is None:
                continue
            # The purchase whose leaving drops the tier is no later than the last order.
            drop_us = as_of_us(last) + rules.window_us
            method = "latest_possible"
        out.append(
            {
                "customer_id": cid,
                "customer_code": code,
                "name": name,
                "tier": str(now[r]),
                "drops_to": str(after[r]),
                "lifetime_value": money(int(master.ltv_cents[r])),
                "purchases_last_30_days": int(master.p30[r]),
                "last_order": last_order,
                "drop_after_us": int(drop_us),
                "drops_after": iso_us(drop_us),
                "days_left": max(0, math.floor((drop_us - cut) / US_PER_DAY)),
                "method": method,
            }
        )
    out.sort(key=lambda e: (e["drop_after_us"], e["customer_id"]))
    return out


def _rules_key(rules: TierRules) -> tuple[int, ...]:
    """What the at-risk table depends on: the tier table's thresholds and the sale plausibility bound."""
    return (
        rules.evergreen_min_cents,
        rules.bloom_min_cents,
        rules.sprout_min_cents,
        rules.sprout_min_purchases_in_window,
        rules.window_days,
        rules.max_sale_amount_cents,
    )


def at_risk_all(data_dir: str, rules: TierRules) -> tuple[list[dict[str, Any]], str | None]:
    """The whole at-risk table (soonest drop first) and the as-of it is computed at (ISO text);
    ([], None) without a master or an as-of."""
    master = load_master(data_dir)
    if master is None:
        return [], None
    as_of_text = latest_run(data_dir, master).get("as_of")
    as_of = parse_iso(as_of_text)
    if as_of is None:
        return [], None
    store_sig = signature(fileio.join(data_dir, STORE_DIR, "manifest.json"))
    key = (signature(fileio.join(data_dir, MASTER_FILE)), store_sig, iso(as_of), _rules_key(rules))

    def load() -> list[dict[str, Any]]:
        started = time.monotonic()
        table = _at_risk_table(data_dir, master, as_of, rules)
        log.info("Dashboard: %d at-risk customers in %.2f s", len(table), time.monotonic() - started)
        return table

    return cached("at_risk", data_dir, key, load), iso(as_of)
