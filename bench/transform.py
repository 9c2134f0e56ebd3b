"""Benchmark of the transformation (task compute_tiers) on a large synthetic order store.

Generates customers and sales (with several versions, returns, deletions, every status, null and
unknown customer ids, edits after as_of) into an OrderStore in a temp dir, then runs
`master_csv.compute_tiers` in a fresh subprocess (so imports and generation do not pollute the
figures) and prints wall time and peak RSS. The measured time includes reading the store,
the as-of view, the CLV engine and writing every CSV.

    .venv/bin/python bench/transform.py                       # 200k customers, 5M sales
    .venv/bin/python bench/transform.py --customers 20000 --sales 500000

Target (issue): under 10 s and under 3 GB at full size on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
US_PER_DAY = 86_400_000_000


def _uuids(prefix: int, n: int) -> list[str]:
    """n distinct UUID-shaped ids (36 chars, like Lightspeed's) without calling uuid n times."""
    return [f"{prefix:08x}-0000-4000-8000-{i:012x}" for i in range(n)]


def generate(root: str, customers: int, sales: int, seed: int = 7) -> dict[str, int]:
    """Write a synthetic order store (the real OrderStore layout) under root; returns row counts."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from include.tier_sync.store import OrderStore

    rng = np.random.default_rng(seed)
    cut = int(pd.Timestamp(AS_OF).value) // 1000  # .value is always ns
    three_years = 3 * 365 * US_PER_DAY

    def ts(values: np.ndarray) -> pd.Series:
        return pd.Series(pd.to_datetime(values, unit="us", utc=True))

    # Customers: 1% with a second version, 2% deleted (some after as_of), 40% loyalty members.
    cust_ids = np.array(_uuids(0xC, customers), dtype=object)
    created = cut - rng.integers(US_PER_DAY, three_years, customers)
    first_names = np.array(
        ["Ana", "José", "Zoë", "Li", "O'Brien", 'Sam "Ace"', "Ünal", "Ngozi"], dtype=object
    )
    last_names = np.array(["Smith", "Müller, Jr.", "Nguyễn", "Kowalski", "李", "Doe\nSecond"], dtype=object)
    fn = first_names[rng.integers(0, len(first_names), customers)]
    ln = last_names[rng.integers(0, len(last_names), customers)]
    deleted = np.where(
        rng.random(customers) < 0.02, cut - rng.integers(-5 * US_PER_DAY, 300 * US_PER_DAY, customers), 0
    )
    cust = pd.DataFrame(
        {
            "id": pd.array(cust_ids, dtype="str"),
            "customer_code": pd.array([f"C{i:07d}" for i in range(customers)], dtype="str"),
            "first_name": pd.array(fn, dtype="str"),
            "last_name": pd.array(ln, dtype="str"),
            "name": pd.array(fn + " " + ln, dtype="str"),
            "email": pd.array([f"c{i}@example.com" for i in range(customers)], dtype="str"),
            "phone": pd.array([f"+1555{i:07d}" for i in range(customers)], dtype="str"),
            "mobile": pd.array([None] * customers, dtype="str"),
            "enable_loyalty": rng.random(customers) < 0.4,
            "customer_group_id": pd.array(["grp-default"] * customers, dtype="str"),
            "created_at": ts(created),
            "updated_at": ts(created + rng.integers(0, US_PER_DAY, customers)),
            "deleted_at": ts(np.where(deleted > 0, deleted, np.iinfo(np.int64).min)),
            "version": np.arange(1, customers + 1),
        }
    )
    extra = cust.sample(frac=0.01, random_state=seed).copy()
    extra["version"] = np.arange(len(extra)) + customers + 1  # edits come later: higher versions
    extra["enable_loyalty"] = ~extra["enable_loyalty"]
    extra["updated_at"] = ts(np.full(len(extra), cut - US_PER_DAY))
    store = OrderStore(root)
    store.append("customers", pa.Table.from_pandas(cust, preserve_index=False), cursor=customers)
    store.append(
        "customers", pa.Table.from_pandas(extra, preserve_index=False), cursor=customers + len(extra)
    )

    # Sales: skewed customers, 3% no customer, 0.5% unknown customer, mixed statuses, 5% returns,
    # 1% deleted, 1% dated after as_of; 5% get a second version (2 in 10 of those edited after as_of).
    who = np.minimum((rng.pareto(1.2, sales) * customers / 20).astype(np.int64), customers - 1)
    cust_of_sale = cust_ids[rng.permutation(customers)][who]
    r = rng.random(sales)
    cust_of_sale[r < 0.03] = None
    cust_of_sale = np.where((r >= 0.03) & (r < 0.035), "ffffffff-dead-4000-8000-000000000000", cust_of_sale)
    statuses = np.array(
        ["CLOSED", "LAYBY_CLOSED", "ONACCOUNT_CLOSED", "SAVED", "LAYBY", "VOIDED", "ONACCOUNT", None],
        dtype=object,
    )
    status = statuses[rng.choice(len(statuses), sales, p=[0.82, 0.03, 0.02, 0.03, 0.02, 0.03, 0.02, 0.03])]
    state = np.where(rng.random(sales) < 0.7, "closed", "parked").astype(object)
    state[pd.notna(status)] = None
    sale_date = cut - rng.integers(-US_PER_DAY, three_years, sales)  # ~0.1% at/after as_of
    amount = (rng.lognormal(8.3, 0.9, sales)).astype(np.int64)
    amount = np.where(rng.random(sales) < 0.05, -amount // 2, amount)
    deleted_s = np.where(rng.random(sales) < 0.01, sale_date + US_PER_DAY, np.iinfo(np.int64).min)
    sale_df = pd.DataFrame(
        {
            "id": pd.array(_uuids(0x5, sales), dtype="str"),
            "customer_id": pd.array(cust_of_sale, dtype="str"),
            "status": pd.array(status, dtype="str"),
            "state": pd.array(state, dtype="str"),
            "sale_date": ts(sale_date),
            "created_at": ts(sale_date),
            "updated_at": ts(sale_date + rng.integers(0, 3600 * 10**6, sales)),
            "deleted_at": ts(deleted_s),
            "amount_cents": amount,
            "version": np.arange(1, sales + 1),
        }
    )
    edits = sale_df.sample(frac=0.05, random_state=seed).copy()
    edits["version"] = np.arange(len(edits)) + sales + 1
    edits["amount_cents"] = edits["amount_cents"] + 100
    late = rng.random(len(edits)) < 0.2
    edits["updated_at"] = ts(np.where(late, cut + US_PER_DAY, cut - US_PER_DAY))
    # Segments of 1M, like an initial load, then the edits as an incremental append.
    step = 1_000_000
    for lo in range(0, sales, step):
        chunk = pa.Table.from_pandas(sale_df.iloc[lo : lo + step], preserve_index=False)
        store.append("sales", chunk, cursor=min(lo + step, sales))
    store.append("sales", pa.Table.from_pandas(edits, preserve_index=False), cursor=sales + len(edits))
    return {"customers": len(cust), "sales_rows": len(sale_df) + len(edits), "sales": sales}


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    VmHWM belongs to the address space, which exec replaces; ru_maxrss would also count the
    parent's peak at fork time (Linux keeps it across exec), i.e. the data generation.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(store_root: str, data_dir: str) -> dict[str, float | int]:
    """Run compute_tiers once in this (fresh) process; wall time and peak RSS of the process."""
    t_import = time.perf_counter()
    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.master_csv import compute_tiers
    from include.tier_sync.rules import TierRules
    from include.tier_sync.runtime import iso
    from include.tier_sync.store import OrderStore

    import_s = time.perf_counter() - t_import
    rss_before = peak_rss_bytes()
    paths = RunPaths(data_dir, AS_OF)
    identity = {"dag_id": "bench", "run_id": "bench__1", "logical_date": iso(AS_OF), "as_of": iso(AS_OF)}
    t0 = time.perf_counter()
    out = compute_tiers(OrderStore(store_root), paths, identity, TierRules())
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {
        "wall_s": round(wall, 3),
        "peak_rss_bytes": peak,
        "rss_after_imports_bytes": rss_before,
        "import_s": round(import_s, 3),
        "customers_out": out["total_customers"],
        "changes": out["changes"],
        "master_csv_bytes": os.path.getsize(paths.run_master_csv),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--sales", type=int, default=5_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    parser.add_argument("--measure", nargs=2, metavar=("STORE", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure)))
        return 0

    tmp = tempfile.mkdtemp(prefix="tier-sync-bench-")
    store_root = os.path.join(tmp, "store")
    t0 = time.perf_counter()
    counts = generate(store_root, args.customers, args.sales, args.seed)
    print(
        f"generated {counts['customers']:,} customer rows, {counts['sales']:,} sales "
        f"({counts['sales_rows']:,} sale versions) in {time.perf_counter() - t0:.1f} s under {tmp}"
    )
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure", store_root, os.path.join(tmp, "data")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    gib = 1024**3
    print(
        f"transformation: wall {result['wall_s']:.2f} s, peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB "
        f"(after imports {result['rss_after_imports_bytes'] / gib:.2f} GiB, imports {result['import_s']:.2f} s); "
        f"{result['customers_out']:,} customers, {result['changes']:,} tier changes, "
        f"master CSV {result['master_csv_bytes'] / 1024**2:.1f} MiB"
    )
    ok = result["wall_s"] < 10 and result["peak_rss_bytes"] < 3 * gib
    print(f"target (< 10 s, < 3 GiB): {'met' if ok else 'MISSED'}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
