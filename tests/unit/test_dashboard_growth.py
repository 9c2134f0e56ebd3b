"""At risk in full and growing (include/tier_sync/dashboard_growth.py, issue 18), against the oracle.

Each test plants customers whose sales sit exactly at an edge (a return of exactly the amount that
drops a tier and one cent less, a purchase exactly at the return window's start and a microsecond
either side, a streak ending exactly at the next run's as_of and a microsecond before, an upgrade
N and N+1 runs back, a lifetime value exactly the distance below a threshold and a cent more),
builds a data dir with the pipeline's own functions (OrderStore, compute_tiers, publish_run), and
checks what the page lists against the independent oracle (tests/oracle.py): a return or a run
the page predicts is replayed in the oracle's plain reading of the rules.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from include.tier_sync import dashboard, dashboard_growth, fileio, settings
from include.tier_sync.dashboard_growth import MOVED_UP, NEAR_NEXT, NEXT_RUN, RETURN, STREAK, Options
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import compute_tiers, publish_run
from include.tier_sync.rules import TIER_RANK, TierRules
from include.tier_sync.runtime import iso
from include.tier_sync.store import CUSTOMERS, CUSTOMERS_SCHEMA, SALES, SALES_SCHEMA, OrderStore
from tests import oracle
from tests.unit.test_clv import customer, customers_df, sale, sales_df

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
NEXT = AS_OF + timedelta(days=1)  # the next scheduled run (02:00 UTC daily)
DAY = timedelta(days=1)
US = timedelta(microseconds=1)
RULES = TierRules()
OPTS = Options(return_window_days=30, distance_cents=5000)


@dataclass
class World:
    """Planted customers and sales, readable by the pipeline (store frames) and by the oracle."""

    loyalty: dict[str, bool] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    sales: list[tuple[str, str, int, datetime]] = field(default_factory=list)

    def add(self, cid: str, *bought: tuple[int, datetime], loyalty: bool = False, name: str | None = None) -> World:
        self.loyalty[cid] = loyalty
        self.names[cid] = name or f"Name {cid}"
        for cents, when in bought:
            self.sales.append((f"s{len(self.sales)}", cid, cents, when))
        return self

    def oracle_sales(self, extra: Sequence[tuple[str, int, datetime]] = ()) -> dict[str, dict[str, Any]]:
        out = {}
        for sid, cid, cents, when in [*self.sales, *((f"x{i}", *e) for i, e in enumerate(extra))]:
            sign = "-" if cents < 0 else ""
            out[sid] = {"id": sid, "customer_id": cid, "status": "CLOSED", "deleted_at": None,
                        "sale_date": when.isoformat(), "total_price_incl": f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"}
        return out

    def tiers(self, as_of: datetime, extra: Sequence[tuple[str, int, datetime]] = ()) -> dict[str, str]:
        customers = {c: {"id": c, "enable_loyalty": loyal, "deleted_at": None} for c, loyal in self.loyalty.items()}
        return {c: e.tier for c, e in oracle.expected_tiers(customers, self.oracle_sales(extra), as_of).items()}

    def build(self, url: str, runs: list[datetime]) -> str:
        store = OrderStore(fileio.join(url, "store"))
        sales = sales_df(*(sale(sid, cid, cents, when) for sid, cid, cents, when in self.sales))
        custs = customers_df(*(customer(c, loyalty=loyal, name=self.names[c]) for c, loyal in self.loyalty.items()))
        store.append(SALES, pa.Table.from_pandas(sales[SALES_SCHEMA.names], schema=SALES_SCHEMA, preserve_index=False), cursor=1)
        store.append(CUSTOMERS, pa.Table.from_pandas(custs[CUSTOMERS_SCHEMA.names], schema=CUSTOMERS_SCHEMA,
                                                     preserve_index=False), cursor=1)
        for as_of in runs:
            paths = RunPaths(url, as_of)
            identity = {"dag_id": "customer_tier_sync", "run_id": f"scheduled__{iso(as_of)}", "as_of": iso(as_of)}
            result = compute_tiers(store, paths, identity, RULES)
            fileio.write_json(paths.run_validation_json, {"summary": {"success": True, "run_key": paths.key}})
            publish_run(paths, identity, result["tier_breakdown"])
        return url


@pytest.fixture(autouse=True)
def fresh_cache() -> Any:
    dashboard.clear_cache()
    yield
    dashboard.clear_cache()


@pytest.fixture(params=["local", "memory"])
def base(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A fresh data dir: a local folder, or memory:// (object storage's stand-in)."""
    if request.param == "local":
        yield str(tmp_path)
        return
    url = f"memory://growth-{uuid.uuid4().hex}"
    yield url
    fs, path = fileio.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def entries(url: str, kind: str, opts: Options = OPTS, **kw: Any) -> dict[str, dict[str, Any]]:
    found = (dashboard_growth.risk_entries(url, RULES, opts, **kw) if kind in (RETURN, NEXT_RUN, STREAK)
             else dashboard_growth.growth_entries(url, RULES, opts, **kw))
    return {e["customer_id"]: e for e in found["entries"] if e["kind"] == kind}


