"""Alerting under the real scheduler (PostgreSQL metadata DB, LocalExecutor; tests/integration/cluster.py).

* a run whose three `sync_batch` instances are refused (401: the token was revoked mid-sync) sends
  exactly **one** alert, naming every failed task with the batch errors grouped, and the batches
  were not retried (the retry policy fails auth errors at once);
* the next good run sends exactly one "recovered" notice; the one after it sends nothing;
* a run still going at its deadline ("tiers synced by 06:00 UTC": its logical date + 28 h) alerts,
  saying which task it is stuck in. The run is triggered with a logical date 28 h minus a few
  seconds ago, so the deadline falls while a latency fault holds `extract_orders`.

Mail goes to an aiosmtpd server on a free port in this process; the scheduler (and the LocalExecutor
workers and callback processes it forks) gets the SMTP connection through its environment.
"""

from __future__ import annotations

import copy
import email
import email.policy
import html
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests import oracle
from tests.integration.cluster import AirflowCluster, free_port, postgres_unavailable_reason, wait_until
from tools.lightspeed_sim import generate_demo_store
from tools.lightspeed_sim.testing import running_simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "customer_tier_sync"
TOKEN = "alerting-it-token-51f0"
RUN_TIMEOUT = 300


class Inbox:
    """What the SMTP server received: (subject, plain text) per message."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        parts = [p.get_content() for p in msg.walk() if p.get_content_maintype() == "text"]
        text = html.unescape(re.sub(r"<[^>]+>", "", "\n".join(parts)))
        with self.lock:
            self.messages.append((str(msg["Subject"]), text))
        return "250 OK"

    def snapshot(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.messages)


@dataclass
class Deployment:
    cluster: AirflowCluster
    sim: Any
    store: Any  # the POS's records before the run: customers, groups, sales
    data_dir: Path
    inbox: Inbox

    def trigger(self, conf: dict[str, Any] | None = None, logical_date: datetime | None = None) -> str:
        body: dict[str, Any] = {
            "logical_date": logical_date.isoformat() if logical_date else None,
            "conf": dict(conf or {}),
        }
        return str(self.cluster.api("POST", f"/dags/{DAG_ID}/dagRuns", json_body=body)["dag_run_id"])

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        return self.cluster.wait_for_run(DAG_ID, run_id, timeout=timeout).state

    def mails_after(self, count: int, settle: float = 5.0) -> list[tuple[str, str]]:
        """The messages past the first `count`, after letting late ones arrive."""
        time.sleep(settle)
        return self.inbox.snapshot()[count:]


@pytest.fixture(scope="module")
def inbox() -> Iterator[tuple[Inbox, int]]:
    from aiosmtpd.controller import Controller

    box = Inbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowCluster]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with AirflowCluster(tmp_path_factory.mktemp("alerting-cluster")) as c:
        c.wait_for_dag(DAG_ID)
        c.unpause(DAG_ID)
        yield c


@contextmanager
def deployed(cluster: AirflowCluster, inbox: tuple[Inbox, int], work: Path) -> Iterator[Deployment]:
    box, port = inbox
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)  # every record predates the run
    store = generate_demo_store(seed=7, customers=300, now=now)
    initial = SimpleNamespace(  # what the POS held before the run (the store itself holds a lock)
        customers=copy.deepcopy(store.customers), groups=copy.deepcopy(store.groups), sales=copy.deepcopy(store.sales)
    )
    with running_simulator(store=store, token=TOKEN) as sim:
        cluster.set_env(
            {
                "AIRFLOW_CONN_LIGHTSPEED_DEFAULT": json.dumps(
                    sim.airflow_connection(TOKEN, registers=1, rate_budget_dir=str(work / "rate_budget"))
                ),
                "AIRFLOW_VAR_TIER_SYNC_DATA_DIR": str(work / "data"),
                "AIRFLOW_CONN_TIER_SYNC_SMTP": json.dumps(
                    {
                        "conn_type": "smtp",
                        "host": "127.0.0.1",
                        "port": port,
                        "extra": {"disable_tls": True, "disable_ssl": True, "to": "oncall@tiersync.test",
                                  "timeout": 10, "retry_limit": 0},
                    }
                ),
            },
            restart=["scheduler"],
        )
        yield Deployment(cluster, sim, initial, work / "data", box)


def target_groups_with_moves(store: Any, as_of: datetime) -> list[tuple[str, str]]:
    """(group id, name) of existing tier groups the onboarding run will move customers into."""
    tiers = oracle.expected_tiers(store.customers, dict(store.sales), as_of)
    final = oracle.expected_final_groups(store.customers, store.groups, tiers)
    by_name = {str(g["name"]): gid for gid, g in store.groups.items() if not g.get("deleted_at")}
    initial = {cid: str(store.groups.get(c.get("customer_group_id") or "", {}).get("name", oracle.DEFAULT_GROUP))
               for cid, c in store.customers.items()}
    names = sorted({want for cid, want in final.items() if want != initial[cid] and want in by_name})
    return [(by_name[n], n) for n in names]


def test_three_failed_batches_one_alert_then_one_recovery(
    cluster: AirflowCluster, inbox: tuple[Inbox, int], tmp_path: Path
) -> None:
    with deployed(cluster, inbox, tmp_path) as d:
        targets = target_groups_with_moves(d.store, datetime.now(UTC))[:3]
        assert len(targets) == 3, f"the demo store moves customers into only {targets}"
        ids = "|".join(re.escape(gid) for gid, _ in targets)
        d.sim.faults.add("status", status=401, method="POST", path=rf"^/customer_groups/({ids})/customers$")
        before = len(d.inbox.snapshot())

        bad = d.trigger({"allow_mass_change": True})
        assert d.wait(bad) == "failed", cluster.describe_run(DAG_ID, bad)
        tis = cluster.task_instances(DAG_ID, bad)
        failed_batches = [ti for ti in tis if ti.task_id == "sync_batch" and ti.state == "failed"]
        assert len(failed_batches) == 3, cluster.describe_run(DAG_ID, bad)
        assert all(ti.try_number == 1 for ti in failed_batches), "an auth error must not be retried"

        mails = d.mails_after(before)
        assert len(mails) == 1, [s for s, _ in mails]
        subject, text = mails[0]
        assert subject.startswith(f"[customer-tier-sync] {DAG_ID}: run failed: sync_batch (3 instances)"), subject
        assert "write_sync_log" in subject, subject  # customers could not be synced
        assert "== sync_batch: 3 instances failed, 1 distinct error(s)" in text, text
        assert (
            "- 3 x LightspeedAuthError: Lightspeed rejected the token of connection 'lightspeed_default' (401) "
            "on POST /customer_groups/<id>/customers" in text
        ), text
        tier_of = {group: tier for tier, group in oracle.GROUPS.items()}
        for _gid, name in targets:
            assert f": {tier_of[name]} (" in text, (name, text)  # the batch labels ("batch 2/5: Bloom (40)")
        assert "== write_sync_log (try 1)" in text and "customers could not be synced (3 failed batches)" in text
        assert TOKEN not in text

        # The next good run: one "recovered", and nothing after a further good run.
        d.sim.faults.clear()
        good = d.trigger({"allow_mass_change": True})
        assert d.wait(good) == "success", cluster.describe_run(DAG_ID, good)
        mails = d.mails_after(before + 1)
        assert [s for s, _ in mails] == [f"[customer-tier-sync] {DAG_ID}: recovered ({good})"], mails
        assert f"after the failed run {bad}" in mails[0][1]

        again = d.trigger()
        assert d.wait(again) == "success", cluster.describe_run(DAG_ID, again)
        assert d.mails_after(before + 2) == []


def test_a_run_held_past_its_deadline_alerts_with_the_task_it_is_stuck_in(
    cluster: AirflowCluster, inbox: tuple[Inbox, int], tmp_path: Path
) -> None:
    with deployed(cluster, inbox, tmp_path) as d:
        # Every read of the feeds takes 6 s: extract_orders is still going at the deadline.
        fault = d.sim.faults.add("latency", seconds=6.0, method="GET", path=r"^/(sales|customers)$")
        before = len(d.inbox.snapshot())
        # The deadline is the logical date + 28 h (06:00 after a 02:00 data interval start).
        deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=25)
        run_id = d.trigger({"allow_mass_change": True}, logical_date=deadline - timedelta(hours=28))

        def deadline_mail() -> tuple[str, str] | None:
            return next((m for m in d.inbox.snapshot()[before:] if "tiers not synced by 06:00 UTC" in m[0]), None)

        found = wait_until(deadline_mail, timeout=120, interval=1.0, what="the deadline alert",
                           diagnostics=lambda: cluster.describe_run(DAG_ID, run_id) + cluster.log_tails(["scheduler"]))
        subject, text = found
        assert subject == f"[customer-tier-sync] {DAG_ID}: tiers not synced by 06:00 UTC ({run_id})"
        assert "Where it is: stuck in extract_orders (running since " in text, text
        assert datetime.now(UTC) >= deadline
        assert d.sim.faults.remove(fault.id)
        assert d.wait(run_id) == "success", cluster.describe_run(DAG_ID, run_id)
        deadline_mails = [m for m in d.inbox.snapshot()[before:] if "tiers not synced" in m[0]]
        assert len(deadline_mails) == 1, deadline_mails
