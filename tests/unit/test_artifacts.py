"""Run manifests, run listing, "latest" copies and the master-CSV Asset."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from include.tier_sync import artifacts
from include.tier_sync.artifacts import (
    MASTER_CSV_ASSET,
    list_runs,
    master_asset_extra,
    write_run_manifest,
)
from include.tier_sync.ledger import RunPaths
from include.tier_sync.runtime import iso

pytestmark = pytest.mark.unit

DAY1 = datetime(2026, 11, 24, 2, tzinfo=UTC)
DAY2 = datetime(2026, 11, 25, 2, tzinfo=UTC)


def _run(data: Path, as_of: datetime, master: str = "a,b\n") -> RunPaths:
    paths = RunPaths(str(data), as_of)
    run_dir = Path(paths.run_dir)
    (run_dir / "sync_plan").mkdir(parents=True, exist_ok=True)
    (run_dir / "customer_analytics_master.csv").write_text(master)
    (run_dir / "tier_changes.csv").write_text("x\n")
    (run_dir / "sync_plan" / "batch-0001.json").write_text("[]")
    return paths


def _identity(as_of: datetime) -> dict[str, str]:
    return {"dag_id": "customer_tier_sync", "run_id": f"scheduled__{iso(as_of)}", "as_of": iso(as_of)}


def test_write_run_manifest_lists_files_with_sizes(tmp_path: Path) -> None:
    paths = _run(tmp_path, DAY1, master="abc\n")

    manifest = write_run_manifest(paths, _identity(DAY1))

    on_disk = json.loads(Path(paths.run_json).read_text())
    assert on_disk == manifest
    assert manifest["run_id"] == "scheduled__2026-11-24T02:00:00Z" and manifest["key"] == "20261124T020000Z"
    assert manifest["files"] == [
        {"path": "customer_analytics_master.csv", "size": 4},
        {"path": "sync_plan/batch-0001.json", "size": 2},
        {"path": "tier_changes.csv", "size": 2},
    ]
    # Rewriting (after the sync adds its log) is idempotent and picks up the new file.
    Path(paths.run_sync_log).write_text("{}")
    again = write_run_manifest(paths, _identity(DAY1))
    assert "tier_sync_log.json" in [f["path"] for f in again["files"]]
    assert "run.json" not in [f["path"] for f in again["files"]]


def test_list_runs_newest_first(tmp_path: Path) -> None:
    write_run_manifest(_run(tmp_path, DAY1), _identity(DAY1))
    write_run_manifest(_run(tmp_path, DAY2), _identity(DAY2))
    (tmp_path / "runs" / "20261101T020000Z").mkdir()  # a folder without a manifest still shows

    runs = list_runs(str(tmp_path))

    assert [r["key"] for r in runs] == ["20261125T020000Z", "20261124T020000Z", "20261101T020000Z"]
    assert runs[0]["as_of"] == "2026-11-25T02:00:00Z" and runs[0]["path"].endswith("20261125T020000Z")
    assert runs[2]["files"] is None
    assert list_runs(str(tmp_path / "nowhere")) == []


def test_master_asset_is_stable_and_valid() -> None:
    from airflow.sdk import Asset
    from airflow.serialization.serialized_objects import BaseSerialization

    assert MASTER_CSV_ASSET.name == "customer_analytics_master"
    assert MASTER_CSV_ASSET.uri == artifacts.MASTER_CSV_ASSET_URI
    # Rebuilding it validates the URI again and yields an equal Asset (no Variable involved).
    assert Asset(name=MASTER_CSV_ASSET.name, uri=artifacts.MASTER_CSV_ASSET_URI, group="tier_sync") == Asset(
        name=MASTER_CSV_ASSET.name, uri=MASTER_CSV_ASSET.uri, group=MASTER_CSV_ASSET.group
    )
    roundtrip = BaseSerialization.deserialize(BaseSerialization.serialize(MASTER_CSV_ASSET))
    assert roundtrip.name == MASTER_CSV_ASSET.name and roundtrip.uri == MASTER_CSV_ASSET.uri


def test_master_asset_extra_carries_real_paths(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), DAY1)
    extra = master_asset_extra(paths, {"commit": "abc", "pushed": True, "remote": "/r.git", "other": 1})
    assert extra["path"] == paths.run_master_csv and extra["latest_path"] == paths.master_csv
    assert extra["commit"] == "abc" and "other" not in extra
    json.dumps(extra)  # asset event extras must be JSON
