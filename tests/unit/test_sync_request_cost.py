"""What the sync costs in requests, counted by the simulator: it grows with the changes, not the store.

Issue 17: each batch's pre-write re-check paged the customers feed from the plan's cursor, which by
then held every customer the earlier batches had moved (requests growing with the square of the
batches). Here the simulator counts each request; every store is built in code with fixed
timestamps and the simulator's clock is pinned after AS_OF.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest

from include.tier_sync import sync
from include.tier_sync.ledger import RunPaths
from include.tier_sync.lightspeed import LightspeedClient
from include.tier_sync.rules import TIERS, TierRules
from include.tier_sync.sync.write import recheck_customers
from tools.lightspeed_sim.store import SimStore
from tools.lightspeed_sim.testing import clock_after, running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim.server import SimServer

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)
RULES = TierRules()
STAMP = "2026-01-01T00:00:00+00:00"
FEED = ("GET", "/api/2.0/customers")
TIER_MIX = (
    ("None", 10),
    ("First Time Buyer", 30),
    ("Seed", 25),
    ("Sprout", 20),
    ("Bloom", 10),
    ("Evergreen", 5),
)


# -- stores built in code ----------------------------------------------------------------------


def build_store(
    customers: int, *, changes: int = 0, onboarding: bool = False, seed: int = 1
) -> tuple[SimStore, pd.DataFrame]:
    """A store and its master CSV: in sync except ``changes`` customers whose tier changed, or
    (``onboarding``) with every customer still in the default group."""
    rng = random.Random(seed)
    store = SimStore(seed=seed)
    default = store.create_group("All Customers", "1111111111")["id"]
    staff = store.create_group("Staff")["id"]
    tier_group = {t: store.create_group(RULES.group_for(t) or t)["id"] for t in TIERS}
    names, weights = zip(*TIER_MIX, strict=True)
    tiers: dict[str, str] = {}
    for _ in range(customers):
        cid = store.new_id()
        tier = rng.choices(names, weights)[0]
        if rng.random() < 0.02:
            group = staff
        elif onboarding or tier == "None":
            group = default
        else:
            group = tier_group[tier]
        store.customers[cid] = {
            "id": cid,
            "first_name": "Cost",
            "last_name": cid[:8],
            "name": f"Cost {cid[:8]}",
            "customer_group_id": group,
            "enable_loyalty": True,
            "created_at": STAMP,
            "updated_at": STAMP,
            "deleted_at": None,
            "version": store.new_version(),
        }
        tiers[cid] = tier
    managed = [
        c for c, t in tiers.items() if t != "None" and store.customers[c]["customer_group_id"] != staff
    ]
    for cid in rng.sample(managed, changes):
        tiers[cid] = rng.choice([t for t in TIERS if t != tiers[cid]])
    return store, pd.DataFrame({"Customer ID": list(tiers), "Tier": list(tiers.values())})


def client_for(sim: SimServer) -> LightspeedClient:
    return LightspeedClient(sim.base_url, sim.token, backoff_base=0.01, **sim.CLIENT_OPTIONS)


def plan(
    sim: SimServer, data_dir: Path, master: pd.DataFrame, **kw: Any
) -> tuple[list[dict[str, Any]], RunPaths]:
    """extract_orders' customer feed, then plan_sync."""
    client = client_for(sim)
    rows: list[dict[str, Any]] = []
    cursor = 0
    for page in client.iter_pages("/customers", params={"deleted": "true"}):
        rows += [
            {k: r.get(k) for k in ("id", "customer_group_id", "deleted_at", "version")} for r in page.data
        ]
        cursor = page.version_max or cursor
    paths = RunPaths(str(data_dir), AS_OF)
    kw.setdefault("writes_allowed", True)
    refs = sync.prepare_sync(client, master, pd.DataFrame(rows), RULES, paths, customers_cursor=cursor, **kw)
    return [dict(r) for r in refs], paths


def feed_requests(sim: SimServer, since: int) -> int:
    return sum(1 for r in sim.requests[since:] if (r.method, r.path) == FEED)


