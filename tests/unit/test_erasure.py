"""Erasing one customer: every per-customer row of the data dir and the order store goes, every other
byte stays, the report says what was touched, and a dry run writes nothing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import erasure, fileio, ledger
from include.tier_sync.erasure import CustomerNotFound, erase_customer
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import compute_tiers, read_csv_str
from include.tier_sync.store import CUSTOMERS, SALES, OrderStore
from tests.unit.test_clv import AS_OF, DAY, RULES, customer, sale
from tests.unit.test_master_csv import identity, run
from tools.erase_customer import main

pytestmark = pytest.mark.unit

TARGET = "c007"
EMAIL = f"{TARGET}@example.com"


def data_dir(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "data") if kind == "local" else f"memory://erase-{uuid.uuid4().hex}"


def build(root: str) -> dict[str, Any]:
    """A real order store (two segments per resource) and two published runs; sync and validation
    files that name the target and others."""
    store = OrderStore(RunPaths(root, AS_OF).store)
    people = [customer(f"c{i:03d}", loyalty=i % 2 == 0) for i in range(20)]
    store.append(CUSTOMERS, people[:10], cursor=10)
    store.append(CUSTOMERS, [*people[10:], customer(TARGET, version=2, name="Renamed")], cursor=21)
    sales = [sale(f"s{i:03d}", f"c{i % 20:03d}", f"{(i % 7) * 180 + 30}.00", AS_OF - (40 - i) * DAY) for i in range(40)]
    store.append(SALES, sales[:20], cursor=20)
    store.append(SALES, sales[20:], cursor=40)
    day1 = RunPaths(root, AS_OF - DAY)
    here = Path(root) if fileio.is_local(root) else root
    run(here, store, day1.as_of)  # type: ignore[arg-type]
    day2 = RunPaths(root, AS_OF)
    run(here, store, day2.as_of)  # type: ignore[arg-type]
    fileio.write_json(
        fileio.join(day2.run_sync_plan_dir, "batch-0000.json"),
        {"moves": [{"customer_id": TARGET, "to": "Seed"}, {"customer_id": "c001", "to": "Bloom"}]},
    )
    fileio.write_json(fileio.join(day2.run_sync_plan_dir, "expected_members.json"), {"Seed": ["c001", TARGET, "c003"]})
    log_doc = {
        "errors": 1,
        "error_details": [{"customer_id": TARGET, "error": "boom"}],
        "changed_in_pos_ids": ["c002", TARGET],
        "tier_breakdown": {"Seed": 3},
    }
    fileio.write_json(day2.run_sync_log, log_doc)
    fileio.write_json(day2.sync_log, log_doc)
    fileio.write_json(
        day2.run_validation_json,
        {"summary": {"success": True}, "details": [{"examples": [TARGET, "c004"], "partial_unexpected_list": [EMAIL, "x@y.z"]}]},
    )
    return {"store": store, "day1": day1, "day2": day2}


def snapshot(root: str) -> dict[str, bytes]:
    return {rel: fileio.read_bytes(fileio.join(root, rel)) for rel in fileio.walk_files(root)}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_erasure_removes_the_customer_everywhere_and_keeps_every_other_byte(kind: str, tmp_path: Path) -> None:
    root = data_dir(kind, tmp_path)
    built = build(root)
    store, day2 = built["store"], built["day2"]
    before = snapshot(root)
    old_segments = {r: [s["name"] for s in store.segments(r)] for r in (CUSTOMERS, SALES)}

    report = erase_customer(root, TARGET)

    touched = {item["path"]: item["removed"] for item in report["files"]}
    masters = [day2.master_csv, day2.run_master_csv, day2.published_master_for(day2.key)]
    masters += [built["day1"].run_master_csv, built["day1"].published_master_for(built["day1"].key)]
    for url in masters:
        assert touched[url] == 1, url
        rows = read_csv_str(url)
        assert TARGET not in set(rows["Customer ID"]) and len(rows) == 19
        # Every other line is exactly as it was (the raw reader and the safe writer are inverses).
        old_lines = before[url[len(root) + 1 :]].decode("utf-8-sig").splitlines()
        assert fileio.read_bytes(url).decode("utf-8-sig").splitlines() == [x for x in old_lines if not x.startswith(f"{TARGET},")]
    assert touched[built["day1"].run_tier_changes] == 1  # the first run: every customer with a tier is a change
    assert touched[fileio.join(day2.run_sync_plan_dir, "batch-0000.json")] == 1
    assert fileio.read_json(fileio.join(day2.run_sync_plan_dir, "batch-0000.json")) == {"moves": [{"customer_id": "c001", "to": "Bloom"}]}
    assert fileio.read_json(fileio.join(day2.run_sync_plan_dir, "expected_members.json")) == {"Seed": ["c001", "c003"]}
    for url in (day2.run_sync_log, day2.sync_log):
        doc = fileio.read_json(url)
        assert doc["error_details"] == [] and doc["changed_in_pos_ids"] == ["c002"]
        assert doc["tier_breakdown"] == {"Seed": 3} and doc["errors"] == 1  # aggregates stay
    details = fileio.read_json(day2.run_validation_json)["details"][0]
    assert details == {"examples": ["c004"], "partial_unexpected_list": ["x@y.z"]}
    # The tier history (aggregates) is untouched.
    assert fileio.read_bytes(day2.tier_history) == before[ledger.HISTORY_FILE]
    # The order store: their two customer versions and their two sales are gone, nothing else.
    assert report["store"] == {"customers": 2, "sales": 2, "segments_rewritten": 4}
    customers, sales = store.read_table(CUSTOMERS), store.read_table(SALES)
    assert TARGET not in customers.column("id").to_pylist() and customers.num_rows == 19
    assert TARGET not in sales.column("customer_id").to_pylist() and sales.num_rows == 38
    assert store.cursors() == {SALES: 40, CUSTOMERS: 21}
    for resource, names in old_segments.items():
        for name in names:
            assert not fileio.exists(store.segment_url(resource, name))
    # A re-run of the day computes the same master, without the customer.
    redo = compute_tiers(store, RunPaths(root, AS_OF), identity(AS_OF), RULES)
    assert redo["total_customers"] == 19
    assert not any(EMAIL.encode() in data for data in snapshot(root).values())
    # Nothing is left to erase: the second call says so and changes nothing.
    after = snapshot(root)
    with pytest.raises(CustomerNotFound, match="nothing was changed"):
        erase_customer(root, TARGET)
    assert snapshot(root) == after


def test_a_dry_run_reports_the_same_and_writes_nothing(tmp_path: Path) -> None:
    root = data_dir("local", tmp_path)
    build(root)
    before = snapshot(root)
    dry = erase_customer(root, TARGET, dry_run=True)
    assert snapshot(root) == before
    assert dry["dry_run"] is True and dry["store"]["sales"] == 2
    real = erase_customer(root, TARGET)
    assert [f["path"] for f in dry["files"]] == [f["path"] for f in real["files"]]
    assert dry["files"] == real["files"] and dry["store"] == real["store"]


def test_git_history_is_reported_as_work_by_hand(tmp_path: Path) -> None:
    root = data_dir("local", tmp_path)
    build(root)
    Path(root, "git", "tiers.git").mkdir(parents=True)
    notes = erase_customer(root, TARGET)["needs_attention"]
    assert any("git" in n and "history" in n for n in notes)


@pytest.mark.parametrize("bad", ["", " c007", "c007\n", "c0\x0007", "x" * 201])
def test_a_malformed_id_is_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a customer id"):
        erase_customer(str(tmp_path), bad)


def test_the_command_reports_and_fails_loudly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = data_dir("local", tmp_path)
    build(root)
    assert main(["--data-dir", root, "--dry-run", TARGET]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and "2 sale version(s)" in out and "dry run" in out
    assert main(["--data-dir", root, "--json", TARGET]) == 0
    assert json.loads(capsys.readouterr().out)["store"]["customers"] == 2
    assert main(["--data-dir", root, TARGET]) == 3
    assert "nothing was changed" in capsys.readouterr().err
    assert main(["--data-dir", root, " bad"]) == 2
    assert main(["--data-dir", str(tmp_path / "missing"), TARGET]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--data-dir", "relative/dir", TARGET]) == 2
    assert "tier_sync_data_dir" in capsys.readouterr().err


def test_scrub_leaves_tier_names_and_counts_alone() -> None:
    doc = {"Seed": [1, 2], "c9": {"x": 1}, "list": ["Seed", "c9", {"id": "c9"}, {"id": "c1"}]}
    cleaned, n = erasure.scrub(doc, "c9", frozenset({"c9"}))
    assert cleaned == {"Seed": [1, 2], "list": ["Seed", {"id": "c1"}]} and n == 3
