"""The light tasks import no pandas, numpy or pyarrow (issue 17: a small run's time is Airflow's).

In a fresh interpreter: the tasks module, then what verify_group_counts, write_sync_log and
prune_runs import inside their functions (include/tier_sync/tasks.py), then the progress_batch
task's writer and the log's progress step, each checked against sys.modules; then one progress
batch really written against a fake client, so a lazy import on the write path is caught too. The write path has its own end-to-end check (test_sync_write_imports.py).

Last, every task from plan_sync on, run by its own body on a real run folder (extract_orders and
compute_tiers against the simulator, in this process) in a fresh interpreter against the same
simulator: plan_sync (stopped by the breaker), approve_sync's two parts (asking, then "Apply all"),
each sync_batch, verify_group_counts, plan_progress, each progress_batch and write_sync_log, with
sys.modules checked after each. Only extract, compute and validate need the libraries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_sync_live import build_run
from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.testing import clock_after, running_simulator

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


TASKS_SCRIPT = r"""
import json, logging, os, sys
from datetime import UTC, datetime, timedelta

logging.basicConfig(level=logging.INFO)  # the parent reads the log: the plan must not say it read the store

HEAVY = ("pandas", "numpy", "pyarrow")
data_dir, base_url, token = sys.argv[1:4]
os.environ.update(AIRFLOW_VAR_TIER_SYNC_DATA_DIR=data_dir, AIRFLOW_VAR_TIER_SYNC_RULES="",
                  AIRFLOW_VAR_TIER_SYNC_PROGRESS_FIELD="custom_field_1",
                  AIRFLOW_VAR_TIER_SYNC_APPROVAL_TIMEOUT_HOURS="", AIRFLOW_VAR_TIER_SYNC_APPROVERS="")
steps = []

def check(step):
    found = sorted(m for m in HEAVY if m in sys.modules)
    assert not found, f"{step} imported {found}"
    steps.append(step)

from include.tier_sync import tasks
from include.tier_sync.lightspeed import LightspeedClient

tasks._client = lambda: LightspeedClient(base_url, token, allow_insecure_http=True, backoff_base=0.01)
END = datetime(2026, 11, 25, 2, tzinfo=UTC)
context = {"data_interval_start": END - timedelta(days=1), "data_interval_end": END, "run_id": "scheduled__test",
           "params": {}}
out = {"plan_sync": tasks.plan_sync_task(context)}
check("plan_sync")
asked = tasks.approval_request(context)
out["asked"] = asked["refs"]
check("approve_sync: asking")
answer = {"chosen_options": ["Apply all"], "responded_by_user": {"id": "u1", "name": "U"}}
refs = tasks.approval_answered(context, answer)
out["refs"] = len(refs)
check("approve_sync: answered")
out["synced"] = [tasks.sync_batch_task(context, ref)["status"] for ref in refs]
check("sync_batch")
out["group_check"] = tasks.verify_group_counts_task(context)["group_counts_match"]
check("verify_group_counts")
progress = tasks.plan_progress_task(context)
check("plan_progress")
out["progress"] = [tasks.progress_batch_task(context, ref)["written"] for ref in progress]
check("progress_batch")
log = tasks.write_sync_log_task(context)
out["log"] = {k: log.get(k) for k in ("synced", "group_counts_match")}
out["written"] = log["progress"]["written"]
check("write_sync_log")
out["steps"] = steps
print(json.dumps(out))
"""


@pytest.fixture
def real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    store = generate_demo_store(seed=42, customers=120, now=datetime(2026, 11, 25, 2, tzinfo=UTC))
    with running_simulator(store=store, clock=clock_after(datetime(2026, 11, 25, 2, tzinfo=UTC))) as sim:
        yield sim, build_run(sim, tmp_path / "data", monkeypatch)


def test_every_task_from_plan_sync_on_imports_nothing_heavy_on_a_real_run(real_run: Any) -> None:
    sim, paths = real_run
    assert Path(paths.run_live_customers).exists()  # extract_orders left it
    proc = subprocess.run(
        [sys.executable, "-c", TASKS_SCRIPT, paths.data_dir, sim.base_url, sim.token],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["plan_sync"] == [] and out["asked"] is None  # the onboarding run stops at the breaker
    assert out["refs"] > 0 and set(out["synced"]) == {"done"}
    assert out["group_check"] is True and out["log"] == {"synced": True, "group_counts_match": True}
    assert out["progress"] and out["written"] == sum(out["progress"]) > 0
    assert len(out["steps"]) == 8
    assert "Sync plan: " in proc.stderr  # the log is read here, so the next line can fail
    assert "Live customers read from the order store" not in proc.stderr  # the file was used
