"""`python -m tools.lightspeed_sim --port 0` prints its URL first and serves until killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.sim.conftest import NOW
from tools.lightspeed_sim import SimStore, generate_demo_store

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.lightspeed_sim", "--port", "0", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    return proc, first


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def test_cli_port_0_prints_url_and_serves() -> None:
    proc, first = start("--seed", "3", "--customers", "40", "--token", "cli-token", "--rate-limit", "77")
    try:
        assert first.startswith("LIGHTSPEED_SIM_URL=http://127.0.0.1:"), first
        base = first.split("=", 1)[1]
        assert base.endswith("/api/2.0") and not base.endswith(":0/api/2.0")
        resp = requests.get(f"{base}/customer_groups", headers={"Authorization": "Bearer cli-token"}, timeout=5)
        assert resp.status_code == 200 and resp.headers["X-RateLimit-Limit"] == "77"
        assert {g["name"] for g in resp.json()["data"]} >= {"All Customers", "Staff", "Wholesale"}
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_cli_serves_a_store_file_and_saves_on_exit(tmp_path: Path) -> None:
    source = tmp_path / "in.json"
    saved = tmp_path / "out.json"
    store = generate_demo_store(seed=9, customers=30, now=NOW)
    store.dump(source)
    proc, first = start("--store", str(source), "--save-on-exit", str(saved), "--token", "t")
    try:
        base = first.split("=", 1)[1]
        sale_id = store.labels["sale_1499_995"]
        resp = requests.get(f"{base}/sales/{sale_id}", headers={"Authorization": "Bearer t"}, timeout=5)
        assert b"1499.995" in resp.content
    finally:
        stop(proc)
    assert SimStore.load(saved).dumps() == store.dumps()
