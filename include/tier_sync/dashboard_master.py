"""The latest master CSV as the "Loyalty tiers" page (dashboard.py) reads it.

`load_master` parses customer_analytics_master.csv once per version of the file (dashboard_cache)
and derives, once, the columns every request needs: cents, purchase counts, lower-cased search
keys, per-tier counts and lifetime value. It also answers the questions asked of the master
itself: which rows a search matches, and one customer's row as the page shows it.

pandas and numpy are imported inside the functions that need them: the Airflow plugin imports this
module (through dashboard.py) when the api-server starts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from include.tier_sync import fileio
from include.tier_sync.dashboard_cache import cached, read_csv, read_json, signature
from include.tier_sync.ledger import LATEST_FILE, MASTER_FILE
from include.tier_sync.money import format_cents
from include.tier_sync.rules import ALL_TIERS

log = logging.getLogger(__name__)


def money(cents: int) -> dict[str, Any]:
    """An amount as the page's JSON shows it: exact cents and the dollars text."""
    return {"cents": int(cents), "dollars": format_cents(int(cents))}


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


class Master:
    """The parsed latest master CSV plus the derived columns the page needs (built once per file)."""

    def __init__(self, df: Any) -> None:
        self.df = df
        self.size = len(df)
        self.ltv_cents = _cents_array(df["Lifetime Value"])
        self.orders = _int_array(df["Order Count"])
        self.p30 = _int_array(df["Purchases Last 30 Days"])
        self.loyal = (df["Loyalty Member"] == "true").to_numpy(dtype=bool)
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
        master = Master(read_csv(url))
        log.info(
            "Dashboard: parsed %s (%d customers) in %.2f s", url, master.size, time.monotonic() - started
        )
        return master

    return cached("master", url, sig, load)


def latest_run(data_dir: str, master: Master | None) -> dict[str, Any]:
    """The latest run's latest.json; its as_of falls back to the master's Last Updated."""
    doc = read_json(fileio.join(data_dir, LATEST_FILE))
    out: dict[str, Any] = dict(doc) if isinstance(doc, dict) else {}
    if not out.get("as_of") and master is not None and master.last_updated:
        out["as_of"] = master.last_updated
    return out


# -- looking customers up ------------------------------------------------------------------------------


def find_rows(master: Master, q: str) -> tuple[str, Any]:
    """("exact", rows) whose id, code or email is `q` (lower-cased); else ("prefix", rows) they start
    with, when `q` has 3+ characters. The rows may be empty."""
    exact = (master.id_l == q) | (master.code_l == q) | (master.email_l == q)
    match = "exact"
    hits = exact.to_numpy().nonzero()[0]
    if not len(hits) and len(q) >= 3:
        prefix = (
            master.code_l.str.startswith(q) | master.email_l.str.startswith(q) | master.id_l.str.startswith(q)
        )
        hits = prefix.to_numpy().nonzero()[0]
        match = "prefix"
    return match, hits


def customer_row(master: Master, r: int) -> dict[str, Any]:
    """Row `r` of the master as the page shows one customer."""
    row = master.df.iloc[r]
    return {
        "customer_id": row["Customer ID"],
        "customer_code": row["Customer Code"],
        "name": row["Name"],
        "email": row["Email"],
        "tier": row["Tier"],
        "previous_tier": row["Previous Tier"],
        "tier_changed_at": row["Tier Changed At"],
        "lifetime_value": money(int(master.ltv_cents[r])),
        "order_count": row["Order Count"],
        "purchases_last_30_days": int(master.p30[r]),
        "last_order": row["Last Order"],
        "loyalty_member": row["Loyalty Member"] == "true",
    }