def run_batch(sim: SimServer, ref: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """One mapped sync_batch; its result and how many customers-feed pages its re-check read."""
    start = len(sim.requests)
    result = sync.sync_batch(ref, client_for(sim), writes_allowed=True)
    return dict(result), feed_requests(sim, start)


def group_of(sim: SimServer, cid: str) -> str:
    return str(sim.store.groups[sim.store.customers[cid]["customer_group_id"]]["name"])


def moves_of(ref: dict[str, Any]) -> list[dict[str, Any]]:
    return list(json.loads(Path(ref["ref"]).read_text())["moves"])


def assert_in_tier_groups(sim: SimServer, master: pd.DataFrame, skip: Sequence[str] = ()) -> None:
    """Every customer not in Staff and with a tier is in their tier's group (the sync was exact)."""
    wrong = []
    for cid, tier in zip(master["Customer ID"], master["Tier"], strict=True):
        now = group_of(sim, cid)
        if tier == "None" or now == "Staff" or cid in skip:
            continue
        if now != RULES.group_for(tier):
            wrong.append((cid, tier, now))
    assert not wrong, f"{len(wrong)} customers in the wrong group, e.g. {wrong[:3]}"


# -- the per-batch re-check --------------------------------------------------------------------


def test_per_batch_rechecks_cost_in_proportion_to_the_batch_not_to_the_run(tmp_path: Path) -> None:
    store, master = build_store(3_000, onboarding=True, seed=5)
    with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
        refs, paths = plan(sim, tmp_path, master, allow_mass_change=True, calls_per_batch=1)
        assert len(refs) >= 25 and max(r["size"] for r in refs) == 100
        staff = next(g for g, doc in sim.store.groups.items() if doc["name"] == "Staff")
        last = refs[-1]
        to_staff, to_target = (m["customer_id"] for m in moves_of(last)[:2])
        pages = []
        for i, ref in enumerate(refs):
            if i == 1:  # people, while the run is under way: seen by the last batch through the views
                sim.store.move_customer_to_group(to_staff, staff)
            if i == 2:
                sim.store.move_customer_to_group(to_target, last["group_id"])
            result, n = run_batch(sim, ref)
            pages.append(n)
        # each re-check reads what changed since the previous one (<= 100 customers: one page) and the end
        assert max(pages) == 2, pages
        assert result["changed_in_pos_ids"] == [to_staff]
        assert result["skip_reasons"] == {"already_in_target": 1}
        assert_in_tier_groups(sim, master, skip=[to_staff])
        # the old re-check (from the plan's cursor) of that last batch: every customer moved so far
        start = len(sim.requests)
        recheck_customers(
            client_for(sim),
            [m["customer_id"] for m in moves_of(last)],
            json.loads(Path(last["ref"]).read_text())["customers_cursor"],
        )
        assert feed_requests(sim, start) >= sum(r["size"] for r in refs) // 200 > 5 * max(pages)


def test_concurrent_batches_share_the_feed_views_and_stay_exact(tmp_path: Path) -> None:
    store, master = build_store(3_000, onboarding=True, seed=6)
    with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
        refs, paths = plan(sim, tmp_path, master, allow_mass_change=True, calls_per_batch=1)
        start = len(sim.requests)
        with ThreadPoolExecutor(3) as pool:  # the lightspeed_api pool, wider than the default
            results = list(
                pool.map(lambda ref: sync.sync_batch(ref, client_for(sim), writes_allowed=True), refs)
            )
        assert sum(r["updated"] for r in results) == sum(r["size"] for r in refs)
        assert all(r["changed_in_pos"] == 0 and r["errors"] == 0 for r in results)
        assert_in_tier_groups(sim, master)
        # three at a time, a re-check reads at most the writes of the batches beside it and since
        assert feed_requests(sim, start) <= 3 * len(refs)
        views = [p.name for p in Path(paths.run_sync_plan_dir).iterdir() if p.name.startswith("feed-")]
        assert 1 <= len(views) <= 3  # older views are removed once a newer one is saved
