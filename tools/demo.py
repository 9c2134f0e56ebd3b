"""`make demo`: the real job, end to end, on the embedded default.

Starts the project's Lightspeed simulator with a seeded demo store on a free port, points an
Airflow 3 install (SQLite metadata DB under .demo/) at it through the same connection and
Variables a deployment would use, and runs `airflow dags test customer_tier_sync <as_of>` twice:
the first run computes tiers, validates, commits the CSV and moves customers; the second, for the
same day, must find nothing left to do. Then it prints what happened, from the files the run wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from include.tier_sync.ledger import MASTER_FILE, SYNC_LOG_FILE

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".demo"
DAG_ID = "customer_tier_sync"
DEMO_TOKEN = "demo-store-token"  # the simulator's token for the demo store; not a real secret


def latest_boundary(now: datetime) -> datetime:
    """The end of the newest complete daily interval (02:00 UTC)."""
    boundary = now.replace(hour=2, minute=0, second=0, microsecond=0)
    return boundary if boundary <= now else boundary - timedelta(days=1)


def start_simulator(seed: int, customers: int, now: datetime, log_path: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "tools.lightspeed_sim", "--port", "0", "--seed", str(seed),
           "--customers", str(customers), "--token", DEMO_TOKEN, "--now", now.isoformat()]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("LIGHTSPEED_SIM_URL="):
            return proc, line.split("=", 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the simulator did not start; see {log_path}")


def airflow_env(sim_url: str, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(DEMO / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        AIRFLOW_CONN_LIGHTSPEED_DEFAULT=json.dumps(
            {
                "conn_type": "http",
                "host": sim_url,
                "password": DEMO_TOKEN,
                # The simulator speaks plain http; the client refuses that without the opt-in.
                "extra": {"registers": 1, "rate_budget_dir": str(DEMO / "rate_budget"), "allow_insecure_http": True},
            }
        ),
        AIRFLOW_VAR_TIER_SYNC_DATA_DIR=str(data_dir),
    )
    return env


def run(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    with log_path.open("w") as log:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def summarise(data_dir: Path, label: str) -> dict[str, Any]:
    master = data_dir / MASTER_FILE
    log_file = data_dir / SYNC_LOG_FILE
    print(f"\n== {label}")
    if master.exists():
        with master.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        tiers = Counter(r["Tier"] for r in rows)
        print(f"master CSV: {master.relative_to(REPO)} ({len(rows)} customers, as of {rows[0]['Last Updated'] if rows else '-'})")
        print("tiers:      " + ", ".join(f"{t}: {n}" for t, n in sorted(tiers.items(), key=lambda kv: -kv[1])))
    sync_log: dict[str, Any] = json.loads(log_file.read_text()) if log_file.exists() else {}
    if sync_log:
        keys = ("planned_moves", "updated", "skipped", "protected", "changed_in_pos", "errors")
        print("sync:       " + ", ".join(f"{k}={sync_log.get(k)}" for k in keys)
              + f", synced={sync_log.get('synced')}, dry_run={sync_log.get('dry_run')}")
        if sync_log.get("moves"):
            print("moves:      " + ", ".join(f"{k}: {v}" for k, v in sorted(sync_log["moves"].items())))
        print(f"API:        {sync_log.get('api')}")
        if "group_counts_match" in sync_log:
            print(f"groups match the CSV: {sync_log['group_counts_match']}")
    return sync_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run customer_tier_sync end to end against the simulator.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the previous demo data dir")
    args = parser.parse_args(argv)

    DEMO.mkdir(exist_ok=True)
    data_dir = DEMO / "data"
    if data_dir.exists() and not args.keep:
        shutil.rmtree(data_dir)
    logs = DEMO / "logs"
    logs.mkdir(exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))

    as_of = latest_boundary(datetime.now(tz=UTC))
    print(f"customer-tier-sync demo: as_of {as_of:%Y-%m-%dT%H:%M:%SZ} (end of the newest daily interval)")
    sim, sim_url = start_simulator(args.seed, args.customers, as_of, logs / "simulator.log")
    try:
        print(f"simulator:  {sim_url} (seed {args.seed}, {args.customers} customers)")
        env = airflow_env(sim_url, data_dir)
        print("airflow:    migrating the SQLite metadata DB under .demo/airflow ...")
        if run([airflow, "db", "migrate"], env, logs / "db-migrate.log") != 0:
            print(f"airflow db migrate failed; see {logs / 'db-migrate.log'}")
            return 1
        # A brand-new store's first sync moves most customers at once: the circuit breaker stops it
        # and the run would wait for a person's approval (`make up` shows that loop). The demo runs
        # unattended, so its first run passes allow_mass_change, which writes without asking.
        print("note:       the first run passes allow_mass_change (the demo is unattended: no approval is")
        print("            asked); `make up` shows the first sync waiting for an approval under Required actions")
        runs = [
            ("first run: onboarding sync (allow_mass_change: written without asking for approval)",
             {"allow_mass_change": True}),
            ("second run, same day: must find nothing to move", {}),
        ]
        for i, (label, conf) in enumerate(runs, start=1):
            log_path = logs / f"dags-test-{i}.log"
            print(f"running:    airflow dags test {DAG_ID} {as_of:%Y-%m-%dT%H:%M:%S+00:00} -c '{json.dumps(conf)}'"
                  f"  (log: {log_path.relative_to(REPO)})")
            started = time.monotonic()
            code = run([airflow, "dags", "test", DAG_ID, as_of.isoformat(), "-c", json.dumps(conf)], env, log_path)
            print(f"            finished in {time.monotonic() - started:.0f} s, exit code {code}")
            sync_log = summarise(data_dir, label)
            if code != 0:
                print(f"\nthe run failed; see {log_path}")
                return code
            if i == 2 and sync_log.get("updated"):
                print("\nunexpected: the second run moved customers again")
                return 1
        remote = data_dir / "git" / "tiers.git"
        if remote.exists():
            out = subprocess.run(["git", "--git-dir", str(remote), "log", "--oneline", "-3"],
                                 capture_output=True, text=True)
            print(f"\ngit remote {remote.relative_to(REPO)}:\n" + out.stdout.rstrip())
        docs = data_dir / "validation" / "data_docs" / "index.html"
        if docs.exists():
            print(f"data docs:  file://{docs}")
        print(f"\nall files:  {data_dir}")
        return 0
    finally:
        sim.terminate()
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()


if __name__ == "__main__":
    raise SystemExit(main())
