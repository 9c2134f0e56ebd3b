"""The light tasks import no pandas, numpy or pyarrow (issue 17: a small run's time is Airflow's).

In a fresh interpreter: the tasks module, then what verify_group_counts, write_sync_log and
prune_runs import inside their functions (include/tier_sync/tasks.py), each step checked against
sys.modules. The write path has its own end-to-end check (test_sync_write_imports.py); the
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
]
for name in STEPS:
    __import__(name)
    found = sorted(m for m in HEAVY if m in sys.modules)
    assert not found, f"import {name} imported {found}"
print("ok")
"""


def test_the_log_verify_and_prune_tasks_import_nothing_heavy() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
