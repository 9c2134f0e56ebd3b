"""The master CSV's Arrow path (issue 17): the Arrow-built master against plain formatting, and
the previous master read beside the engine."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from include.tier_sync import master_csv
from include.tier_sync.clv import NAT
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import build_master
from include.tier_sync.runtime import iso
from tests.unit.test_clv import AS_OF, DAY, RULES, customer, customers_df, sale, sales_df
from tests.unit.test_master_csv import FakeStore, identity

pytestmark = pytest.mark.unit

CELLS = [
    "", "a", "=1+1", "'=x", "''+y", "'plain", "-12.50", "-1a", "\u0661\u0662", "12\n", 'say "hi"',
    "a,b", "line\nbreak", "\tTab", "@at", "+1", "x'", "Zoë 李", " lead", "-", "'", None,
]  # fmt: skip


def _metrics(ids: list[str]) -> pd.DataFrame:
    n = len(ids)
    rng = np.random.default_rng(3)
    last = rng.integers(0, 2_000_000_000_000_000, n)
    last[::4] = NAT
    count = np.where(last == NAT, 0, rng.integers(1, 40, n))
    return pd.DataFrame(
        {
            "customer_id": ids,
            "customer_code": [f"C{i}\r" if i % 7 == 0 else None for i in range(n)],
            "name": [CELLS[i % len(CELLS)] for i in range(n)],
            "email": [f"e{i}@x" for i in range(n)],
            "phone": ["=cmd" if i % 5 == 0 else "" for i in range(n)],
            "lifetime_value_cents": rng.integers(-10**9, 10**9, n),
            "order_count": count,
            "purchases_in_window": rng.integers(0, 5, n),
            "first_order_us": np.where(last == NAT, NAT, last - 10**12),
            "last_order_us": last,
            "loyalty_member": rng.random(n) < 0.5,
            "tier": np.where(count == 0, "None", np.where(rng.random(n) < 0.5, "Bloom", "Seed")).astype(object),
        }
    )


def test_the_arrow_built_master_has_what_the_plain_formatting_gives() -> None:
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(400)]
    metrics = _metrics(ids)
    previous = pd.DataFrame(
        {
            "Customer ID": ids[::3],
            "Tier": ["Seed", "None", "Bloom"] * (len(ids[::3]) // 3) + ["Seed"] * (len(ids[::3]) % 3),
            "Tier Changed At": "2026-01-01T00:00:00Z",
        }
    )
    master = build_master(metrics.iloc[::-1], previous, AS_OF)  # unsorted in: sorted out
    assert master["Customer ID"].tolist() == ids
    m = metrics.set_index("customer_id")
    prev = previous.set_index("Customer ID")
    as_of = iso(AS_OF)
    assert set(master["Last Updated"]) == {as_of}
    cut = pd.Timestamp(AS_OF)
    for _, row in master.iterrows():
        src: Any = m.loc[row["Customer ID"]]
        cents = int(src["lifetime_value_cents"])
        assert row["Lifetime Value"] == f"{'-' if cents < 0 else ''}{abs(cents) // 100}.{abs(cents) % 100:02d}"
        assert row["Order Count"] == str(src["order_count"])
        last = int(src["last_order_us"])
        if last == NAT:
            assert row["Last Order"] == "" and row["Days Since Last Order"] == ""
        else:
            when = pd.Timestamp(last, unit="us", tz="UTC")
            assert row["Last Order"] == when.floor("s").strftime("%Y-%m-%dT%H:%M:%SZ")
            assert row["Days Since Last Order"] == str((cut - when) // timedelta(days=1))
        code = src["customer_code"] if isinstance(src["customer_code"], str) else ""  # None read as NaN
        assert row["Customer Code"] == code.replace("\r", "\n")
        assert row["Loyalty Member"] == ("true" if src["loyalty_member"] else "false")
        known = row["Customer ID"] in prev.index
        before = prev.loc[row["Customer ID"], "Tier"] if known else ""
        assert row["Previous Tier"] == before
        moved = before != row["Tier"] if known else row["Tier"] != "None"
        assert row["Tier Changed At"] == (as_of if moved else ("2026-01-01T00:00:00Z" if known else ""))


def test_compute_tiers_reads_the_previous_master_beside_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read on a second thread, a previous master that cannot be read still fails compute_tiers."""

    def unreadable(_: Any) -> str:
        raise OSError("previous master unreadable")

    monkeypatch.setattr(master_csv, "previous_run_master", unreadable)
    store = FakeStore(sales_df(sale("s1", "c1", 100, AS_OF - DAY)), customers_df(customer("c1")))
    with pytest.raises(OSError, match="previous master unreadable"):
        master_csv.compute_tiers(store, RunPaths(str(tmp_path), AS_OF), identity(AS_OF), RULES)
