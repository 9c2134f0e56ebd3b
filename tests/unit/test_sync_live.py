"""The plan's inputs without pandas (issue 17): the master's columns and the live-customers file.

* `spreadsheet.read_raw_columns` gives the cells `read_raw_csv` (pandas) gives, hostile cells too;
* extract_orders leaves `runs/<key>/live_customers.json.gz`; the plan made from it equals the plan
  made from the store (the fallback, taken when the file's cursor is not the store's) and the plan
  made from DataFrames as before;
* a damaged file is an error naming it, never "no customers"; the erasure reaches into it.
"""

from __future__ import annotations

import gzip
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync import erasure, fileio, spreadsheet, tasks
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import read_csv_str
from include.tier_sync.rules import TierRules
from include.tier_sync.store import OrderStore
from include.tier_sync.sync import live
from include.tier_sync.sync.groups import resolve_groups
from include.tier_sync.sync.plan import plan_moves
from tests.unit.test_sync_against_simulator import client_for
from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

pytestmark = pytest.mark.unit

END = datetime(2026, 11, 25, 2, tzinfo=UTC)
START = END - timedelta(days=1)
CONTEXT: dict[str, Any] = {"data_interval_start": START, "data_interval_end": END, "run_id": "scheduled__test"}
PLAN_COLUMNS = ["Customer ID", "Tier", "Lifetime Value"]