# -- returns: the amount to the cent, the window's edge --------------------------------------------------


def returns_world() -> World:
    w = World()
    recent = AS_OF - 5 * DAY
    # Bloom at 849.99: a return of the $100.00 purchase leaves 749.99, under Bloom's 750.00.
    w.add("exact", (74_999, AS_OF - 200 * DAY), (10_000, recent))
    # One cent more before it: returning the same purchase leaves exactly 750.00, still Bloom.
    w.add("cent_less", (75_000, AS_OF - 200 * DAY), (10_000, recent))
    # Evergreen -> Bloom; two returnable purchases, the bigger one drops it furthest.
    w.add("two", (140_000, AS_OF - 300 * DAY), (6_000, AS_OF - 3 * DAY), (90_000, AS_OF - 2 * DAY), loyalty=True)
    # Sprout by value and by 3 purchases: no return takes Sprout away.
    w.add("held", (9_000, AS_OF - 3 * DAY), (9_000, AS_OF - 2 * DAY), (9_000, AS_OF - DAY))
    window = timedelta(days=OPTS.return_window_days)
    # Sprout by value through one purchase at the return window's start, one microsecond inside
    # it, and one microsecond before it (no longer returnable).
    w.add("edge", (30_000, AS_OF - window))
    w.add("inside", (30_000, AS_OF - window + US))
    w.add("outside", (30_000, AS_OF - window - US))
    return w


def test_a_return_of_exactly_the_amount_drops_the_tier_and_one_cent_less_does_not(base: str) -> None:
    w = returns_world()
    url = w.build(base, [AS_OF])
    found = entries(url, RETURN)
    before = w.tiers(AS_OF)
    assert "cent_less" not in found and "held" not in found
    for cid, e in found.items():
        # The page's purchase, returned just before as_of, drops the tier to what the page says.
        purchase = e["purchase"]["amount"]["cents"]
        after = w.tiers(AS_OF, [(cid, -purchase, AS_OF - US)])
        assert e["tier"] == before[cid] and after[cid] == e["drops_to"], cid
        assert TIER_RANK[after[cid]] < TIER_RANK[before[cid]]
        # The smallest return that lowers the tier, to the cent: it drops, a cent less does not.
        need = e["return_needed"]["cents"]
        assert w.tiers(AS_OF, [(cid, -need, AS_OF - US)])[cid] != before[cid]
        assert w.tiers(AS_OF, [(cid, -(need - 1), AS_OF - US)])[cid] == before[cid]
    assert found["exact"]["return_needed"]["cents"] == 10_000 == found["exact"]["purchase"]["amount"]["cents"]
    assert found["exact"]["drops_to"] == "Sprout"
    # Returning the cent_less customer's purchase leaves exactly Bloom's threshold: still Bloom.
    assert w.tiers(AS_OF, [("cent_less", -10_000, AS_OF - US)])["cent_less"] == before["cent_less"] == "Bloom"
    two = found["two"]
    assert (two["purchase"]["amount"]["cents"], two["purchases_that_would"], two["drops_to"]) == (90_000, 1, "Bloom")
    assert two["purchase"]["date"] == iso(AS_OF - 2 * DAY)


