"""Progress at the till against the X-Series simulator over real HTTP (no Airflow).

The group sync runs first (as in the DAG), then plan_progress -> progress_batch -> the log's
progress section. Every customer's custom field is checked against tests/oracle.py's text; the
simulator's request log counts the writes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest

from include.tier_sync import settings
from include.tier_sync.ledger import RunPaths
from include.tier_sync.lightspeed import LightspeedUnavailable
from include.tier_sync.rules import TierRules
from include.tier_sync.sync import progress
from include.tier_sync.sync.progress_write import write_progress_batch
from tests import oracle
from tests.unit.test_sync_against_simulator import client_for, extract_customers, full_run
from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim.server import SimServer

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 25, 2, tzinfo=UTC)
RULES = TierRules()
FIELD = "custom_field_2"
ONE = r"^/customers/[^/]+$"
MANAGED = {*oracle.GROUPS.values(), oracle.DEFAULT_GROUP, None}
ROOMY = 100_000  # requests per window: these tests are about what is written, not about pacing


def master_frame(sim: SimServer, as_of: datetime) -> pd.DataFrame:
    """The master CSV's columns progress reads, from the oracle (strings, as the CSV holds them)."""
    exp = oracle.expected_tiers(sim.store.customers, sim.store.sales, as_of)
    return pd.DataFrame({
        "Customer ID": list(exp), "Tier": [e.tier for e in exp.values()],
        "Lifetime Value": [e.ltv for e in exp.values()], "Order Count": [str(e.orders) for e in exp.values()],
        "Purchases Last 30 Days": [str(e.last_30) for e in exp.values()],
        "Loyalty Member": ["true" if e.loyalty else "false" for e in exp.values()],
    })


def group_name(sim: SimServer, cid: str) -> str | None:
    gid = sim.store.customers[cid].get("customer_group_id")
    return None if gid is None else str(sim.store.groups[gid]["name"])


def expected_fields(sim: SimServer, as_of: datetime, before: dict[str, Any]) -> dict[str, Any]:
    """customer id -> what the field must hold: the oracle's text for managed live customers, else as before."""
    exp = oracle.expected_tiers(sim.store.customers, sim.store.sales, as_of)
    out = {}
    for cid, customer in sim.store.customers.items():
        live = customer.get("deleted_at") is None and cid in exp
        out[cid] = oracle.progress_text(exp[cid]) if live and group_name(sim, cid) in MANAGED else before[cid]
    return out


def fields(sim: SimServer) -> dict[str, Any]:
    return {cid: c.get(FIELD) for cid, c in sim.store.customers.items()}


def puts(sim: SimServer, status: int | None = None) -> Counter[str]:
    return Counter(r.path.rsplit("/", 1)[-1] for r in sim.requests
                   if r.method == "PUT" and (status is None or r.status == status))


def run_progress(sim: SimServer, data_dir: Path, as_of: datetime = NOW, *, dry_run: bool = False,
                 client_kw: dict[str, Any] | None = None, **sync_kw: Any) -> dict[str, Any]:
    """One DAG run's sync: extraction, the group sync, then the progress tasks and the log's section."""
    current, _ = extract_customers(client_for(sim))
    full_run(sim, data_dir, as_of, dry_run=dry_run, **sync_kw)
    paths = RunPaths(str(data_dir), as_of)
    refs = progress.plan_progress(paths, master_frame(sim, as_of), current, RULES, field=FIELD, dry_run=dry_run)
    for ref in refs:
        write_progress_batch(ref, client_for(sim, **(client_kw or {})), writes_allowed=ref["writes_allowed"])
    return progress.finish_progress(paths)


@pytest.fixture
def demo() -> Iterator[SimServer]:
    store = generate_demo_store(seed=7, customers=300, now=NOW)
    with running_simulator(store=store, clock=clock_after(NOW), rate_limit=ROOMY) as sim:
        yield sim


