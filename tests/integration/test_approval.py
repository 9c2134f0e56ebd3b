"""The mass-change approval under the real scheduler (PostgreSQL, LocalExecutor, api-server).

A store's first sync trips the circuit breaker, so every run here asks (approve_sync parks in
Airflow 3.3's `awaiting_input`; the scheduler's timeout sweep and the api-server's HITL endpoint
resume it, no triggerer involved):

* approved through the REST API ("Apply all"): the run syncs, every customer ends exactly where the
  independent oracle puts them, the decision is in the sync log; the request was mailed once and
  nothing else alerted;
* "Apply upgrades only": only upgrades are written, every downgrade is left out and listed;
* aborted (REST) and not answered in time: nothing is written, the decision is in the sync log,
  and exactly one failure alert goes out besides the request itself;
* headless Chromium: the required action is visible in the Airflow UI and answerable there.

Every run is laid out from the wall clock (the scheduler plans from it), never from a fixed date.
"""

from __future__ import annotations

import contextlib
import copy
import email
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import oracle
from tests.integration.cluster import (
    AirflowCluster,
    free_port,
    postgres_unavailable_reason,
    settle_before_answering,
    wait_until,
)
from tests.integration.test_scheduler import TOKEN, Deployment, Pos, demo_store
from tools.lightspeed_sim.testing import running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim import SimStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
]

DAG_ID = "customer_tier_sync"
TASK = "approve_sync"
RUN_TIMEOUT = 300
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "approval"
TIER_OF_GROUP = {name: tier for tier, name in oracle.GROUPS.items()}
TIER_ORDER = list(oracle.GROUPS)  # highest first


