"""Wall time of a whole `airflow dags test customer_tier_sync` run on the demo store, split up.

Starts the simulator with the demo store (300 customers, as `make demo`), migrates a throw-away
SQLite metadata DB, runs the onboarding run (`allow_mass_change`) and prints:

- the run's wall time (the CLI process, start to exit);
- start-up: from the process start to the first task's start (Airflow's CLI, the DAG parse, the
  run's creation), and the gaps between one task's end and the next one's start (Airflow's
  per-task start-up under `dags test`);
- work: each task instance's own duration (from the metadata DB), which includes the modules the
  task imports inside its function; those imports are timed apart in fresh interpreters, so the
  share of our own imports in a small run is visible.

    .venv/bin/python bench/dag_run_time.py [--customers 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DAG_ID = "customer_tier_sync"
TOKEN = "demo-store-token"  # the simulator's token for the demo store; not a real secret
# What each task's function imports of ours (include/tier_sync/tasks.py), timed in a fresh
# interpreter. Modules that only add Airflow (artifacts, run_alerts, alerts; approval, the
# approve_sync operator's own module), which the task process has loaded already, are left out.
TASK_IMPORTS = {
    "extract_orders": "include.tier_sync.extract, include.tier_sync.store, include.tier_sync.sync.live",
    "compute_tiers": "include.tier_sync.clv, include.tier_sync.master_csv, include.tier_sync.store",
    "validate_tiers": "include.tier_sync.validation",
    "plan_sync": "include.tier_sync.spreadsheet, include.tier_sync.sync.live, include.tier_sync.sync.prepare",
    "approve_sync": "include.tier_sync.spreadsheet, include.tier_sync.sync.live, include.tier_sync.sync.prepare",
    "sync_batch": "include.tier_sync.sync.write",
    "verify_group_counts": "include.tier_sync.spreadsheet, include.tier_sync.sync.log, include.tier_sync.sync.verify",
    "plan_progress": "include.tier_sync.spreadsheet, include.tier_sync.sync.live, include.tier_sync.sync.progress",
    "progress_batch": "include.tier_sync.sync.progress_write",
    "write_sync_log": "include.tier_sync.sync.log, include.tier_sync.sync.progress, include.tier_sync.sync.verify",
}
HEAVY = ("pandas", "pyarrow", "numpy")


def import_seconds(modules: str) -> tuple[float, list[str]]:
    """Seconds to import `modules` in a fresh interpreter, and the heavy libraries that pulled in."""
    code = (
        f"import sys, time; t = time.perf_counter(); import {modules}; d = time.perf_counter() - t; "
        f"print(d, ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    seconds, _, heavy = out.stdout.strip().splitlines()[-1].partition(" ")
    return float(seconds), [m for m in heavy.split(",") if m]


def parse_ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=UTC).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--customers", type=int, default=300)
    args = parser.parse_args(argv)

    from tools.demo import latest_boundary, start_simulator

    tmp = Path(tempfile.mkdtemp(prefix="tier-sync-dagrun-"))
    airflow = str(Path(sys.executable).with_name("airflow"))
    as_of = latest_boundary(datetime.now(tz=UTC))
    sim, sim_url = start_simulator(args.seed, args.customers, as_of, tmp / "simulator.log")
    try:
        env = dict(os.environ)
        env.update(
            AIRFLOW_HOME=str(tmp / "airflow"),
            AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW_CONN_LIGHTSPEED_DEFAULT=json.dumps(
                {
                    "conn_type": "http",
                    "host": sim_url,
                    "password": TOKEN,
                    "extra": {"registers": 1, "rate_budget_dir": str(tmp / "budget"), "allow_insecure_http": True},
                }
            ),
            AIRFLOW_VAR_TIER_SYNC_DATA_DIR=str(tmp / "data"),
        )
        with (tmp / "migrate.log").open("w") as log:
            subprocess.run([airflow, "db", "migrate"], cwd=REPO, env=env, stdout=log, stderr=log, check=True)
        conf = json.dumps({"allow_mass_change": True})
        started = time.time()
        with (tmp / "dags-test.log").open("w") as log:
            code = subprocess.run(
                [airflow, "dags", "test", DAG_ID, as_of.isoformat(), "-c", conf],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=log,
            ).returncode
        wall = time.time() - started
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    if code != 0:
        raise SystemExit(f"airflow dags test failed ({code}); see {tmp / 'dags-test.log'}")

    db = sqlite3.connect(tmp / "airflow" / "airflow.db")
    rows = db.execute(
        "SELECT task_id, map_index, start_date, end_date, state FROM task_instance WHERE dag_id = ? "
        "ORDER BY start_date",
        (DAG_ID,),
    ).fetchall()
    spans = [(t, m, parse_ts(s), parse_ts(e), st) for t, m, s, e, st in rows if s and e]
    if not spans:
        raise SystemExit("no finished task instance in the metadata DB")
    work: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for task, _, start, end, _ in spans:
        assert start is not None and end is not None
        work[task] += end - start
        count[task] += 1
    first_start = min(s for _, _, s, _, _ in spans if s is not None)
    last_end = max(e for _, _, _, e, _ in spans if e is not None)
    total_work = sum(work.values())
    gaps = (last_end - first_start) - total_work  # tasks run one at a time under dags test
    cli_start = first_start - started
    tail = started + wall - last_end

    print(f"airflow dags test {DAG_ID} {as_of:%Y-%m-%dT%H:%M:%SZ} ({args.customers} customers, onboarding run)")
    print(f"wall {wall:.1f} s = start-up {cli_start + gaps + tail:.1f} s + work {total_work:.1f} s")
    print(f"  start-up: CLI, DAG parse and run creation {cli_start:.1f} s; between tasks {gaps:.1f} s; exit {tail:.1f} s")
    print(f"  work, per task (duration in the metadata DB, {len(spans)} task instances):")
    for task in sorted(work, key=lambda t: -work[t]):
        imports = TASK_IMPORTS.get(task)
        cost = ""
        if imports:
            seconds, heavy = import_seconds(imports)
            cost = f"; its imports alone {seconds:.2f} s (fresh interpreter; {', '.join(heavy) or 'no pandas/pyarrow/numpy'})"
        print(f"    {task:22} {work[task]:6.2f} s over {count[task]} instance(s){cost}")
    print(f"files under {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