def test_only_changed_customers_are_written_and_a_second_run_writes_nothing(demo: SimServer, tmp_path: Path) -> None:
    before = fields(demo)
    staff = demo.store.labels["staff_high_spender"]
    section = run_progress(demo, tmp_path, allow_mass_change=True)
    assert fields(demo) == expected_fields(demo, NOW, before)
    assert demo.store.customers[staff][FIELD] is None  # protected: never touched
    assert staff not in puts(demo)
    assert section["written"] == section["planned"] == sum(puts(demo).values()) > 100
    assert max(puts(demo).values()) == 1 and section["failed"] == 0
    assert section["skipped_protected"] >= 2 and section["unchanged"] == 0
    names = {cid: c.get("first_name") for cid, c in demo.store.customers.items()}

    requests = len(demo.requests)
    again = run_progress(demo, tmp_path)  # the same day again: nothing to write, nothing even to read
    assert again["written"] == again["planned"] == 0 and again["unchanged"] == section["written"]
    one_by_one = [r for r in demo.requests[requests:] if r.method in ("PUT", "POST") or
                  (r.method == "GET" and r.path.count("/") == 4 and "/customers/" in r.path)]
    assert one_by_one == []
    assert {cid: c.get("first_name") for cid, c in demo.store.customers.items()} == names


def test_a_persons_edit_and_a_new_purchase_are_the_only_writes_of_the_next_run(demo: SimServer, tmp_path: Path) -> None:
    run_progress(demo, tmp_path, allow_mass_change=True)
    written = sum(puts(demo).values())
    texts = {cid: t for cid, t in fields(demo).items() if t}
    edited, phone_only = sorted(texts)[:2]
    demo.store.update_customer(edited, {FIELD: "call me"})  # a person overwrote the field
    demo.store.update_customer(phone_only, {"phone": "+64 9 555 0000"})  # a person changed something else
    section = run_progress(demo, tmp_path)
    assert demo.store.customers[edited][FIELD] == texts[edited]
    assert demo.store.customers[phone_only][FIELD] == texts[phone_only]
    assert sum(puts(demo).values()) == written + 1  # only the overwritten field is written back
    assert section["planned"] == 2 and section["written"] == 1 and section["unchanged"] == len(texts) - 1
    # our own writes bumped versions, yet the group sync saw no person's change
    log_doc = full_run(demo, tmp_path).log
    assert log_doc["changed_in_pos"] == 0 and log_doc["planned_moves"] == 0


@pytest.mark.parametrize("variant", [{"put_semantics": "replace"}, {"put_response": "bare"}])
def test_whole_record_is_written_under_either_put_variant(tmp_path: Path, variant: dict[str, str]) -> None:
    store = generate_demo_store(seed=3, customers=120, now=NOW)
    with running_simulator(store=store, clock=clock_after(NOW), rate_limit=ROOMY, **variant) as sim:
        before = {cid: dict(c) for cid, c in sim.store.customers.items()}
        section = run_progress(sim, tmp_path, allow_mass_change=True)
        assert fields(sim) == expected_fields(sim, NOW, {c: v.get(FIELD) for c, v in before.items()})
        for cid, c in sim.store.customers.items():  # nothing else of the record was lost
            for key in ("first_name", "last_name", "email", "enable_loyalty", "note"):
                assert c.get(key) == before[cid].get(key), (cid, key)
        again = run_progress(sim, tmp_path)
        assert again["written"] == 0 and section["failed"] == 0