def test_the_return_window_starts_exactly_window_days_before_as_of(tmp_path: Any) -> None:
    url = returns_world().build(str(tmp_path), [AS_OF])
    found = entries(url, RETURN)
    assert {"edge", "inside"} <= set(found) and "outside" not in found
    edge = found["edge"]
    assert edge["returnable_until"] == iso(AS_OF)  # the last as_of at which it can still be returned
    assert edge["drops_to"] == "First Time Buyer"
    # A shorter window leaves the edge purchase out; no window at all lists nobody.
    assert "edge" not in entries(url, RETURN, Options(return_window_days=29, distance_cents=5000))
    assert entries(url, RETURN, Options(return_window_days=0, distance_cents=5000)) == {}


# -- the next run ----------------------------------------------------------------------------------------


def test_the_next_run_downgrades_exactly_the_streaks_that_end_before_it(tmp_path: Any) -> None:
    w = World()
    window = timedelta(days=RULES.window_days)
    # Sprout by 3 purchases; the oldest is exactly 30 days before the next run (still counted
    # then), or one microsecond older (gone by then).
    w.add("kept", (500, NEXT - window), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY), loyalty=True)
    w.add("dropped", (500, NEXT - window - US), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY), loyalty=True)
    w.add("later", (500, AS_OF - 10 * DAY), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY))
    w.add("value", (30_000, AS_OF - 40 * DAY))
    url = w.build(str(tmp_path), [AS_OF])
    found = entries(url, NEXT_RUN)
    now, then = w.tiers(AS_OF), w.tiers(NEXT)
    assert set(found) == {c for c in w.loyalty if then[c] != now[c]} == {"dropped"}
    e = found["dropped"]
    assert e["drops_to"] == then["dropped"] == "Seed" and e["next_run_as_of"] == iso(NEXT)
    assert e["leaves_window"] == iso(NEXT - window - US) and e["method"] == "exact"
    # Every next-run entry is also a streak; the streak list shows the later one too.
    assert {"kept", "dropped", "later"} == set(entries(url, STREAK))


def test_next_run_as_of_follows_the_schedule() -> None:
    assert settings.SCHEDULE_AT.hour == 2 and settings.SCHEDULE_AT.minute == 0
    assert dashboard_growth.next_run_as_of(AS_OF) == NEXT
    assert dashboard_growth.next_run_as_of(AS_OF - timedelta(hours=1)) == AS_OF  # a manual run at 01:00
    assert dashboard_growth.next_run_as_of(AS_OF + timedelta(hours=12, minutes=37)) == NEXT


# -- growing: moved up in the last N runs, near the next tier -------------------------------------------------


RUNS = [AS_OF - 3 * DAY, AS_OF - 2 * DAY, AS_OF - DAY, AS_OF]


def growth_world() -> World:
    w = World()
    w.add("up_2_ago", (3_000, AS_OF - 90 * DAY), (30_000, AS_OF - 2 * DAY - timedelta(hours=3)))  # FTB -> Sprout
    w.add("up_now", (3_000, AS_OF - 90 * DAY), (80_000, AS_OF - timedelta(hours=3)), loyalty=True)  # Seed -> Bloom
    # Up two runs ago, then down again (a return): its newest change is a downgrade.
    w.add("up_down", (3_000, AS_OF - 90 * DAY), (30_000, AS_OF - 2 * DAY - timedelta(hours=3)),
          (-30_000, AS_OF - DAY - timedelta(hours=3)))
    w.add("steady", (200_000, AS_OF - 100 * DAY))
    # A customer since 2024 whose first order is in the last run: None -> First Time Buyer is an
    # upgrade, as on the page's moves chart.
    w.add("first_order", (1_000, AS_OF - timedelta(hours=5)))
    return w