def build_run(sim: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> RunPaths:
    """A real run folder: extract_orders and compute_tiers, the tasks' own bodies, against `sim`."""
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", "")
    monkeypatch.setattr(tasks, "_client", lambda: client_for(sim))
    tasks.extract_task(CONTEXT)
    tasks.compute_task(CONTEXT)
    return RunPaths(str(data_dir), END)


# -- the master, read with the csv module --------------------------------------------------------

HOSTILE = {
    "Customer ID": ["c1", "-7", "c3", "c4", "c5"],
    "Name": ["=1+1", "None", "", 'Say "hi", Bob', "'=already quoted"],
    "Tier": ["Seed", "None", "Bloom", "None", "Sprout"],
    "Lifetime Value": ["-12.50", "0.00", "", "1,500.00", "@SUM(A1)"],
    "Email": ["a,b@x.example", "\t=cmd", "line\nbreak", "", "None"],
}


def test_light_master_reader_gives_the_cells_the_pandas_reader_gives(tmp_path: Path) -> None:
    data = spreadsheet.to_safe_csv_bytes(pd.DataFrame(HOSTILE), numeric_columns=["Lifetime Value"])
    assert b"'=1+1" in data and b"'-7" in data  # the file really neutralised them
    url = str(tmp_path / "master.csv")
    fileio.write_bytes(url, data)
    columns = ["Customer ID", "Tier", "Name", "Email", "Lifetime Value"]
    light = spreadsheet.read_raw_columns(data, columns)
    heavy = read_csv_str(url, usecols=columns)
    assert light == {c: heavy[c].tolist() for c in columns}
    assert light["Name"] == HOSTILE["Name"] and light["Email"] == HOSTILE["Email"]
    assert light["Tier"][1] == "None" and light["Name"][2] == ""  # kept literally, as pandas does


def test_light_master_reader_refuses_what_is_not_a_csv_of_ours() -> None:
    good = "Customer ID,Tier\nc1,Seed\n".encode(spreadsheet.ENCODING)
    with pytest.raises(ValueError, match=r"master\.csv has no column \['Lifetime Value'\]"):
        spreadsheet.read_raw_columns(good, ["Customer ID", "Lifetime Value"], where="master.csv")
    with pytest.raises(ValueError, match="line 3 has 3 cells, the header 2"):
        spreadsheet.read_raw_columns(b"Customer ID,Tier\nc1,Seed\nc2,Seed,x\n", ["Tier"])
    with pytest.raises(ValueError, match="empty"):
        spreadsheet.read_raw_columns(b"", ["Tier"])
    with pytest.raises(ValueError, match="more than once"):
        spreadsheet.read_raw_columns(b"Tier,Tier\nSeed,Bloom\n", ["Tier"])


# -- the live customers --------------------------------------------------------------------------


def test_newest_states_keeps_the_newest_version_and_blank_groups_as_none() -> None:
    rows = [("b", 3, "g1", False), ("a", 5, " ", False), ("b", 7, "g2", True), ("b", 7, "g3", True), ("a", 2, "gx", False)]
    assert live.newest_states(rows) == {"a": (None, False, 5), "b": ("g3", True, 7)}
    frame = pd.DataFrame(rows, columns=["id", "version", "customer_group_id", "deleted"])
    frame["deleted_at"] = [None if not d else pd.Timestamp("2026-11-01", tz="UTC") for d in frame["deleted"]]
    assert live.as_live(frame) == live.newest_states(rows)  # the frame path: the same rule


@pytest.fixture
def sim_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    store = generate_demo_store(seed=42, customers=120, now=END)
    with running_simulator(store=store, clock=clock_after(END)) as sim:
        yield sim, build_run(sim, tmp_path / "data", monkeypatch)


def test_the_plan_from_the_file_equals_the_store_fallback_and_the_frames(
    sim_run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sim, paths = sim_run
    rules = TierRules()
    store = OrderStore(paths.store)
    cursor = live.store_cursor(paths)
    assert cursor == store.cursor("customers") > 0
    from_file = live.live_customers(paths, cursor)
    assert live.read_live_customers(paths.run_live_customers) == (cursor, from_file)
    assert len(from_file) == 120 and any(deleted for _, deleted, _ in from_file.values())

    # Another extraction since: the file's cursor is older than the store's -> the store is read.
    raw = json.loads(gzip.decompress(Path(paths.run_live_customers).read_bytes()))
    stale = {**raw, "customers_cursor": cursor - 1, "customers": {}}
    Path(paths.run_live_customers).write_bytes(gzip.compress(json.dumps(stale).encode()))
    with caplog.at_level(logging.INFO, logger="include.tier_sync.sync.live"):
        fallback = live.live_customers(paths, cursor)
    assert f"made at customers cursor {cursor - 1}, the store is at {cursor}" in caplog.text
    assert fallback == from_file

    master = spreadsheet.read_raw_columns(Path(paths.run_master_csv).read_bytes(), PLAN_COLUMNS)
    groups = resolve_groups(client_for(sim), rules, create_missing=False)
    plan = plan_moves(master, from_file, groups, rules)
    assert plan.moves and plan.protected > 0  # deleted customers are in no master
    assert plan_moves(master, fallback, groups, rules) == plan
    frames = plan_moves(read_csv_str(paths.run_master_csv), store.read("customers"), groups, rules)
    assert frames == plan  # what the task planned from DataFrames before
    assert live.as_live(store.read("customers")) == from_file  # plan_progress's view (it calls as_live), too


def test_no_file_falls_back_to_the_store_and_says_why(sim_run: Any, caplog: pytest.LogCaptureFixture) -> None:
    _, paths = sim_run
    expected = live.read_live_customers(paths.run_live_customers)
    Path(paths.run_live_customers).unlink()
    with caplog.at_level(logging.INFO, logger="include.tier_sync.sync.live"):
        found = live.live_customers(paths, live.store_cursor(paths))
    assert "does not exist" in caplog.text
    assert expected is not None and found == expected[1]


@pytest.mark.parametrize(
    "content",
    [
        b"not gzip at all",
        gzip.compress(b"{not json"),
        gzip.compress(b"[]"),
        gzip.compress(json.dumps({"customers_cursor": 5, "customers": {"c1": ["g", "yes", 3]}}).encode()),
        gzip.compress(json.dumps({"customers_cursor": "5", "customers": {}}).encode()),
        gzip.compress(json.dumps({"format_version": 99, "customers_cursor": 5, "customers": {}}).encode()),
        gzip.compress(b'{"customers_cursor": 5, "customers": {}}')[:-6],  # cut off
    ],
)
def test_a_damaged_file_is_an_error_naming_it(tmp_path: Path, content: bytes) -> None:
    paths = RunPaths(str(tmp_path), END)
    fileio.write_bytes(paths.run_live_customers, content)
    with pytest.raises(live.LiveCustomersError, match="is not a live-customers file") as info:
        live.live_customers(paths, 5)
    assert paths.run_live_customers in str(info.value) and "Delete it" in str(info.value)


def test_erasure_removes_the_customer_from_the_file(sim_run: Any) -> None:
    _, paths = sim_run
    cursor, before = live.read_live_customers(paths.run_live_customers) or (0, {})
    cid = sorted(before)[0]
    erasure.erase_customer(paths.data_dir, cid)
    after = live.read_live_customers(paths.run_live_customers)
    assert after == (cursor, {k: v for k, v in before.items() if k != cid})
    assert live.live_customers(paths, live.store_cursor(paths)) == after[1]  # the store agrees
