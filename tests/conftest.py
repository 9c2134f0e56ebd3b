"""Test-wide environment: a private AIRFLOW_HOME so no test touches ~/airflow or a real deployment."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Set before anything imports airflow (it reads the environment at import time).
_AIRFLOW_HOME = os.environ.get("TIER_SYNC_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="tier-sync-airflow-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO_ROOT / "dags"))
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
