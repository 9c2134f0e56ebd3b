"""Benchmark of the customer-group sync against the simulator over real HTTP.

1. Requests (issue 17: they must grow with the changes, not with the customers). For each store
   size (default 10,000 and 100,000 customers) two syncs, counted by the simulator:
   - a day: the store is in sync with its master CSV except 2 % of customers whose tier changed;
   - an onboarding: every customer still in the default group, so everyone with a tier moves
     (with allow_mass_change, as the first sync is triggered).
   Per phase (plan, the batches' re-checks, their membership calls, the group check), next to the
   lower bound (each move written once, in calls of 100 ids; each change read once from the feed;
   the group list once) and to how the previous release did the two reads that grew: the re-check
   from the plan's cursor before every batch, and the group check listing every tier group.
   A quiet day (nobody changed tier) is shown too: its group check must cost the same at any size.
2. Time: 2,000 moves at a one-register store's limit (350 requests per 5 minutes, enforced by the
   simulator and by the shared client-side budget), against the lower bound that limit allows.

    .venv/bin/python bench/sync_requests.py
    .venv/bin/python bench/sync_requests.py --sizes 10000 100000 --change-fraction 0.02 --page-cap 200
    .venv/bin/python bench/sync_requests.py --sizes 10000 --skip-timing

The customer extraction (done by extract_orders for the CLV engine anyway) is reported apart.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402

from include.tier_sync import sync  # noqa: E402
from include.tier_sync.ledger import RunPaths  # noqa: E402
from include.tier_sync.lightspeed import LightspeedClient  # noqa: E402
from include.tier_sync.rate_budget import RateBudget, store_limit  # noqa: E402
from include.tier_sync.rules import TIERS, TierRules  # noqa: E402
from include.tier_sync.sync.batches import read_batch  # noqa: E402
from include.tier_sync.sync.write import recheck_customers  # noqa: E402
from tools.lightspeed_sim.store import SimStore  # noqa: E402
from tools.lightspeed_sim.testing import running_simulator  # noqa: E402

AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)
WINDOW = 300.0
TIER_MIX = (
    ("None", 10),
    ("First Time Buyer", 30),
    ("Seed", 25),
    ("Sprout", 20),
    ("Bloom", 10),
    ("Evergreen", 5),
)


def build_store(
    customers: int, moves: int, seed: int, *, onboarding: bool = False
) -> tuple[SimStore, pd.DataFrame]:
    """A store already in sync with its master CSV, except `moves` managed customers whose tier
    changed; or (`onboarding`) with every customer in the default group, nobody placed yet."""
    rng = random.Random(seed)
    rules = TierRules()
    store = SimStore(seed=seed)
    default = store.create_group("All Customers", "1111111111")["id"]
    protected = [store.create_group(name)["id"] for name in ("Staff", "Wholesale")]
    tier_group = {t: store.create_group(rules.group_for(t) or t)["id"] for t in TIERS}
    names, weights = zip(*TIER_MIX, strict=True)
    tiers: dict[str, str] = {}
    stamp = "2026-01-01T00:00:00+00:00"
    for _ in range(customers):
        cid = store.new_id()
        tier = rng.choices(names, weights)[0]
        if rng.random() < 0.02:
            group = rng.choice(protected)
        else:
            group = default if tier == "None" or onboarding else tier_group[tier]
        store.customers[cid] = {
            "id": cid,
            "first_name": "Bench",
            "last_name": cid[:8],
            "name": f"Bench {cid[:8]}",
            "customer_group_id": group,
            "enable_loyalty": True,
            "created_at": stamp,
            "updated_at": stamp,
            "deleted_at": None,
            "version": store.new_version(),
        }
        tiers[cid] = tier
    managed = [
        c
        for c, t in tiers.items()
        if t != "None" and store.customers[c]["customer_group_id"] in tier_group.values()
    ]
    for cid in rng.sample(managed, moves):
        tiers[cid] = rng.choice([t for t in TIERS if t != tiers[cid]])
    return store, pd.DataFrame({"Customer ID": list(tiers), "Tier": list(tiers.values())})


def run_sync(
    sim: Any,
    master: pd.DataFrame,
    data_dir: str,
    *,
    budget_dir: str | None,
    workers: int,
    allow_mass_change: bool,
    before_this_release: bool = False,
) -> dict[str, Any]:
    """extract customers -> plan_sync -> sync_batch x N (`workers` at once) -> verify; requests per phase.

    With `before_this_release`, each batch is preceded by the previous release's re-check (the
    feed from the plan's cursor, read-only) and the group check is repeated by listing every tier
    group; both are counted apart and change nothing.
    """

    def client() -> LightspeedClient:
        budget = RateBudget.for_store(sim.base_url, 1, budget_dir, reserve=0) if budget_dir else None
        return LightspeedClient(
            sim.base_url, sim.token, budget=budget, backoff_base=0.2, **sim.CLIENT_OPTIONS
        )

    phases: dict[str, Any] = {}
    c = client()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    cursor = 0
    for page in c.iter_pages("/customers", params={"deleted": "true"}):
        rows += [
            {k: r.get(k) for k in ("id", "customer_group_id", "deleted_at", "version")} for r in page.data
        ]
        cursor = page.version_max or cursor
    phases["extract_customers"] = c.stats.as_dict()["requests"]
    paths = RunPaths(data_dir, AS_OF)
    t1 = time.perf_counter()
    before = c.stats.as_dict()["requests"]
    refs = sync.prepare_sync(
        c,
        master,
        pd.DataFrame(rows),
        TierRules(),
        paths,
        customers_cursor=cursor,
        writes_allowed=True,
        allow_mass_change=allow_mass_change,
    )
    phases["plan"] = c.stats.as_dict()["requests"] - before
    old_rechecks: list[int] = []

    def one_batch(ref: Any) -> Any:
        if before_this_release:
            probe = client()
            moves = read_batch(ref)["moves"]
            recheck_customers(probe, [m["customer_id"] for m in moves], cursor)
            old_rechecks.append(probe.stats.as_dict()["requests"])
        return sync.sync_batch(ref, client(), writes_allowed=True)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one_batch, refs))
    t2 = time.perf_counter()
    phases["batches"] = sum(r["api"]["requests"] for r in results)
    phases["membership_posts"] = sum(math.ceil(r["size"] / 100) for r in results)
    phases["rechecks"] = phases["batches"] - phases["membership_posts"]
    groups = sync.groups_from_plan(paths)
    assert groups is not None
    v = client()
    check = sync.verify_group_counts(
        v,
        master,
        groups,
        expected_members=sync.read_expected_members(paths),
        left_alone=sync.left_alone_ids(paths),
        paths=paths,
    )
    phases["verify_group_counts"] = v.stats.as_dict()["requests"]
    t3 = time.perf_counter()
    before_release: dict[str, int] = {}
    if before_this_release:
        old = client()
        sync.verify_group_counts(old, master, groups, expected_members=sync.read_expected_members(paths))
        before_release = {
            "rechecks": sum(old_rechecks),
            "verify_group_counts": old.stats.as_dict()["requests"],
        }
    moves = sum(r["size"] for r in results)
    page_cap = int(getattr(sim, "page_cap", 200))
    return {
        "requests": phases,
        "sync_requests": phases["plan"] + phases["batches"] + phases["verify_group_counts"],
        "lower_bound": phases["membership_posts"] + math.ceil(moves / page_cap) + 1 + 2,
        "before_this_release": before_release,
        "batches": len(refs),
        "moves": moves,
        "updated": sum(r["updated"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "rate_limited": sum(r["api"]["rate_limited"] for r in results),
        "group_counts_match": check["group_counts_match"],
        "listed_groups": len(check.get("listed_groups") or []),
        "seconds": {"extract": t1 - t0, "plan_and_write": t2 - t1, "verify": t3 - t2},
    }


def limit_lower_bound(requests: int, limit: int, window: float = WINDOW) -> float:
    """Least time `requests` can take under `limit` per window: every full window but the last is waited out."""
    return max(0, math.ceil(requests / limit) - 1) * window


def requests_table(
    sizes: list[int], change_fraction: float, page_cap: int, workers: int, seed: int, legacy: bool
) -> None:
    print(
        f"== 1. requests per sync (page cap {page_cap}, {workers} pool slots): grow with the changes, not the customers"
    )
    header = (
        f"  {'scenario':<12} {'customers':>9} {'moves':>7} {'batches':>7} | {'plan':>4} {'re-checks':>9} "
        f"{'writes':>6} {'verify':>6} | {'sync total':>10} {'lower bound':>11}"
    )
    if legacy:
        header += f" | {'before: re-checks':>17} {'verify':>6} {'total':>6}"
    print(header)
    for n in sizes:
        for name, fraction, onboarding in (
            ("quiet day", 0.0, False),
            ("day", change_fraction, False),
            ("onboarding", 0.0, True),
        ):
            store, master = build_store(n, round(n * fraction), seed + n, onboarding=onboarding)
            with (
                tempfile.TemporaryDirectory() as tmp,
                running_simulator(store=store, page_cap=page_cap, rate_limit=10**9) as sim,  # counting, not timing
            ):
                out = run_sync(
                    sim,
                    master,
                    tmp,
                    budget_dir=None,
                    workers=workers,
                    allow_mass_change=True,  # 2 % of 100k trips the downgrade cap (500): intended here
                    before_this_release=legacy,
                )
            assert out["group_counts_match"] and out["errors"] == 0 and out["updated"] == out["moves"], out
            r = out["requests"]
            line = (
                f"  {name:<12} {n:>9,} {out['moves']:>7,} {out['batches']:>7} | {r['plan']:>4} {r['rechecks']:>9} "
                f"{r['membership_posts']:>6} {r['verify_group_counts']:>6} | {out['sync_requests']:>10,} "
                f"{out['lower_bound']:>11,}"
            )
            if legacy:
                old = out["before_this_release"]
                total = r["plan"] + r["membership_posts"] + old["rechecks"] + old["verify_group_counts"]
                line += f" | {old['rechecks']:>17,} {old['verify_group_counts']:>6,} {total:>6,}"
            print(line, flush=True)
    print(
        "  lower bound = membership calls (<= 100 ids each) + every change read once from the feed + its end page"
        " + the group list (2)\n  (the customer extraction, done for the CLV engine anyway, is not counted)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="store sizes (customers)"
    )
    parser.add_argument("--customers", type=int, default=10_000, help="store size of the timing run")
    parser.add_argument("--change-fraction", type=float, default=0.02)
    parser.add_argument("--moves", type=int, default=2_000, help="moves for the timing run")
    parser.add_argument("--page-cap", type=int, default=200, help="largest page the simulator serves")
    parser.add_argument("--latency", type=float, default=0.05, help="added seconds per request (WAN-like)")
    parser.add_argument("--workers", type=int, default=2, help="pool slots (lightspeed_api)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--no-before", action="store_true", help="skip the previous release's re-checks and group check"
    )
    parser.add_argument("--skip-timing", action="store_true", help="only the request counts")
    args = parser.parse_args()

    requests_table(
        args.sizes, args.change_fraction, args.page_cap, args.workers, args.seed, not args.no_before
    )
    if args.skip_timing:
        return
    limit = store_limit(1)
    print(
        f"\n== 2. time: {args.moves:,} moves at {limit} requests / {WINDOW:.0f} s (one register), latency {args.latency}s"
    )
    store, master = build_store(args.customers, args.moves, args.seed + 1)
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory() as budget_dir,
        running_simulator(store=store, page_cap=args.page_cap, registers=1, window_seconds=WINDOW) as sim,
    ):
        if args.latency > 0:
            sim.faults.add("latency", seconds=args.latency)
        out2 = run_sync(sim, master, tmp, budget_dir=budget_dir, workers=args.workers, allow_mass_change=True)
        used = len(sim.requests)
    r = out2["sync_requests"]
    minimum = math.ceil(args.moves / 100)
    print(
        f"  requests             {out2['requests']} (429s: {out2['rate_limited']}; all requests this window: {used})"
    )
    print(
        f"  plan + write         {out2['seconds']['plan_and_write']:.1f} s for {out2['updated']} moves, errors {out2['errors']}"
    )
    print(
        f"  lower bound          {minimum} membership calls -> limit wait {limit_lower_bound(minimum, limit):.0f} s, "
        f"latency {minimum * args.latency / args.workers:.1f} s with {args.workers} slots"
    )
    print(f"  our {r} requests      limit wait >= {limit_lower_bound(r, limit):.0f} s")
    orig = 2 * args.moves
    print(
        f"  original approach    {orig:,} requests (GET + write per move) -> limit wait >= "
        f"{limit_lower_bound(orig, limit):.0f} s ({limit_lower_bound(orig, limit) / 60:.0f} min)"
    )


if __name__ == "__main__":
    main()