def oracle_moved_up(w: World, runs: list[datetime], n: int) -> set[str]:
    """Customers whose newest tier change in the newest n runs is an upgrade, by the oracle."""
    tiers = [w.tiers(r) for r in runs]
    out = set()
    for c in w.loyalty:
        last = None
        for i in range(len(runs) - n, len(runs)):
            if i == 0:
                continue
            old, new = tiers[i - 1][c], tiers[i][c]
            if old != new:
                last = (old, new)
        if last and TIER_RANK[last[1]] > TIER_RANK[last[0]]:
            out.add(c)
    return out


def test_moved_up_in_the_last_n_runs_and_not_n_plus_one_back(base: str) -> None:
    w = growth_world()
    url = w.build(base, RUNS)
    for n in (1, 2, 3):
        found = entries(url, MOVED_UP, runs=n)
        assert set(found) == oracle_moved_up(w, RUNS, n), n
    assert set(entries(url, MOVED_UP, runs=1)) == {"up_now", "first_order"}
    assert set(entries(url, MOVED_UP, runs=2)) == {"up_now", "first_order"}  # two runs ago is N+1 back
    three = entries(url, MOVED_UP, runs=3)
    assert set(three) == {"up_now", "first_order", "up_2_ago"}  # ... and inside the window of 3
    assert (three["up_2_ago"]["from"], three["up_2_ago"]["to"]) == ("First Time Buyer", "Sprout")
    assert three["up_2_ago"]["moved_at"] == iso(AS_OF - 2 * DAY) and three["up_now"]["to"] == "Bloom"
    info = dashboard_growth.growth_entries(url, RULES, OPTS, runs=10)
    assert [r["as_of"] for r in info["runs"]] == [iso(r) for r in RUNS]
    assert any("Only 4 published run" in note for note in info["notes"])


def near_world() -> World:
    w = World()
    w.add("at_distance", (70_000, AS_OF - 60 * DAY))  # Sprout, $50.00 short of Bloom
    w.add("cent_more", (69_999, AS_OF - 60 * DAY))  # $50.01 short
    w.add("seed_near", (20_000, AS_OF - 60 * DAY), loyalty=True)  # Seed, $50.00 short of Sprout
    w.add("top", (160_000, AS_OF - 60 * DAY))
    return w


def test_within_distance_of_the_next_threshold_at_the_edge(base: str) -> None:
    w = near_world()
    url = w.build(base, [AS_OF])
    found = entries(url, NEAR_NEXT)
    assert set(found) == {"at_distance", "seed_near"}
    for cid, e in found.items():
        gap = e["amount_needed"]["cents"]
        assert gap <= OPTS.distance_cents
        # A purchase of the gap just before as_of reaches the tier named; a cent less does not.
        assert w.tiers(AS_OF, [(cid, gap, AS_OF - US)])[cid] == e["next_tier"]
        assert w.tiers(AS_OF, [(cid, gap - 1, AS_OF - US)])[cid] == w.tiers(AS_OF)[cid]
    assert (found["at_distance"]["next_tier"], found["seed_near"]["next_tier"]) == ("Bloom", "Sprout")
    wider = entries(url, NEAR_NEXT, Options(return_window_days=30, distance_cents=5001))
    assert "cent_more" in wider and wider["cent_more"]["amount_needed"]["cents"] == 5001


