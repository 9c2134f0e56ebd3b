"""`make up` / `make down` (tools/up.py) for real: the embedded default a user clicks around in.

One test, in the order a user lives it: `up` on a free port with a private state dir; the UI/API
answers and the generated admin login works; the pool, the Variables and the simulator-pointed
connection from airflow_settings.yaml are there; the DAG is unpaused, the first scheduled run (the
store's first sync) stops at the circuit breaker and waits for an approval (the link `up` prints),
is approved through the REST API as a user would in the UI, and succeeds; a second `up` starts
nothing; a second copy on the same port fails clearly; `down` stops every process `up` started and
leaves a bystander alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.integration.cluster import settle_before_answering
from tools import up as up_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "customer_tier_sync"


def run_up(*args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    return subprocess.run(
        [sys.executable, "-m", "tools.up", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def our_processes(state: Path) -> dict[int, float]:
    """pid -> create_time of every live process in the groups recorded by `up` (and their children)."""
    out: dict[int, float] = {}
    for started in up_tool.read_started(up_tool.Paths(state)):
        for proc in up_tool.group_members(started):
            try:
                out[proc.pid] = proc.create_time()
            except psutil.Error:
                continue
    return out


def still_alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "up"
    yield state
    if (state / up_tool.PIDS_FILE).exists():  # a failed test must not leave Airflow running
        run_up("--down", "--state-dir", str(state), timeout=120)


def test_make_up_and_down(state: Path, tmp_path: Path) -> None:
    port = up_tool.free_port()
    t0 = time.monotonic()
    first = run_up("--state-dir", str(state), "--port", str(port))
    assert first.returncode == 0, first.stdout + first.stderr
    print(f"make up: {time.monotonic() - t0:.0f} s")
    url = f"http://127.0.0.1:{port}"
    assert f"Airflow UI:   {url}" in first.stdout
    passwords = json.loads((state / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
    password = passwords["admin"]
    assert f"login:        admin / {password}" in first.stdout
    assert f"viewer / {passwords['viewer']} (Viewer role" in first.stdout  # to try the page's roles
    assert "retention:    run folders older than" in first.stdout
    assert "allow_mass_change" in first.stdout  # how to write a mass change without asking
    assert (state / "airflow" / "airflow.db").exists()  # SQLite, under the state dir

    recorded = up_tool.read_started(up_tool.Paths(state))
    assert sorted(s.name for s in recorded) == ["airflow-standalone", "simulator"]
    before = our_processes(state)
    assert len(before) >= 6  # standalone, scheduler, dag-processor, api-server, triggerer, simulator, ...

    # The API answers and the generated login works (a wrong one does not).
    assert requests.get(f"{url}/api/v2/version", timeout=10).json()["version"] == "3.3.2"
    assert requests.post(f"{url}/auth/token", json={"username": "admin", "password": "wrong"}, timeout=10).status_code == 401
    token = requests.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=10)
    assert token.status_code in (200, 201), token.text
    h = {"Authorization": f"Bearer {token.json()['access_token']}"}

    def get(path: str) -> Any:
        resp = requests.get(f"{url}/api/v2{path}", headers=h, timeout=30)
        assert resp.status_code == 200, f"{path}: {resp.status_code} {resp.text[:300]}"
        return resp.json()

    # airflow_settings.yaml was loaded: pool, Variables, and the connection pointed at the simulator.
    pool = get("/pools/lightspeed_api")
    assert pool["slots"] == 2
    assert get("/variables/tier_sync_git_branch")["value"] == "main"
    assert get("/variables/tier_sync_data_dir")["value"] == ""
    info = json.loads((state / "up.json").read_text())
    conn = get("/connections/lightspeed_default")
    assert conn["conn_type"] == "http"
    assert conn["host"] == info["sim_url"]
    extra = json.loads(conn["extra"])
    assert extra["registers"] == 1 and extra["page_size"] == 1000  # extras from airflow_settings.yaml
    assert requests.get(f"{info['sim_url']}/customer_groups", timeout=10,
                        headers={"Authorization": f"Bearer {up_tool.SIM_TOKEN}"}).status_code == 200

    # The project's UI plugin (plugins/) is loaded; the viewer login may not look a customer up.
    assert "loyalty_tiers" in {p["name"] for p in get("/plugins")["plugins"]}
    viewer = requests.post(
        f"{url}/auth/token", json={"username": "viewer", "password": passwords["viewer"]}, timeout=10
    ).json()["access_token"]
    refused = requests.get(
        f"{url}/loyalty-tiers/api/customers/anyone", headers={"Authorization": f"Bearer {viewer}"}, timeout=30
    )
    assert refused.status_code == 403, refused.text[:300]

    # The DAG is unpaused; the scheduler's first run (the store's first sync) waits for an approval.
    dag = get(f"/dags/{DAG_ID}")
    assert dag["is_paused"] is False
    run_id = info["first_run"]
    assert run_id and run_id.startswith("scheduled__")
    link = up_tool.required_actions_url(url, run_id)
    assert link in first.stdout and "Required actions" in first.stdout
    hitl = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_sync/-1/hitlDetails"
    deadline = time.monotonic() + 240
    detail: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = requests.get(f"{url}/api/v2{hitl}", headers=h, timeout=30)
        if resp.status_code == 200 and resp.json()["task_instance"]["state"] == "awaiting_input":
            detail = resp.json()
            break
        assert get(f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"] == "running"
        time.sleep(3)
    assert detail, f"the first sync never asked: {get(f'/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances')}"
    assert detail["subject"].startswith("Approve the tier sync") and "Apply all" in detail["options"]
    assert requests.get(link, timeout=30).status_code == 200  # the UI route `up` prints
    settle_before_answering()  # Airflow 3.3.2's HITL race (cluster.HITL_SETTLE_S)
    answered = requests.patch(f"{url}/api/v2{hitl}", headers=h, timeout=30,
                              json={"chosen_options": ["Apply all"], "params_input": {"comment": "make up test"}})
    assert answered.status_code == 200, answered.text[:300]
    deadline = time.monotonic() + 240
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = get(f"/dags/{DAG_ID}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            break
        time.sleep(3)
    tis = get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
    assert run.get("state") == "success", [(t["task_id"], t["map_index"], t["state"]) for t in tis]
    assert not run["conf"].get("allow_mass_change")  # no onboarding special case: it asked
    # The run is the first scheduled slot: the newest complete daily interval.
    end = up_tool.latest_boundary(datetime.now(tz=UTC))
    assert run["data_interval_end"] == end.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert run["logical_date"] == run["data_interval_start"] == (end - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    runs = get(f"/dags/{DAG_ID}/dagRuns")["dag_runs"]
    assert [r["dag_run_id"] for r in runs] == [run_id]  # no scheduled duplicate of the slot
    assert any(t["task_id"] == "sync_batch" and t["pool"] == "lightspeed_api" for t in tis)
    log = json.loads((state / "airflow" / "tier_sync_data" / "tier_sync_log.json").read_text())
    assert log["approval"]["status"] == "approved_all" and log["synced"] is True
    print(f"first sync approved and done: {time.monotonic() - t0:.0f} s")

    # `make up` again: nothing new is started.
    again = run_up("--state-dir", str(state), "--port", str(port), timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert up_tool.read_started(up_tool.Paths(state)) == recorded

    # A second copy elsewhere on the same port fails clearly and starts nothing.
    other = tmp_path / "other"
    clash = run_up("--state-dir", str(other), "--port", str(port), timeout=60)
    assert clash.returncode == 1
    assert f"port {port} is already in use" in clash.stderr
    assert not (other / up_tool.PIDS_FILE).exists()

    # `make down` stops exactly what `up` started: a bystander survives.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        during = our_processes(state)
        t1 = time.monotonic()
        stopped = run_up("--down", "--state-dir", str(state), timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        print(f"make down: {time.monotonic() - t1:.0f} s")
        survivors = [pid for pid, ct in {**before, **during}.items() if still_alive(pid, ct)]
        assert survivors == [], [psutil.Process(p).cmdline() for p in survivors if psutil.pid_exists(p)]
        assert bystander.poll() is None
        assert not (state / up_tool.PIDS_FILE).exists()
        assert (state / "sim-store.json").exists()  # the simulator saved the POS for the next `make up`
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/api/v2/version", timeout=5)
        # A second `down` has nothing to do.
        assert "nothing to stop" in run_up("--down", "--state-dir", str(state), timeout=60).stdout
    finally:
        os.kill(bystander.pid, signal.SIGTERM)
        bystander.wait(timeout=10)
