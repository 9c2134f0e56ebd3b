"""The sync where the POS answers oddly: empty or cut listings, odd re-checks, a group deleted mid-run.

Against the X-Series simulator over real HTTP (no Airflow DB), with the store's clock pinned after
AS_OF. Each odd answer must end in a clear error before a wrong write, never in a write that
rests on it: duplicate tier groups, a customer moved back over a person's change, or hundreds
of failing per-customer requests for a group that is gone.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest

from include.tier_sync import sync
from include.tier_sync.ledger import RunPaths
from include.tier_sync.lightspeed import LightspeedClient
from include.tier_sync.rules import TierRules
from include.tier_sync.sync.groups import GroupListingError
from include.tier_sync.sync.write import GroupDeletedError, RecheckUnreliable
from tests import oracle
from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim.server import SimServer

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)
RULES = TierRules()
WRITES = ("POST", "PUT", "DELETE")
GROUP_LISTING = r"^/customer_groups$"
DEFAULT_MISSING = (
    "the group listing does not contain the store's default group ('All Customers' / code 1111111111): "
    "the listing looks incomplete; nothing was created"
)


# -- helpers -----------------------------------------------------------------------------------


class ShortListingClient(LightspeedClient):
    """The real client, except that chosen group listings come back short (as a client that took
    an odd page for the end would return them): the sync's guard must hold even then."""

    def __init__(
        self,
        *args: Any,
        short_reads: Callable[[int], bool],
        keep: Callable[[dict[str, Any]], bool],
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.reads = 0
        self.short_reads = short_reads
        self.keep = keep

    def list_customer_groups(self) -> list[dict[str, Any]]:
        self.reads += 1
        groups = super().list_customer_groups()
        return [g for g in groups if self.keep(g)] if self.short_reads(self.reads) else groups


def client_for(sim: SimServer, **kw: Any) -> LightspeedClient:
    kw.setdefault("backoff_base", 0.01)
    return LightspeedClient(sim.base_url, sim.token, **{**sim.CLIENT_OPTIONS, **kw})


def writes(sim: SimServer) -> int:
    return sum(1 for r in sim.requests if r.method in WRITES)


def live_group_names(sim: SimServer) -> Counter[str]:
    return Counter(g["name"] for g in sim.store.groups.values() if g.get("deleted_at") is None)


def group_of(sim: SimServer, customer_id: str) -> str | None:
    gid = sim.store.customers[customer_id].get("customer_group_id")
    return None if gid is None else str(sim.store.groups[gid]["name"])


def plan_with(
    client: LightspeedClient, sim: SimServer, data_dir: Path
) -> tuple[list[dict[str, Any]], RunPaths]:
    """plan_sync as the DAG runs it: the customer feed (deleted included), its cursor, the master."""
    rows: list[dict[str, Any]] = []
    cursor = 0
    for page in client.iter_pages("/customers", params={"deleted": "true"}):
        rows += [
            {k: r.get(k) for k in ("id", "customer_group_id", "deleted_at", "version")} for r in page.data
        ]
        cursor = page.version_max or cursor
    tiers = {
        cid: e.tier for cid, e in oracle.expected_tiers(sim.store.customers, sim.store.sales, AS_OF).items()
    }
    master = pd.DataFrame({"Customer ID": list(tiers), "Tier": list(tiers.values())})
    paths = RunPaths(str(data_dir), AS_OF)
    refs = sync.prepare_sync(
        client,
        master,
        pd.DataFrame(rows),
        RULES,
        paths,
        customers_cursor=cursor,
        writes_allowed=True,
        allow_mass_change=True,  # the very first sync moves nearly everyone: intended
    )
    return [dict(r) for r in refs], paths


def moves_of(ref: dict[str, Any]) -> list[dict[str, Any]]:
    return list(json.loads(Path(ref["ref"]).read_text())["moves"])


@pytest.fixture
def demo() -> Iterator[SimServer]:
    store = generate_demo_store(seed=7, customers=700, now=AS_OF)  # "... - Seed" is missing
    with running_simulator(store=store, clock=clock_after(AS_OF)) as sim:
        yield sim


# -- (a) a listing that lacks tiers never leads to duplicate groups ----------------------------


def test_a_first_group_listing_without_the_tiers_creates_no_duplicate_groups(demo: SimServer) -> None:
    names = live_group_names(demo)
    demo.faults.add("status", method="GET", path=GROUP_LISTING, status=200, body={"data": []}, times=1)
    with pytest.raises(GroupListingError, match="differs between two reads") as err:
        sync.resolve_groups(client_for(demo), RULES, create_missing=True)
    assert "not trustworthy right now" in str(err.value) and "nothing was created" in str(err.value)
    assert writes(demo) == 0 and live_group_names(demo) == names
    # Airflow's retry, once the listing is whole: only the one genuinely missing group is created.
    groups = sync.resolve_groups(client_for(demo), RULES, create_missing=True)
    assert groups.created == ("Seed",) and writes(demo) == 1
    assert max(live_group_names(demo).values()) == 1


def test_a_creation_listing_that_comes_back_short_fails_the_plan_before_any_write(
    demo: SimServer, tmp_path: Path
) -> None:
    names = live_group_names(demo)
    # The plan's listing is whole; the one read again before creating "Seed" comes back empty.
    client = ShortListingClient(
        demo.base_url,
        demo.token,
        backoff_base=0.01,
        short_reads=lambda n: n == 2,
        keep=lambda g: False,
        **demo.CLIENT_OPTIONS,
    )
    with pytest.raises(GroupListingError, match="only in the first read"):
        plan_with(client, demo, tmp_path)
    assert writes(demo) == 0 and live_group_names(demo) == names
    assert sync.read_plan_doc(RunPaths(str(tmp_path), AS_OF)) is None  # no batches to dispatch
    refs, _ = plan_with(client_for(demo), demo, tmp_path)  # the retry
    assert refs and writes(demo) == 1 and max(live_group_names(demo).values()) == 1


# -- (b) a listing without the default group creates nothing ----------------------------------


def test_an_empty_group_listing_creates_nothing_and_says_why(demo: SimServer, tmp_path: Path) -> None:
    names = live_group_names(demo)
    demo.faults.add("status", method="GET", path=GROUP_LISTING, status=200, body={"data": []})  # every read
    with pytest.raises(GroupListingError, match=re.escape(DEFAULT_MISSING)):
        plan_with(client_for(demo), demo, tmp_path)
    assert writes(demo) == 0 and live_group_names(demo) == names
    assert sync.read_plan_doc(RunPaths(str(tmp_path), AS_OF)) is None


def test_a_listing_without_the_default_group_creates_nothing(demo: SimServer, tmp_path: Path) -> None:
    names = live_group_names(demo)
    client = ShortListingClient(
        demo.base_url,
        demo.token,
        backoff_base=0.01,
        short_reads=lambda n: True,
        keep=lambda g: g.get("group_id") != "1111111111",  # the tier groups are all there
        **demo.CLIENT_OPTIONS,
    )
    with pytest.raises(GroupListingError, match=re.escape(DEFAULT_MISSING)):
        plan_with(client, demo, tmp_path)
    assert writes(demo) == 0 and live_group_names(demo) == names  # "Seed" was not created either


# -- (c) an odd re-check never overwrites a person's change ------------------------------------


@pytest.mark.parametrize("times", [1, None], ids=["once", "every-time"])
def test_an_odd_recheck_never_writes_a_customer_a_person_moved(
    demo: SimServer, tmp_path: Path, times: int | None
) -> None:
    refs, _ = plan_with(client_for(demo), demo, tmp_path)
    ref = refs[0]
    moved = moves_of(ref)[0]["customer_id"]
    staff = next(gid for gid, g in demo.store.groups.items() if g["name"] == "Staff")
    demo.store.move_customer_to_group(moved, staff)  # a person, between the plan and the write
    before = writes(demo)
    demo.faults.add("status", method="GET", path=r"^/customers$", status=200, body={"data": []}, times=times)
    with pytest.raises(RecheckUnreliable, match="looks empty or cut"):
        sync.sync_batch(ref, client_for(demo), writes_allowed=True)
    assert writes(demo) == before and group_of(demo, moved) == "Staff"
    failed = json.loads(Path(sync.result_path(ref["ref"])).read_text())
    assert failed["status"] == "failed" and "RecheckUnreliable" in failed["error"]
    if times is None:
        return  # every retry fails the same way; nothing is ever written
    retry = sync.sync_batch(ref, client_for(demo), writes_allowed=True)  # Airflow's retry
    assert retry["changed_in_pos_ids"] == [moved] and group_of(demo, moved) == "Staff"
    assert retry["updated"] == ref["size"] - 1 and retry["errors"] == 0


# -- (d) a target group deleted mid-run --------------------------------------------------------


def test_a_target_group_deleted_mid_run_fails_its_batch_at_once(demo: SimServer, tmp_path: Path) -> None:
    refs, paths = plan_with(client_for(demo), demo, tmp_path)
    existing = {g["name"] for g in demo.store.groups.values()} - {"GreenHaus Crew - Seed"}  # not this run's
    ref = max(
        (r for r in refs if demo.store.groups[r["group_id"]]["name"] in existing), key=lambda r: r["size"]
    )
    assert ref["size"] > 100  # without the check: ~2 requests per customer of every refused call
    gid = ref["group_id"]
    name = demo.store.groups[gid]["name"]
    demo.store.delete_group(gid)  # a person deletes the tier group in the POS (members go to the default)
    start = len(demo.requests)
    with pytest.raises(GroupDeletedError) as err:
        sync.sync_batch(ref, client_for(demo), writes_allowed=True)
    assert str(err.value) == f"group {name} ({gid}) was deleted in the POS; re-plan (re-run the DAG)"
    sent = demo.requests[start:]
    beyond_recheck = [r for r in sent if not (r.method == "GET" and r.path == "/api/2.0/customers")]
    assert [(r.method, r.path, r.status) for r in beyond_recheck] == [
        ("POST", f"/api/2.0/customer_groups/{gid}/customers", 404),
        ("GET", f"/api/2.0/customer_groups/{gid}", 200),
    ]
    result = json.loads(Path(sync.result_path(ref["ref"])).read_text())
    assert result["status"] == "failed" and "was deleted in the POS" in result["error"]
    groups = sync.groups_from_plan(paths)
    assert groups is not None
    with pytest.raises(GroupDeletedError, match=re.escape(f"({gid}) was deleted in the POS; re-plan")):
        sync.verify_group_counts(client_for(demo), pd.DataFrame(), groups, expected_members={})
    with pytest.raises(GroupDeletedError, match=re.escape(f"({gid}) was deleted in the POS; re-plan")):
        # from the plan's group state and the feed (no group listed): the group list still tells
        sync.verify_group_counts(client_for(demo), pd.DataFrame(), groups, expected_members={}, paths=paths)
    log_doc = sync.finish_sync(paths, {"run_id": "t"})
    assert log_doc["failed_batches"] >= 1 and "re-plan" in json.dumps(log_doc["error_details"])


def test_the_task_fails_a_deleted_group_without_retries(
    demo: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.definitions.retry_policy import RetryAction

    from include.tier_sync import tasks
    from include.tier_sync.retry_rules import decision_for

    refs, paths = plan_with(client_for(demo), demo, tmp_path)
    ref = refs[0]
    demo.store.delete_group(ref["group_id"])
    monkeypatch.setattr(tasks, "run_paths", lambda context: paths)  # no Variables, no calendar
    monkeypatch.setattr(tasks, "_client", lambda: client_for(demo))
    with pytest.raises(GroupDeletedError, match="was deleted in the POS; re-plan") as raised:
        tasks.sync_batch_task({}, ref)
    # The DAG's retry policy fails it at once (no retries).
    assert decision_for(raised.value).action is RetryAction.FAIL