@dataclass
class Setup:
    deployment: Deployment
    inbox: list[str]
    env: dict[str, str]

    @property
    def cluster(self) -> AirflowCluster:
        return self.deployment.cluster

    def hitl_path(self, run_id: str) -> str:
        return f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK}/-1/hitlDetails"

    def wait_for_question(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        """Until approve_sync waits for a person; its HITL detail from the REST API."""

        def asking() -> bool:
            run = self.cluster.dag_run(DAG_ID, run_id)
            if run.state in ("success", "failed"):
                raise AssertionError(f"run ended {run.state} without asking\n{self.deployment.diagnose(run_id)}")
            return any(ti.task_id == TASK and ti.state == "awaiting_input"
                       for ti in self.cluster.task_instances(DAG_ID, run_id))

        wait_until(asking, timeout=timeout, what=f"{TASK} of {run_id} to await input", interval=2,
                   diagnostics=lambda: self.deployment.diagnose(run_id))
        settle_before_answering()  # Airflow 3.3.2's HITL race (cluster.HITL_SETTLE_S)
        detail: dict[str, Any] = self.cluster.api("GET", self.hitl_path(run_id))
        return detail

    def answer(self, run_id: str, option: str, comment: str = "") -> dict[str, Any]:
        body = {"chosen_options": [option], "params_input": {"comment": comment}}
        result: dict[str, Any] = self.cluster.api("PATCH", self.hitl_path(run_id), json_body=body)
        return result

    def sync_log(self) -> dict[str, Any]:
        return dict(json.loads((self.deployment.data_dir / "tier_sync_log.json").read_text()))

    def requests_mailed(self) -> list[str]:
        return [m for m in self.inbox if "Approval needed" in m.splitlines()[0]]

    def alerts_mailed(self) -> list[str]:
        return [m for m in self.inbox if "Approval needed" not in m.splitlines()[0]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowCluster]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with AirflowCluster(tmp_path_factory.mktemp("approval-cluster")) as c:
        c.wait_for_dag(DAG_ID)
        c.unpause(DAG_ID)
        yield c


@contextmanager
def smtp_server() -> Iterator[tuple[int, list[str]]]:
    """A local SMTP server collecting every message as "Subject: ...\\n<text>"."""
    from aiosmtpd.controller import Controller

    inbox: list[str] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            message = email.message_from_bytes(envelope.content)
            parts = [message] if not message.is_multipart() else list(message.walk())
            text = "\n".join(
                p.get_payload(decode=True).decode("utf-8", "replace") for p in parts if p.get_content_maintype() == "text"
            )
            inbox.append(f"Subject: {message['Subject']}\n{text}")
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


SetupFn = Callable[..., AbstractContextManager[Setup]]


@pytest.fixture(scope="module")
def deploy(cluster: AirflowCluster, tmp_path_factory: pytest.TempPathFactory) -> SetupFn:
    """`with deploy(store, **variables) as s:` a simulator serving `store`, an SMTP inbox, and the
    cluster's scheduler (tasks) and dag-processor (DAG callbacks) pointed at both."""

    @contextmanager
    def _deploy(store: SimStore, **variables: str) -> Iterator[Setup]:
        work = tmp_path_factory.mktemp("approval")
        pos_customers = copy.deepcopy(store.customers)
        pos_groups = copy.deepcopy(store.groups)
        with smtp_server() as (port, inbox), running_simulator(store=store, token=TOKEN) as sim:
            pos = Pos(sim, pos_customers, pos_groups)
            pos.install()
            env = {
                "AIRFLOW_CONN_LIGHTSPEED_DEFAULT": json.dumps(
                    sim.airflow_connection(TOKEN, registers=1, rate_budget_dir=str(work / "rate_budget"))
                ),
                "AIRFLOW_CONN_TIER_SYNC_SMTP": json.dumps({
                    "conn_type": "smtp", "host": "127.0.0.1", "port": port,
                    "extra": {"disable_tls": True, "disable_ssl": True, "to": "oncall@example.com", "timeout": 5,
                              "retry_limit": 0},
                }),
                "AIRFLOW_VAR_TIER_SYNC_DATA_DIR": str(work / "data"),
                # Blank means the default (12 h, anyone allowed); a test may set either.
                "AIRFLOW_VAR_TIER_SYNC_APPROVAL_TIMEOUT_HOURS": variables.get("timeout_hours", ""),
                "AIRFLOW_VAR_TIER_SYNC_APPROVERS": variables.get("approvers", ""),
            }
            cluster.set_env(env, restart=["scheduler", "dag-processor"])
            cluster.wait_healthy()
            yield Setup(Deployment(cluster, pos, work / "data"), inbox, env)

    return _deploy


def final_names(d: Deployment) -> dict[str, str]:
    return d.pos.final_group_names()


def is_downgrade(source: str, target: str) -> bool:
    return (source in TIER_OF_GROUP and target in TIER_OF_GROUP
            and TIER_ORDER.index(TIER_OF_GROUP[target]) > TIER_ORDER.index(TIER_OF_GROUP[source]))


def test_mass_change_waits_is_approved_through_the_rest_api_and_syncs_exactly(deploy: SetupFn) -> None:
    with deploy(demo_store()) as s:
        d = s.deployment
        run_id = d.trigger()  # no allow_mass_change: the store's first sync asks
        detail = s.wait_for_question(run_id)
        assert detail["options"] == ["Apply all", "Apply upgrades only", "Abort"]
        assert detail["subject"].startswith("Approve the tier sync: ")
        assert "downgrades" in detail["body"] and "Sample" in detail["body"] and "plan.json" in detail["body"]
        assert d.pos.membership_writes() == []  # waiting: nothing written yet
        assert d.cluster.dag_run(DAG_ID, run_id).state == "running"
        wait_until(lambda: len(s.requests_mailed()) == 1, timeout=30, what="the approval request mail")
        assert "required_actions" in s.requests_mailed()[0]

        answered = s.answer(run_id, "Apply all", "onboarding the store")
        assert answered["chosen_options"] == ["Apply all"]
        assert d.wait(run_id) == "success", d.diagnose(run_id)

        as_of = d.as_of(run_id)
        expected = d.pos.expected_group_names(as_of)
        final = final_names(d)
        wrong = {cid: (final[cid], want) for cid, want in expected.items() if final[cid] != want}
        assert not wrong, f"{len(wrong)} customers in the wrong group: {list(wrong.items())[:5]}"
        moved = sum(1 for cid in expected if final[cid] != d.pos.initial_group_name(cid))
        assert moved > 50, moved
        log = s.sync_log()
        assert log["synced"] is True and log["updated"] == moved and log["group_counts_match"] is True, log
        assert log["approval"]["status"] == "approved_all" and log["approval"]["option"] == "Apply all"
        assert log["approval"]["comment"] == "onboarding the store" and log["approval"]["responded_by"]
        assert "left_out_by_approval" not in log
        assert s.alerts_mailed() == [] and len(s.requests_mailed()) == 1

        # The next run moves nobody and asks nothing.
        before = len(d.pos.writes)
        second = d.trigger()
        assert d.wait(second) == "success", d.diagnose(second)
        assert d.pos.membership_writes(since=before) == []
        assert len(s.requests_mailed()) == 1 and s.alerts_mailed() == []


def test_upgrades_only_moves_only_the_upgrades(deploy: SetupFn) -> None:
    store = demo_store(seed=7)
    evergreen = next(gid for gid, g in store.groups.items() if g["name"] == oracle.GROUPS["Evergreen"])
    tiers = oracle.expected_tiers(store.customers, store.sales, datetime.now(UTC))
    # Customers the rules put low, sitting in the top group: their moves are downgrades.
    default_ids = {gid for gid, g in store.groups.items() if g["name"] == oracle.DEFAULT_GROUP} | {None, ""}
    low = sorted(cid for cid, e in tiers.items() if e.tier in ("Seed", "First Time Buyer")
                 and store.customers[cid].get("customer_group_id") in default_ids
                 and store.customers[cid].get("deleted_at") is None)[:12]
    assert len(low) == 12
    for cid in low:
        store.customers[cid]["customer_group_id"] = evergreen
    with deploy(store) as s:
        d = s.deployment
        run_id = d.trigger()
        s.wait_for_question(run_id)
        s.answer(run_id, "Apply upgrades only")
        assert d.wait(run_id) == "success", d.diagnose(run_id)

        expected = d.pos.expected_group_names(d.as_of(run_id))
        final = final_names(d)
        held = {cid for cid, want in expected.items() if is_downgrade(d.pos.initial_group_name(cid), want)}
        assert set(low) <= held
        for cid, want in expected.items():
            assert final[cid] == (d.pos.initial_group_name(cid) if cid in held else want), cid
        written = {c for w in d.pos.membership_writes() for c in w.customer_ids}
        assert not written & held
        log = s.sync_log()
        assert log["approval"]["status"] == "approved_upgrades_only"
        assert log["left_out_by_approval"]["downgrades"] == len(held)
        assert log["group_counts_match"] is True and log["errors"] == 0, log
        assert s.alerts_mailed() == []


def test_aborted_and_unanswered_requests_write_nothing_and_alert_once(deploy: SetupFn) -> None:
    with deploy(demo_store(seed=11)) as s:
        d = s.deployment
        groups_before = set(d.pos.sim.store.groups)
        run_id = d.trigger()
        s.wait_for_question(run_id)
        s.answer(run_id, "Abort", "numbers look wrong")
        assert d.wait(run_id) == "failed"
        states = {ti.task_id: ti.state for ti in d.cluster.task_instances(DAG_ID, run_id) if ti.map_index == -1}
        assert states[TASK] == "failed" and states["write_sync_log"] == "success", states
        assert d.pos.membership_writes() == [] and set(d.pos.sim.store.groups) == groups_before
        log = s.sync_log()
        assert log["synced"] is False and log["updated"] == 0 and log["skipped_reason"] == "approval aborted"
        assert log["approval"]["status"] == "aborted" and log["approval"]["comment"] == "numbers look wrong"
        wait_until(lambda: len(s.alerts_mailed()) >= 1, timeout=60, what="the failure alert")
        assert len(s.alerts_mailed()) == 1, s.alerts_mailed()
        assert TASK in s.alerts_mailed()[0] and "aborted" in s.alerts_mailed()[0]
        assert len(s.requests_mailed()) == 1

    # No answer within the deadline (0.01 h = 36 s; the scheduler sweeps every 15 s).
    with deploy(demo_store(seed=12), timeout_hours="0.01") as s:
        d = s.deployment
        run_id = d.trigger()
        detail = s.wait_for_question(run_id)
        assert detail["response_received"] is False
        assert d.wait(run_id, timeout=180) == "failed", d.diagnose(run_id)
        assert d.pos.membership_writes() == []
        log = s.sync_log()
        assert log["synced"] is False and log["approval"]["status"] == "timed_out", log.get("approval")
        assert log["approval"]["responded_by"] is None and log["skipped_reason"] == "approval timed_out"
        wait_until(lambda: len(s.alerts_mailed()) >= 1, timeout=60, what="the failure alert")
        assert len(s.alerts_mailed()) == 1, s.alerts_mailed()
        assert "not answered" in s.alerts_mailed()[0]
        assert len(s.requests_mailed()) == 1


def test_the_required_action_is_visible_and_answerable_in_the_ui(deploy: SetupFn, tmp_path: Path) -> None:
    from tests.integration.test_ui_plugin import NO_BROWSER, Browser, ensure_chromium

    binary = ensure_chromium()
    if binary is None:
        pytest.skip(NO_BROWSER)
    with deploy(demo_store(seed=13)) as s:
        d = s.deployment
        run_id = d.trigger()
        detail = s.wait_for_question(run_id)
        browser = Browser(binary, tmp_path / "chrome", height=2600)
        try:
            # The cluster runs SimpleAuthManager with all_admins: the UI needs no login.
            browser.navigate(f"{d.cluster.api_url}/dags/{DAG_ID}/runs/{run_id}/tasks/{TASK}/required_actions")
            subject = json.dumps(detail["subject"][:40])
            browser.wait_for(f"document.body.innerText.includes({subject})", timeout=90, what="the request in the UI")
            browser.wait_for(
                "[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Apply upgrades only')",
                what="the options as buttons",
            )
            browser.screenshot(ARTIFACTS / "required_action.png")
            buttons = browser.eval(
                "JSON.stringify([...document.querySelectorAll('button')].map(b => [b.innerText.trim(), b.disabled, b.type]))"
            )
            browser.eval("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Abort').click()")

            def page() -> str:
                return f"buttons: {buttons}\npage tail: {str(browser.eval('document.body.innerText'))[-1500:]}"

            wait_until(lambda: d.cluster.dag_run(DAG_ID, run_id).state == "failed", timeout=120,
                       what="the run to fail after Abort in the UI", diagnostics=lambda: page() + d.diagnose(run_id))
        finally:
            with contextlib.suppress(Exception):
                browser.screenshot(ARTIFACTS / "after_answer.png")
            browser.close()
        log = s.sync_log()
        assert log["approval"]["status"] == "aborted" and log["approval"]["responded_by"], log["approval"]
        assert d.pos.membership_writes() == []