def test_counts_per_kind_and_tier(tmp_path: Any) -> None:
    url = growth_world().build(str(tmp_path), RUNS)
    found = dashboard_growth.growth_entries(url, RULES, OPTS, runs=3)
    page = dashboard_growth.overview(found, dashboard_growth.GROWTH_KINDS, MOVED_UP, 1, 0)
    assert page["counts"]["by_kind"][MOVED_UP] == 3 == page["total"] and len(page["customers"]) == 1
    assert page["counts"]["by_tier"][MOVED_UP] == {**dict.fromkeys(page["counts"]["by_tier"][MOVED_UP], 0),
                                                    "Sprout": 1, "Bloom": 1, "First Time Buyer": 1}


def test_without_a_store_the_page_says_what_it_cannot_list(tmp_path: Any) -> None:
    url = near_world().build(str(tmp_path / "d"), [AS_OF])
    fs, path = fileio.filesystem(fileio.join(url, "store"))
    fs.rm(path, recursive=True)
    risk = dashboard_growth.risk_entries(url, RULES, OPTS)
    grow = dashboard_growth.growth_entries(url, RULES, OPTS)
    assert risk["store_readable"] is False and grow["store_readable"] is False
    assert any("order store could not be read" in n for n in risk["notes"] + grow["notes"])
    empty = dashboard_growth.risk_entries(str(tmp_path / "nothing"), RULES, OPTS)
    assert empty["as_of"] is None and empty["entries"] == []


# -- the settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["-1", "1.5", "thirty", "3651", "1e2", "٣"])
def test_a_bad_return_window_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=settings.VAR_RETURN_WINDOW_DAYS):
        settings.check_return_window_days(raw)


@pytest.mark.parametrize("raw", ["-5", "0", "0.00", "12.345", "fifty", "$50", "1e3", "NaN"])
def test_a_bad_distance_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=settings.VAR_GROWING_DISTANCE):
        settings.check_growing_distance(raw)


def test_settings_defaults_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.check_return_window_days(None) == 30 and settings.check_return_window_days(" 0 ") == 0
    assert settings.check_growing_distance("") == 5000 and settings.check_growing_distance("42.1") == 4210
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETURN_WINDOW_DAYS", "14")
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_GROWING_DISTANCE", "25")
    assert dashboard_growth.load_options() == Options(return_window_days=14, distance_cents=2500)
    dashboard.clear_cache()
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETURN_WINDOW_DAYS", "-3")
    with pytest.raises(ValueError, match="tier_sync_return_window_days"):
        dashboard_growth.load_options()


def test_a_frame_of_entries_has_no_contact_data(tmp_path: Any) -> None:
    url = returns_world().build(str(tmp_path), [AS_OF])
    found = dashboard_growth.risk_entries(url, RULES, OPTS)["entries"]
    assert found and all("email" not in e for e in found)
    assert pd.DataFrame(found)["kind"].isin([RETURN, STREAK, NEXT_RUN]).all()


@pytest.mark.slow
def test_200k_customers_get_one_bounded_page(tmp_path: Any) -> None:
    import json

    from tests.unit.test_dashboard import big_master

    big_master(200_000, AS_OF).to_csv(tmp_path / "customer_analytics_master.csv", index=False)
    (tmp_path / "latest.json").write_text(json.dumps({"as_of": iso(AS_OF), "run_id": "big"}))
    risk = dashboard_growth.overview(dashboard_growth.risk_entries(str(tmp_path), RULES, OPTS),
                                     dashboard_growth.RISK_KINDS, None, 200, 0)
    assert risk["counts"]["by_kind"][STREAK] > 5_000 and len(risk["customers"]) == 200
    assert risk["store_readable"] is False and len(json.dumps(risk)) < 128_000
    grow = dashboard_growth.overview(dashboard_growth.growth_entries(str(tmp_path), RULES, OPTS),
                                     dashboard_growth.GROWTH_KINDS, None, 200, 0)
    assert grow["total"] == 0 and any("order store could not be read" in n for n in grow["notes"])