def test_faults_still_end_exact_without_duplicate_writes(demo: SimServer, tmp_path: Path) -> None:
    before = fields(demo)
    for kind, skips in (("status", (5, 50)), ("reset", (20, 80)), ("apply_then_500", (35, 110))):
        for skip in skips:  # one fault each, on six different customers' PUTs
            demo.faults.add(kind, method="PUT", path=ONE, times=1, skip=skip)
    demo.faults.add("status", method="GET", path=ONE, times=2, skip=60, status=429)
    section = run_progress(demo, tmp_path, allow_mass_change=True)
    assert fields(demo) == expected_fields(demo, NOW, before)
    assert section["failed"] == 0 and section["written"] == section["planned"]
    assert max(puts(demo, 200).values()) == 1  # each customer written once...
    assert sum(puts(demo).values()) == section["written"] + 6  # ...plus the client's retries of the 6 faults
    assert section["api"]["retries"] >= 6


def refs_plan_id(paths: RunPaths) -> str:
    return str(json.loads(Path(progress.plan_file(paths)).read_text())["plan_id"])


def test_a_failed_batch_is_retried_idempotently(demo: SimServer, tmp_path: Path) -> None:
    before = fields(demo)
    current, _ = extract_customers(client_for(demo))
    full_run(demo, tmp_path, allow_mass_change=True)
    paths = RunPaths(str(tmp_path), NOW)
    refs = progress.plan_progress(paths, master_frame(demo, NOW), current, RULES, field=FIELD)
    demo.faults.add("apply_then_500", method="PUT", path=ONE, skip=30, times=1)  # lands, answered 500
    with pytest.raises(LightspeedUnavailable):  # no client retries: the batch fails, "Airflow" retries it
        write_progress_batch(refs[0], client_for(demo, max_retries=0), writes_allowed=True)
    early = progress.finish_progress(paths)  # a log written now names every customer not written
    first = [i["customer_id"] for i in json.loads(Path(refs[0]["ref"]).read_text())["items"]][:30]
    assert early["written"] == 30 and early["failed"] == sum(r["size"] for r in refs) - 30
    named = {d["customer_id"] for r in refs for d in progress._result_of(r, refs_plan_id(paths))["failed_details"]}
    assert named == {i["customer_id"] for r in refs for i in json.loads(Path(r["ref"]).read_text())["items"]} - set(first)
    for ref in refs:
        write_progress_batch(ref, client_for(demo), writes_allowed=True)
    section = progress.finish_progress(paths)
    assert fields(demo) == expected_fields(demo, NOW, before)
    assert section["failed"] == 0 and section["written"] == section["planned"] and section["unchanged"] == 0
    assert sum(puts(demo).values()) == section["planned"]  # the landed write was recognised, not sent again


def test_protected_and_refused_customers(demo: SimServer, tmp_path: Path) -> None:
    current, _ = extract_customers(client_for(demo))
    full_run(demo, tmp_path, allow_mass_change=True)
    paths = RunPaths(str(tmp_path), NOW)
    refs = progress.plan_progress(paths, master_frame(demo, NOW), current, RULES, field=FIELD)
    items = [i["customer_id"] for i in json.loads(Path(refs[0]["ref"]).read_text())["items"]]
    staff = next(g for g, v in demo.store.groups.items() if v["name"] == "Staff")
    moved, refused, gone = items[:3]
    demo.store.move_customer_to_group(moved, staff)  # a person, between plan and write
    demo.faults.add("status", method="PUT", path=rf"^/customers/{refused}$", status=400)
    demo.faults.add("status", method="GET", path=rf"^/customers/{gone}$", status=404)
    for ref in refs:
        write_progress_batch(ref, client_for(demo), writes_allowed=True)
    section = progress.finish_progress(paths)
    assert demo.store.customers[moved][FIELD] is None and moved not in puts(demo)
    assert section["failed"] == 2 and {d["customer_id"] for d in section["failed_details"]} == {refused, gone}
    assert section["written"] == section["planned"] - 3
    with pytest.raises(progress.ProgressFailed):
        progress.raise_for_progress_errors(section)


