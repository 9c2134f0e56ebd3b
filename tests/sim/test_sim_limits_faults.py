"""Rate limit (fixed window, 429 + HTTP-date Retry-After) and every fault kind, over real HTTP."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import pytest
import requests

from tests.sim.conftest import TOKEN, body
from tools.lightspeed_sim.testing import running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim import SimServer, SimStore

pytestmark = pytest.mark.unit

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_for_window_start(window: float) -> None:
    """Sleep until just after a window boundary so a burst fits in one window."""
    now = time.time()
    time.sleep((window - now % window) + 0.02)


def test_rate_limit_429_headers_and_window_reset(store: SimStore) -> None:
    window = 1.0
    with running_simulator(store=store, rate_limit=3, window_seconds=window) as sim, requests.Session() as http:
        http.headers.update(AUTH)
        url = f"{sim.base_url}/customer_groups"
        wait_for_window_start(window)
        answers = [http.get(url, timeout=5) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
        assert all(r.headers["X-RateLimit-Limit"] == "3" for r in answers)
        limited = answers[-1]
        assert limited.json() == {"error": "Too Many Requests", "message": "Rate limiting enforced"}
        retry_at = parsedate_to_datetime(limited.headers["Retry-After"])
        assert limited.headers["Retry-After"].endswith(" GMT")
        now = datetime.now(UTC)
        assert 0 < (retry_at - now).total_seconds() <= window + 1
        # 429s count too: still limited in the same window.
        assert http.get(url, timeout=5).status_code == 429
        time.sleep(max(0.0, (retry_at - datetime.now(UTC)).total_seconds()) + 0.05)
        fresh = http.get(url, timeout=5)
        assert fresh.status_code == 200 and fresh.headers["X-RateLimit-Remaining"] == "2"
        assert [s for _, _, s in sim.requests].count(429) == 2


def test_default_limit_scales_with_registers(store: SimStore) -> None:
    with running_simulator(store=store, registers=3) as sim:
        resp = requests.get(f"{sim.base_url}/customer_groups", headers=AUTH, timeout=5)
        assert resp.headers["X-RateLimit-Limit"] == "950"
        assert resp.headers["X-RateLimit-Remaining"] == "949"


def test_retry_after_as_delta_seconds_variant(store: SimStore) -> None:
    with running_simulator(store=store, rate_limit=1, window_seconds=30, retry_after="seconds") as sim:
        url = f"{sim.base_url}/customer_groups"
        requests.get(url, headers=AUTH, timeout=5)
        limited = requests.get(url, headers=AUTH, timeout=5)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 31


def test_status_fault_times_then_recovers(sim: SimServer, http: requests.Session) -> None:
    sim.faults.add("status", method="GET", path=r"^/sales$", status=503, times=2)
    url = f"{sim.base_url}/sales"
    codes = [http.get(url, timeout=5) for _ in range(3)]
    assert [r.status_code for r in codes] == [503, 503, 200]
    assert codes[0].headers["Content-Type"].startswith("text/html")
    assert "X-RateLimit-Remaining" in codes[0].headers
    assert http.get(f"{sim.base_url}/customers", timeout=5).status_code == 200  # path did not match


def test_status_fault_with_json_body(sim: SimServer, http: requests.Session) -> None:
    sim.faults.add("status", path="/customers", status=502, body={"error": "Bad Gateway"}, times=1)
    resp = http.get(f"{sim.base_url}/customers", timeout=5)
    assert resp.status_code == 502 and resp.json() == {"error": "Bad Gateway"}


def test_faults_still_count_against_the_rate_limit(store: SimStore) -> None:
    with running_simulator(store=store, rate_limit=2, window_seconds=60) as sim:
        sim.faults.add("status", status=500)
        url = f"{sim.base_url}/customers"
        codes = [requests.get(url, headers=AUTH, timeout=5).status_code for _ in range(3)]
        assert codes == [500, 500, 429]


def test_reset_fault_closes_the_connection(sim: SimServer, http: requests.Session) -> None:
    sim.faults.add("reset", path="/customer_groups", times=1)
    with pytest.raises(requests.ConnectionError):
        http.get(f"{sim.base_url}/customer_groups", timeout=5)
    assert http.get(f"{sim.base_url}/customer_groups", timeout=5).status_code == 200
    assert sim.requests[0] == ("GET", "/api/2.0/customer_groups", 0)


def test_latency_fault_delays_then_serves(sim: SimServer, http: requests.Session) -> None:
    sim.faults.add("latency", path="/customer_groups", seconds=0.3, times=1)
    start = time.monotonic()
    resp = http.get(f"{sim.base_url}/customer_groups", timeout=5)
    assert resp.status_code == 200 and time.monotonic() - start >= 0.3
    with pytest.raises(requests.Timeout):
        sim.faults.add("latency", path="/customer_groups", seconds=0.5, times=1)
        http.get(f"{sim.base_url}/customer_groups", timeout=0.2)


def test_apply_then_500_really_applies_the_write(sim: SimServer, http: requests.Session) -> None:
    store = sim.store
    target = next(g["id"] for g in store.groups.values() if g["name"] == "GreenHaus Crew - Bloom")
    cid = store.labels["sprout_749_99"]
    sim.faults.add("apply_then_500", method="POST", path=r"/customer_groups/[^/]+/customers$", times=1)
    resp = http.post(f"{sim.base_url}/customer_groups/{target}/customers", json={"customer_ids": [cid]}, timeout=5)
    assert resp.status_code == 500
    assert store.customers[cid]["customer_group_id"] == target
    again = http.post(f"{sim.base_url}/customer_groups/{target}/customers", json={"customer_ids": [cid]}, timeout=5)
    assert again.status_code == 201


def test_probability_faults_are_seeded(store: SimStore) -> None:
    def pattern() -> list[int]:
        with running_simulator(store=store, fault_seed=11) as sim, requests.Session() as http:
            http.headers.update(AUTH)
            sim.faults.add("status", path="/customer_groups", status=500, probability=0.5)
            return [http.get(f"{sim.base_url}/customer_groups", timeout=5).status_code for _ in range(20)]

    first = pattern()
    assert 0 < first.count(500) < 20
    assert pattern() == first


def test_admin_endpoints_control_faults_and_dump_state(sim: SimServer, http: requests.Session) -> None:
    resp = requests.post(
        f"{sim.url}/_sim/faults", json={"kind": "status", "status": 503, "path": "/sales", "times": 1}, timeout=5
    )
    assert resp.status_code == 201 and resp.json()["data"]["kind"] == "status"
    assert requests.get(f"{sim.url}/_sim/faults", timeout=5).json()["data"][0]["times"] == 1
    assert http.get(f"{sim.base_url}/sales", timeout=5).status_code == 503
    assert requests.post(f"{sim.url}/_sim/faults", json={"kind": "nope"}, timeout=5).status_code == 400
    assert requests.delete(f"{sim.url}/_sim/faults", timeout=5).status_code == 204
    assert sim.faults.faults == []
    state = requests.get(f"{sim.url}/_sim/state", timeout=5)
    assert b"1499.995" in state.content
    assert len(body(state)["customers"]) == len(sim.store.customers)
    assert requests.get(f"{sim.url}/_sim/requests", timeout=5).json()["data"] == [
        ["GET", "/api/2.0/sales", 503]
    ]
    requests.post(f"{sim.url}/_sim/token", json={"expire": True}, timeout=5)
    assert http.get(f"{sim.base_url}/sales", timeout=5).status_code == 401


def test_skip_lets_the_first_matching_requests_through(sim: SimServer, http: requests.Session) -> None:
    # A gateway that, after two good pages, answers 200 with an error object instead of a page.
    gateway = {"error": "Service Unavailable"}
    fault = sim.faults.add("status", path=r"^/sales$", status=200, body=gateway, skip=2, times=1)
    answers = [body(http.get(f"{sim.base_url}/sales", timeout=5)) for _ in range(4)]
    assert ["data" in a for a in answers] == [True, True, False, True]
    assert answers[2] == gateway
    assert http.get(f"{sim.base_url}/customers", timeout=5).status_code == 200  # not matching: not counted
    assert (fault.skipped, fault.fired) == (2, 1)


def test_trickle_fault_sends_the_whole_body_slowly(sim: SimServer, http: requests.Session) -> None:
    whole = http.get(f"{sim.base_url}/customer_groups", timeout=5).content
    sim.faults.add("trickle", path=r"^/customer_groups$", seconds=0.02, chunk_bytes=64, times=1)
    started = time.monotonic()
    slow = http.get(f"{sim.base_url}/customer_groups", timeout=5)
    chunks = -(-len(whole) // 64)
    assert slow.status_code == 200 and slow.content == whole  # complete and identical, only slow
    assert time.monotonic() - started >= chunks * 0.02 * 0.9
    assert sim.requests[-1] == ("GET", "/api/2.0/customer_groups", 200)


def test_trickle_fault_gives_up_when_the_client_hangs_up(sim: SimServer) -> None:
    sim.faults.add("trickle", path=r"^/customer_groups$", seconds=0.05, chunk_bytes=1)
    with requests.get(f"{sim.base_url}/customer_groups", headers=AUTH, timeout=5, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.raw.read(3) == b'{"d'
    sim.faults.clear()
    assert requests.get(f"{sim.base_url}/customer_groups", headers=AUTH, timeout=5).status_code == 200


def test_creep_fault_repeats_the_first_page_with_the_cursor_one_further(store: SimStore) -> None:
    with running_simulator(store=store, page_cap=5) as sim, requests.Session() as http:
        http.headers.update(AUTH)
        url = f"{sim.base_url}/sales"
        sim.faults.add("creep", method="GET", path=r"^/sales$")
        first = body(http.get(url, params={"after": 0}, timeout=5))
        cursor = first["version"]["max"]
        second = body(http.get(url, params={"after": cursor}, timeout=5))
        third = body(http.get(url, params={"after": second["version"]["max"]}, timeout=5))
        assert len(first["data"]) == 5
        assert second["data"] == first["data"] == third["data"]
        assert second["version"] == {"min": first["version"]["min"], "max": cursor + 1}
        assert third["version"]["max"] == cursor + 2
        sim.faults.clear()
        honest = body(http.get(url, params={"after": cursor}, timeout=5))
        assert min(int(s["version"]) for s in honest["data"]) > cursor


def test_admin_endpoint_accepts_the_new_fault_fields(sim: SimServer) -> None:
    spec = {"kind": "trickle", "path": "/sales", "seconds": 0.5, "chunk_bytes": 4, "skip": 1}
    resp = requests.post(f"{sim.url}/_sim/faults", json=spec, timeout=5)
    assert resp.status_code == 201
    data = resp.json()["data"]
    assert (data["kind"], data["chunk_bytes"], data["skip"], data["skipped"]) == ("trickle", 4, 1, 0)
    assert requests.post(f"{sim.url}/_sim/faults", json={"kind": "creep"}, timeout=5).status_code == 201
    bad = requests.post(f"{sim.url}/_sim/faults", json={"kind": "trickle", "chunk_bytes": 0}, timeout=5)
    assert bad.status_code == 400
