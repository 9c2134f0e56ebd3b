"""What the sync costs in requests, counted by the simulator: it grows with the changes, not the store.

Issue 17: the group check used to list every tier group (one request per page of members, every
day), and each batch's pre-write re-check paged the customers feed from the plan's cursor, which by
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
    from include.tier_sync.sync.contracts import GroupCheck
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


def check(
    sim: SimServer, paths: RunPaths, master: pd.DataFrame, *, by_feed: bool = True
) -> tuple[GroupCheck, int]:
    """verify_group_counts as the task calls it (by_feed) or the old way (every group listed); its requests."""
    groups = sync.groups_from_plan(paths)
    assert groups is not None
    start = len(sim.requests)
    result = sync.verify_group_counts(
        client_for(sim),
        master,
        groups,
        expected_members=sync.read_expected_members(paths),
        left_alone=sync.left_alone_ids(paths),
        paths=paths if by_feed else None,
    )
    return result, len(sim.requests) - start


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


# -- the group check ---------------------------------------------------------------------------


def test_a_quiet_days_group_check_costs_the_same_at_any_store_size(tmp_path: Path) -> None:
    cost: dict[int, int] = {}
    listing: dict[int, int] = {}
    for n in (2_000, 8_000):
        store, master = build_store(n, seed=n)
        with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
            refs, paths = plan(sim, tmp_path / str(n), master)
            assert refs == []  # a quiet day: nobody changed tier
            result, cost[n] = check(sim, paths, master)
            assert result["group_counts_match"] is True
            assert result["method"] == "feed" and result["listed_groups"] == []
            assert result["api"]["requests"] == cost[n]
            old, listing[n] = check(sim, paths, master, by_feed=False)
            assert old["group_counts"] == result["group_counts"]  # the same answer, both ways
    # one page of the group list and its end, one page of the feed since the plan (its anchor) and its end
    assert cost[2_000] == cost[8_000] == 4
    assert listing[8_000] > 2 * listing[2_000] > 2 * 4  # the old check grew with the store


def test_the_group_check_sees_a_persons_change_after_the_plan_and_says_who(tmp_path: Path) -> None:
    store, master = build_store(1_500, changes=40, seed=3)
    with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
        refs, paths = plan(sim, tmp_path, master)
        moved = [m["customer_id"] for ref in refs for m in moves_of(ref)]
        results = [sync.sync_batch(r, client_for(sim), writes_allowed=True) for r in refs]
        assert sum(r["updated"] for r in results) == len(moved) == 40
        tier_of = dict(zip(master["Customer ID"], master["Tier"], strict=True))
        quiet = next(
            c for c, t in tier_of.items() if t == "Bloom" and c not in moved and group_of(sim, c) != "Staff"
        )
        ours = next(c for c in moved if tier_of[c] != "Bloom")
        staff = next(g for g, doc in sim.store.groups.items() if doc["name"] == "Staff")
        bloom = next(g for g, doc in sim.store.groups.items() if doc["name"] == RULES.group_for("Bloom"))
        sim.store.move_customer_to_group(quiet, staff)  # a person, after the writes
        sim.store.move_customer_to_group(ours, bloom)  # a person undoes one of our moves

        result, cost = check(sim, paths, master)
        counts = result["group_counts"]
        assert result["group_counts_match"] is False
        assert counts["Bloom"]["missing_ids"] == [quiet] and counts["Bloom"]["unexpected_ids"] == [ours]
        assert counts[tier_of[ours]]["missing_ids"] == [ours]
        mismatched = {c for v in counts.values() for c in v["missing_ids"] + v["unexpected_ids"]}
        assert mismatched == {quiet, ours}
        # one of our writes is not in its group any more: that group is listed to be sure of it
        assert result["listed_groups"] == [next(r["group_id"] for r in refs if r["tier"] == tier_of[ours])]
        old, listed = check(sim, paths, master, by_feed=False)
        assert old["group_counts"] == counts and listed > cost


def test_the_group_check_lists_the_written_groups_when_the_feed_hides_membership_writes(
    tmp_path: Path,
) -> None:
    """The API variant where a membership call keeps the customer's version: the feed never shows
    our moves, so the check lists the groups it wrote to, and still tells the truth."""
    store, master = build_store(1_500, changes=40, seed=4)
    with running_simulator(store=store, clock=clock_after(AS_OF), membership_bumps_version=False) as sim:
        refs, paths = plan(sim, tmp_path, master)
        for ref in refs:
            sync.sync_batch(ref, client_for(sim), writes_allowed=True)
        assert_in_tier_groups(sim, master)
        result, _ = check(sim, paths, master)
        assert result["group_counts_match"] is True
        assert result["listed_groups"] == sorted({r["group_id"] for r in refs})
        old, _ = check(sim, paths, master, by_feed=False)
        assert old["group_counts"] == result["group_counts"]
        # a person's change (which does stamp the customer) is still seen
        victim = moves_of(refs[0])[0]["customer_id"]
        staff = next(g for g, doc in sim.store.groups.items() if doc["name"] == "Staff")
        sim.store.move_customer_to_group(victim, staff)
        result, _ = check(sim, paths, master)
        assert result["group_counts"][refs[0]["tier"]]["missing_ids"] == [victim]
        assert check(sim, paths, master, by_feed=False)[0]["group_counts"] == result["group_counts"]


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
        result, cost = check(sim, paths, master)
        assert result["group_counts_match"] is True and result["listed_groups"] == [] and cost == 4


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
        result, _ = check(sim, paths, master)
        assert result["group_counts_match"] is True and result["listed_groups"] == []
        views = [p.name for p in Path(paths.run_sync_plan_dir).iterdir() if p.name.startswith("feed-")]
        assert len(views) == 1  # older views are removed once a newer one is saved