def test_dry_run_and_superseded_runs_write_nothing(demo: SimServer, tmp_path: Path) -> None:
    before = fields(demo)
    section = run_progress(demo, tmp_path, dry_run=True)
    assert fields(demo) == before and not puts(demo)
    assert section["planned"] > 100 and section["written"] == 0 and section["batches"] == 0
    assert section["skipped_reason"] == "dry_run" and section["dry_run"] is True
    superseded = run_progress(demo, tmp_path, writes_allowed=False, skipped_reason="superseded")
    assert superseded["skipped_reason"] == "superseded" and fields(demo) == before
    assert not Path(progress.state_file(RunPaths(str(tmp_path), NOW))).exists()


@pytest.mark.parametrize("raw", ["custom_field_9", "note", "custom_field_", "CUSTOM_FIELD_1", "custom_field_1,2"])
def test_bad_settings_are_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=settings.VAR_PROGRESS_FIELD):
        settings.check_progress_field(raw)


def test_the_setting_is_off_by_default() -> None:
    assert settings.check_progress_field(None) is None and settings.check_progress_field("  ") is None
    assert settings.check_progress_field(" custom_field_4 ") == "custom_field_4"


def _task_context() -> dict[str, Any]:
    return {"data_interval_start": NOW - timedelta(days=1), "data_interval_end": NOW, "params": {}}


def test_the_task_skips_when_off_and_fails_naming_a_bad_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from include.tier_sync.tasks import plan_progress_task

    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_PROGRESS_FIELD", "")
    with pytest.raises(AirflowSkipException, match=settings.VAR_PROGRESS_FIELD):
        plan_progress_task(_task_context())
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_PROGRESS_FIELD", "note")
    with pytest.raises(AirflowFailException, match=settings.VAR_PROGRESS_FIELD):
        plan_progress_task(_task_context())
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_PROGRESS_FIELD", FIELD)
    with pytest.raises(AirflowSkipException, match="no sync plan"):  # the group sync failed upstream
        plan_progress_task(_task_context())
    assert not list(tmp_path.rglob("*.json"))


def test_the_text_follows_the_oracle_on_the_planted_cases_to_the_cent() -> None:
    from include.tier_sync.explain import progress_text
    from tests.unit.test_explain import CASES

    texts = {}
    for name, case in CASES.items():
        e = case.expected()
        texts[name] = progress_text(e.tier, e.ltv_cents, e.orders, e.last_30, e.loyalty, RULES)
        assert texts[name] == oracle.progress_text(e), name
    assert texts["sprout by value, $42.10 short of Bloom"] == "Sprout · $42.10 to Bloom"
    assert texts["evergreen at the threshold"] == "Evergreen · top tier"
    assert texts["bloom one cent over"] == "Bloom · $749.99 to Evergreen"
    assert texts["no purchase yet"] == "No tier yet · first purchase to Seed"


def test_erasing_a_customer_removes_them_from_the_progress_state(tmp_path: Path) -> None:
    from include.tier_sync.erasure import erase_customer

    paths = RunPaths(str(tmp_path), NOW)
    progress.write_state(paths, FIELD, {"c1": {"text": "Seed · $10.00 to Sprout", "version": 5},
                                        "c2": {"text": "Evergreen · top tier", "version": 7}})
    erase_customer(str(tmp_path), "c1")
    assert progress.read_state(paths, FIELD) == {"c2": {"text": "Evergreen · top tier", "version": 7}}


def test_a_master_whose_tier_does_not_follow_from_its_figures_is_refused(demo: SimServer, tmp_path: Path) -> None:
    current, _ = extract_customers(client_for(demo))
    full_run(demo, tmp_path, dry_run=True)
    master = master_frame(demo, NOW)
    row = master.index[master["Tier"] == "Bloom"][0]
    master.loc[row, "Tier"] = "Evergreen"
    with pytest.raises(ValueError, match="does not follow from their figures"):
        progress.plan_progress(RunPaths(str(tmp_path), NOW), master, current, RULES, field=FIELD)
    assert not Path(progress.plan_file(RunPaths(str(tmp_path), NOW))).exists() and not puts(demo)
