"""Progress at the till through `airflow dags test` (real Airflow, the simulator over HTTP).

With `tier_sync_progress_field` set, every managed customer's field holds the text the
independent oracle (tests/oracle.py) gives for their tier, protected customers are untouched,
and a second run of the same day writes nothing. With the setting off (every other end-to-end
test) plan_progress is skipped.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import oracle
from tests.integration.test_dag_end_to_end import AS_OF, TOKEN, Deployment, migrated_home  # noqa: F401
from tools.lightspeed_sim import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIELD = "custom_field_3"


@pytest.fixture
def till(migrated_home: Path, tmp_path: Path) -> Iterator[Deployment]:  # noqa: F811
    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(migrated_home / "airflow.db", home / "airflow.db")
    store = generate_demo_store(seed=7, customers=120, now=AS_OF)
    with running_simulator(store=store, token=TOKEN, clock=clock_after(AS_OF)) as sim:
        yield Deployment(home=home, data_dir=tmp_path / "data", sim=sim,
                         extra_env={"AIRFLOW_VAR_TIER_SYNC_PROGRESS_FIELD": FIELD})


def test_every_customer_shows_the_oracles_progress_and_a_second_run_writes_nothing(till: Deployment) -> None:
    dep = till
    store = dep.sim.store
    before = {cid: dict(c) for cid, c in store.customers.items()}
    expected = oracle.expected_tiers(store.customers, store.sales, AS_OF)

    state, output = dep.dags_test(conf={"dry_run": True})  # plans and logs the texts, writes nothing
    assert state == "success", output[-4000:]
    assert dep.writes() == [] and not any(c[FIELD] for c in store.customers.values())
    dry = dep.sync_log()["progress"]
    assert dry["dry_run"] is True and dry["planned"] > 50 and dry["written"] == 0 and dry["batches"] == 0

    state, output = dep.dags_test(conf={"allow_mass_change": True})
    assert state == "success", output[-4000:]
    final = dep.final_group_names()
    managed = {*oracle.GROUPS.values(), oracle.DEFAULT_GROUP}
    for cid, customer in store.customers.items():
        if cid in expected and final[cid] in managed:
            assert customer[FIELD] == oracle.progress_text(expected[cid]), cid
            assert customer[FIELD].split(" · ")[0] in (expected[cid].tier, "No tier yet"), cid
        else:  # protected (Staff, Wholesale) or deleted: never touched
            assert customer[FIELD] == before[cid][FIELD] and customer["version"] == before[cid]["version"], cid
    section = dep.sync_log()["progress"]
    assert section["enabled"] is True and section["field"] == FIELD
    assert section["written"] == section["planned"] > 50 and section["failed"] == 0
    assert section["skipped_protected"] >= 2
    assert TOKEN not in output

    writes = len(dep.writes())
    state, output = dep.dags_test()
    assert state == "success", output[-4000:]
    assert len(dep.writes()) == writes
    log = dep.sync_log()
    assert log["planned_moves"] == 0 and log["changed_in_pos"] == 0  # our field writes are not a person's
    assert log["progress"]["planned"] == log["progress"]["written"] == 0
    assert log["progress"]["unchanged"] == section["written"]
