"""format_version on the sync's files: written everywhere, legacy (missing) accepted, newer refused."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from include.tier_sync import fileio, sync
from include.tier_sync.ledger import RunPaths
from include.tier_sync.sync import batches, verify
from include.tier_sync.sync.contracts import FORMAT_VERSION, UnsupportedFormatVersion

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)


def one_move_plan() -> sync.Plan:
    move = sync.Move("c1", "Seed", "g-seed", "g-all", "All Customers")
    return sync.Plan(
        moves=[move],
        total_customers=1,
        managed=1,
        protected=0,
        deleted=0,
        no_tier=0,
        missing=0,
        unchanged=0,
        deferred_by_limit=0,
        tier_breakdown={},
        expected_members={"Seed": ["c1"]},
    )


def read(path: str) -> dict[str, object]:
    doc = json.loads(Path(path).read_text())
    assert isinstance(doc, dict)
    return doc


def test_every_file_carries_the_version(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    plan = one_move_plan()
    refs = sync.write_batches(plan, paths, customers_cursor=1)
    batches.write_expected_members(plan, paths)
    verify.write_group_check(paths, {"checked": False, "reason": "test"})
    log_doc = sync.finish_sync(paths, {"run_id": "r"})
    assert "format_version" not in refs[0]  # the XCom ref stays as small as it was
    for path in (
        batches.plan_path(paths),
        refs[0]["ref"],
        batches.expected_members_path(paths),
        paths.run_group_check,
        paths.run_sync_log,
    ):
        assert read(path)["format_version"] == FORMAT_VERSION, path
    assert log_doc["format_version"] == FORMAT_VERSION
    assert sync.read_expected_members(paths) == {"Seed": ["c1"]}  # the version is not a tier


def test_legacy_files_without_a_version_are_read(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    refs = sync.write_batches(one_move_plan(), paths, customers_cursor=1)
    for path in (batches.plan_path(paths), refs[0]["ref"]):
        doc = read(path)
        del doc["format_version"]
        Path(path).write_text(json.dumps(doc))
    Path(batches.expected_members_path(paths)).write_text(json.dumps({"Seed": ["c1"]}))
    assert sync.read_plan_doc(paths) is not None
    assert batches.read_batch(refs[0])["moves"][0]["customer_id"] == "c1"
    assert sync.read_expected_members(paths) == {"Seed": ["c1"]}
    _, results = sync.load_batch_results(paths)  # no result yet: one failed result per batch
    assert [r["errors"] for r in results] == [1]


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "2", 0])
def test_a_newer_or_bad_version_is_a_clear_error(tmp_path: Path, version: object) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    sync.write_batches(one_move_plan(), paths, customers_cursor=1)
    doc = read(batches.plan_path(paths))
    doc["format_version"] = version
    Path(batches.plan_path(paths)).write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatVersion, match="format_version"):
        sync.read_plan_doc(paths)


def test_the_group_check_and_feed_view_files_carry_the_version_and_refuse_a_newer_one(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    members = batches.write_group_members(paths, "p1", 7, {"g-seed": ["c2", "c1"]})
    assert read(members)["format_version"] == FORMAT_VERSION
    assert batches.read_group_members(paths) == {
        "plan_id": "p1",
        "customers_cursor": 7,
        "members": {"g-seed": ["c1", "c2"]},
    }
    plan_dir = paths.run_sync_plan_dir
    record = {"version": 9, "customer_group_id": "g-seed", "deleted_at": None}
    older = batches.write_feed_view(plan_dir, {"plan_id": "p1", "start": 7, "to": 8, "records": {}})
    newest = batches.write_feed_view(
        plan_dir, {"plan_id": "p1", "start": 7, "to": 9, "records": {"c1": record}}
    )
    assert not Path(older).exists() and read(newest)["format_version"] == FORMAT_VERSION  # the older is gone
    view = batches.read_latest_feed_view(plan_dir, "p1", 7)
    assert view is not None and view["to"] == 9 and view["records"] == {"c1": record}
    assert batches.read_latest_feed_view(plan_dir, "another-plan", 7) is None
    with pytest.raises(ValueError, match="does not belong to plan p1 from cursor 6"):
        batches.read_latest_feed_view(plan_dir, "p1", 6)  # never silently used for another cursor
    for path in (members, newest):
        doc = read(path)
        doc["format_version"] = FORMAT_VERSION + 1
        Path(path).write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatVersion, match="format_version"):
        batches.read_group_members(paths)
    with pytest.raises(UnsupportedFormatVersion, match="format_version"):
        batches.read_latest_feed_view(plan_dir, "p1", 7)


def test_feed_views_work_on_object_storage_too() -> None:
    """memory:// stands in for s3:// (fsspec): no rename, no lock; one whole object per view."""
    plan_dir = f"memory://feed-views-test-{uuid.uuid4().hex}/runs/x/sync_plan"
    record = {"version": 12, "customer_group_id": None, "deleted_at": "2026-11-25T02:00:00+00:00"}
    first = batches.write_feed_view(plan_dir, {"plan_id": "p2", "start": 10, "to": 11, "records": {}})
    batches.write_feed_view(plan_dir, {"plan_id": "p2", "start": 10, "to": 12, "records": {"c9": record}})
    assert not fileio.exists(first)
    view = batches.read_latest_feed_view(plan_dir, "p2", 10)
    assert view is not None and view["to"] == 12 and view["records"] == {"c9": record}
