"""The light tasks import no pandas, numpy or pyarrow (issue 17: a small run's time is Airflow's).

In a fresh interpreter: the tasks module, then what verify_group_counts, write_sync_log and
prune_runs import inside their functions (include/tier_sync/tasks.py), then the progress_batch
task's writer and the log's progress step, each checked against sys.modules; last, one progress
batch really written against a fake client, so a lazy import on the write path is caught too. The write path has its own end-to-end check (test_sync_write_imports.py); the
heavy tasks (extract, compute, validate, plan) need the libraries and are not listed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys

HEAVY = ("pandas", "numpy", "pyarrow")
STEPS = [
    "include.tier_sync.tasks",
    "include.tier_sync.sync.batches",  # verify_group_counts, write_sync_log
    "include.tier_sync.sync.log",
    "include.tier_sync.sync.verify",
    "include.tier_sync.retention",  # prune_runs
    "include.tier_sync.sync.progress",  # write_sync_log's progress section (finish_progress)
    "include.tier_sync.sync.progress_write",  # progress_batch
]
for name in STEPS:
    __import__(name)
    found = sorted(m for m in HEAVY if m in sys.modules)
    assert not found, f"import {name} imported {found}"

# One progress batch written end to end (lazy imports included), and the log's section built.
import json, tempfile
from datetime import datetime, timezone
from include.tier_sync.ledger import RunPaths
from include.tier_sync.sync import progress
from include.tier_sync.sync.groups import GroupMap
from include.tier_sync.sync.progress_write import write_progress_batch

class Client:
    def __init__(self):
        self.record = {"id": "c1", "customer_group_id": "g-default", "deleted_at": None, "version": 1}
    def get_customer(self, cid):
        return dict(self.record)
    def put_customer(self, cid, body):
        self.record = {**body, "version": 2}
        return dict(self.record)

paths = RunPaths(tempfile.mkdtemp(), datetime(2026, 11, 25, 2, tzinfo=timezone.utc))
groups = {"tier_groups": {}, "default_group_id": "g-default", "aliases": {}, "created": [], "missing": []}
ref = progress._write_batch(paths, "p1", "custom_field_1", GroupMap.from_dict(groups),
                            [{"customer_id": "c1", "text": "Seed · $10.00 to Sprout"}], 1, 1, True)
from include.tier_sync import fileio
fileio.write_json(progress.plan_file(paths), {"plan_id": "p1", "field": "custom_field_1", "refs": [ref],
                                              "planned": 1, "counts": {}, "writes_allowed": True})
client = Client()
assert write_progress_batch(ref, client, writes_allowed=True)["written"] == 1
assert client.record["custom_field_1"] == "Seed · $10.00 to Sprout"
assert progress.finish_progress(paths)["written"] == 1
found = sorted(m for m in HEAVY if m in sys.modules)
assert not found, f"writing a progress batch imported {found}"
print("ok")
"""


def test_the_log_verify_and_prune_tasks_import_nothing_heavy() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
