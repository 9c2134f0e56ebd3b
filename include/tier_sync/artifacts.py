"""Per-run artifact folders, their manifests, the "latest" copies and the master-CSV Asset.

Every run keeps what it produced under `<data_dir>/runs/<as_of key>/` so a person can download what
a given day produced; `run.json` says which run wrote the folder and lists its files. The Asset
lets downstream DAGs be scheduled on a new master CSV without knowing where the data dir is: its
URI is a fixed logical name, and each event carries the real path in its `extra`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset

from include.tier_sync import fileio, ledger
from include.tier_sync.ledger import RUN_FILE
from include.tier_sync.runtime import iso

if TYPE_CHECKING:
    from include.tier_sync.ledger import RunPaths

log = logging.getLogger(__name__)

# `x-` schemes are Airflow's documented escape for custom URIs: kept verbatim (no normaliser, no
# provider needed), and independent of any Variable, so the Asset is identical at parse time on
# every deployment.
MASTER_CSV_ASSET_URI = "x-tier-sync://customer-tier-sync/customer_analytics_master.csv"
MASTER_CSV_ASSET = Asset(
    name="customer_analytics_master",
    uri=MASTER_CSV_ASSET_URI,
    group="tier_sync",
    extra={"format": "csv", "producer": "customer_tier_sync.commit_csv"},
)


def _list_files(run_dir: str) -> list[dict[str, Any]]:
    """Files under a run folder (recursively) with sizes; paths relative to the folder."""
    out: list[dict[str, Any]] = []
    if fileio.is_local(run_dir):
        root = fileio.local_path(run_dir)
        for folder, _dirs, names in os.walk(root):
            for name in names:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if ".tmp-" in name:  # an atomic write in progress
                    continue
                out.append({"path": rel, "size": os.path.getsize(full)})
    else:
        fs, root = fileio.filesystem(run_dir)
        if fs.exists(root):
            for full, info in fs.find(root, detail=True).items():
                rel = full[len(root.rstrip("/")) + 1 :]
                out.append({"path": rel, "size": int(info.get("size") or 0)})
    return sorted(out, key=lambda f: f["path"])


def write_run_manifest(paths: RunPaths, identity: Mapping[str, Any]) -> dict[str, Any]:
    """Write `runs/<key>/run.json` (the run's identity plus its files) and return it.

    Call it last in a run (and again after the sync) so the file list is complete; rewriting it is
    harmless, which keeps retries and reruns idempotent.
    """
    manifest: dict[str, Any] = {
        "as_of": identity.get("as_of") or iso(paths.as_of),
        "run_id": identity.get("run_id"),
        "dag_id": identity.get("dag_id"),
        "logical_date": identity.get("logical_date"),
        "run_type": identity.get("run_type"),
        "key": paths.key,
        "updated_at": iso(datetime.now(tz=UTC)),
        "files": [f for f in _list_files(paths.run_dir) if f["path"] != RUN_FILE],
    }
    fileio.write_json(paths.run_json, manifest)
    log.info("Run manifest %s: %d files", paths.run_json, len(manifest["files"]))
    return manifest


def list_runs(data_dir: str) -> list[dict[str, Any]]:
    """Every run folder, newest first (keys are sortable timestamps), with its manifest if any."""
    out: list[dict[str, Any]] = []
    for key in reversed(ledger.list_run_keys(data_dir)):
        run_dir = ledger.run_dir(data_dir, key)
        manifest = fileio.read_json(fileio.join(run_dir, RUN_FILE), default=None)
        entry: dict[str, Any] = dict(manifest) if isinstance(manifest, dict) else {"key": key, "files": None}
        entry["key"] = key
        entry["path"] = run_dir
        out.append(entry)
    return out


def master_asset_extra(paths: RunPaths, commit_result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a consumer of MASTER_CSV_ASSET needs: set as `outlet_events[MASTER_CSV_ASSET].extra`."""
    extra: dict[str, Any] = {
        "as_of": iso(paths.as_of),
        "run_key": paths.key,
        "path": paths.run_master_csv,
        "latest_path": paths.master_csv,
    }
    if commit_result:
        for key in ("commit", "remote", "branch", "pushed", "changed"):
            if key in commit_result:
                extra[key] = commit_result[key]
    return extra
