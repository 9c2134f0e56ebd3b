"""The write path imports no pandas, numpy or pyarrow, not even lazily.

Each of up to 256 mapped sync_batch instances must load only what it needs: its batch file and
plan.json, never the master CSV, and none of the heavy libraries. A fresh interpreter imports the
package, then sync_batch's module, then runs sync_batch_task end to end (re-check, a refused
membership call, the per-customer GET + PUT fallback, a 404) against a fake client, and checks
sys.modules after each step. No master CSV exists in the data dir: reading it would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
import os
import sys
from datetime import UTC, datetime

HEAVY = ("pandas", "numpy", "pyarrow")


def heavy():
    return sorted(m for m in HEAVY if m in sys.modules)


def check(step):
    assert not heavy(), f"{step} imported {heavy()}"


data_dir = sys.argv[1]
os.environ["AIRFLOW_VAR_TIER_SYNC_DATA_DIR"] = data_dir

import include.tier_sync.sync  # noqa: F401  (the package, as callers import it)

check("import include.tier_sync.sync")
from include.tier_sync.sync.write import sync_batch  # noqa: F401

check("import include.tier_sync.sync.write")

from include.tier_sync import fileio, tasks
from include.tier_sync.ledger import RunPaths
from include.tier_sync.lightspeed import LightspeedClientError, LightspeedNotFound, Page
from include.tier_sync.sync.batches import BATCH_FORMAT, batch_path, write_plan_doc

check("import include.tier_sync.tasks")

START, END = datetime(2026, 11, 24, 2, tzinfo=UTC), datetime(2026, 11, 25, 2, tzinfo=UTC)
paths = RunPaths(data_dir, END)
ref = batch_path(paths, 1)
fileio.write_json(
    ref,
    {
        "format_version": 1,
        "format": BATCH_FORMAT,
        "plan_id": "p1",
        "index": 1,
        "of": 1,
        "tier": "Seed",
        "group_id": "g-seed",
        "group_name": "Seed",
        "customers_cursor": 5,
        "as_of": "2026-11-25T02:00:00Z",
        "moves": [
            {"customer_id": "c1", "from_group_id": "g-all", "from": "All Customers"},
            {"customer_id": "c2", "from_group_id": "g-all", "from": "All Customers"},
            {"customer_id": "c3", "from_group_id": "g-all", "from": "All Customers"},
        ],
    },
)
write_plan_doc(paths, {"plan_id": "p1", "refs": [{"ref": ref}], "writes_allowed": True, "dispatched": True})


class FakeClient:
    # c2 was moved to Staff in the POS after the plan; the membership call is refused (400);
    # c3 is gone (404); c1 is written by the GET + PUT fallback.
    def __init__(self):
        self.puts = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def iter_pages(self, path, after=0, params=None):
        yield Page([{"id": "c2", "customer_group_id": "g-staff", "version": 9}], 9)

    def add_customers_to_group(self, group_id, ids):
        raise LightspeedClientError("refused", 400)

    def get_customer(self, cid):
        if cid == "c3":
            raise LightspeedNotFound("gone")
        return {"id": cid, "customer_group_id": "g-all", "deleted_at": None}

    def put_customer(self, cid, body):
        self.puts.append((cid, body["customer_group_id"]))
        return body


client = FakeClient()
tasks._client = lambda: client
context = {"data_interval_start": START, "data_interval_end": END}
result = tasks.sync_batch_task(context, {"ref": ref, "tier": "Seed", "group_id": "g-seed", "size": 3, "writes_allowed": True})
check("sync_batch_task")
print(json.dumps({"result": result, "puts": client.puts, "heavy": heavy()}))
"""


def test_sync_batch_task_imports_no_pandas_and_reads_no_master(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    result = out["result"]
    assert result["status"] == "done" and result["written"] is True
    assert (result["updated"], result["changed_in_pos"], result["errors"]) == (1, 1, 1)
    assert result["changed_in_pos_ids"] == ["c2"]
    assert result["error_details"] == [{"customer_id": "c3", "error": "not found (HTTP 404)"}]
    assert out["puts"] == [["c1", "g-seed"]]
    assert result["format_version"] == 1
    assert not list(tmp_path.rglob("*.csv"))  # no master CSV was needed (or written)
