"""Alerts reach a real (local) SMTP server and Slack webhook, name the failed checks, never crash.

A failure goes the way it does in the DAG: the task's failure callback journals it, the watcher
builds the run's one alert from the journal (include/tier_sync/run_alerts.py)."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest

from include.tier_sync import alerts, run_alerts
from include.tier_sync.ledger import RunPaths
from include.tier_sync.rules import TierRules

pytestmark = pytest.mark.unit

DAG_ID = "customer_tier_sync"
RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"
AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)
RUN_LINK = f"http://localhost:8080/dags/{DAG_ID}/runs/{quote(RUN_ID, safe='')}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Collector]:
    """aiosmtpd on a free port, plain (no TLS/auth), and the env connection pointing at it."""
    with running_smtp(monkeypatch) as handler:
        yield handler


@contextmanager
def running_smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Collector]:
    from aiosmtpd.controller import Controller

    handler = _Collector()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    conn = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "extra": {
            "from_email": "airflow@tiersync.test",
            "to": "ops@tiersync.test, owner@tiersync.test",
            "disable_tls": True,
            "disable_ssl": True,
            "timeout": 10,
            "retry_limit": 0,
        },
    }
    monkeypatch.setenv("AIRFLOW_CONN_TIER_SYNC_SMTP", json.dumps(conn))
    try:
        yield handler
    finally:
        controller.stop()


class _Hook(BaseHTTPRequestHandler):
    posts: list[tuple[str, dict[str, Any]]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts.append((self.path, json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return


@pytest.fixture
def slack_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Hook]]:
    handler = type("Hook", (_Hook,), {"posts": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn = {
        "conn_type": "http",
        "host": f"http://127.0.0.1:{server.server_port}/services",
        "password": "T000/B000/s3cr3t",
    }
    monkeypatch.setenv("AIRFLOW_CONN_TIER_SYNC_SLACK", json.dumps(conn))
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides which channels exist."""
    for name in (
        "AIRFLOW_CONN_TIER_SYNC_SMTP",
        "AIRFLOW_CONN_TIER_SYNC_SLACK",
        "AIRFLOW_VAR_TIER_SYNC_ALERT_EMAILS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal lives in the data dir; each test has its own."""
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path))


def run_alert(context: dict[str, Any]) -> dict[str, str]:
    """The DAG's failure path: the task's callback journals it, the watcher sends the one alert."""
    from include.tier_sync.settings import data_dir

    run_alerts.on_task_failure(context)
    entries, notices = run_alerts.read_journal(data_dir(), RUN_ID)
    task_id = context["ti"].task_id
    subject, text = run_alerts.build_run_alert(DAG_ID, RUN_ID, [(task_id, None)], entries, notices)
    return alerts.send_alert(subject, text)


def make_context(task_id: str, exception: BaseException | None) -> dict[str, Any]:
    """What a task's on_failure_callback receives, with stand-ins for the runtime objects."""
    dag_run = SimpleNamespace(dag_id=DAG_ID, run_id=RUN_ID, run_after=AS_OF, run_type="scheduled")
    ti = SimpleNamespace(dag_id=DAG_ID, run_id=RUN_ID, task_id=task_id, map_index=-1, try_number=1)
    return {
        "dag_run": dag_run,
        "ti": ti,
        "task_instance": ti,
        "run_id": RUN_ID,
        "data_interval_start": datetime(2026, 11, 24, 2, tzinfo=UTC),
        "data_interval_end": AS_OF,
        "logical_date": datetime(2026, 11, 24, 2, tzinfo=UTC),
        "exception": exception,
    }


def email_text(envelope: Any) -> str:
    msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
    parts = [p.get_content() for p in msg.walk() if p.get_content_maintype() == "text"]
    return str(msg["Subject"]) + "\n" + "\n".join(parts)


def bad_run(data_dir: Path) -> tuple[RunPaths, BaseException]:
    """A real failing validation: duplicate ids, a wiped extraction and an impossible tier."""
    import csv
    import os

    from include.tier_sync.validation import DataQualityError, validate_master
    from tests.unit.test_validation import COLUMNS, customer, good_rows, write_run

    write_run(data_dir, datetime(2026, 11, 24, 2, tzinfo=UTC), good_rows(100), passed=True)
    rows = good_rows(12)
    rows.append(dict(rows[3]))
    rows.append(customer(777, "2000.00", 4, 0, False, "Bloom"))
    paths = RunPaths(str(data_dir), AS_OF)
    os.makedirs(paths.run_dir, exist_ok=True)
    with open(paths.run_master_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataQualityError) as info:
        validate_master(paths, TierRules())
    return paths, info.value


def test_validation_failure_email_names_checks_counts_ids_and_link(
    tmp_path: Path, smtp_server: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path))
    _paths, dq_error = bad_run(tmp_path)
    # The DAG re-raises the DataQualityError as AirflowFailException (no retries).
    try:
        raise AirflowFailException(str(dq_error)) from dq_error
    except AirflowFailException as exc:
        failure = exc
    run_alert(make_context("validate_tiers", failure))

    assert len(smtp_server.messages) == 1
    envelope = smtp_server.messages[0]
    assert envelope.rcpt_tos == ["ops@tiersync.test", "owner@tiersync.test"]
    text = email_text(envelope)
    assert "data validation failed" in text
    assert "customer_id_unique" in text and "unexpected=2" in text and "cust-0003" in text
    assert "row_count_not_dropped" in text and "rows=14 min=95 previous=100" in text
    assert "tier_consistent_with_rule" in text and "cust-0777" in text
    assert "Nothing was committed or synced" in text
    assert RUN_LINK in text
    assert "@example.com" not in text


def test_summary_read_from_run_json_when_exception_has_none(
    tmp_path: Path, smtp_server: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. the DAG raised AirflowFailException without chaining: the run's validation.json is used."""
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path))
    bad_run(tmp_path)
    run_alert(make_context("validate_tiers", AirflowFailException("validation failed")))
    text = email_text(smtp_server.messages[0])
    assert "customer_id_unique" in text and "cust-0003" in text and "row_count_not_dropped" in text


def test_other_task_failure_email_redacts(smtp_server: _Collector) -> None:
    exc = RuntimeError("401 for token=abcd1234efgh, customer jane.doe@shop.example")
    run_alert(make_context("extract_orders", exc))
    text = email_text(smtp_server.messages[0])
    assert "run failed: extract_orders" in text and "RuntimeError" in text
    assert "abcd1234efgh" not in text and "jane.doe" not in text
    assert f"{RUN_LINK}/tasks/extract_orders" in text


def test_recipients_from_variable(smtp_server: _Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_TIER_SYNC_SMTP"])
    del conn["extra"]["to"]
    monkeypatch.setenv("AIRFLOW_CONN_TIER_SYNC_SMTP", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_ALERT_EMAILS", '["lead@tiersync.test"]')
    out = alerts.send_alert(
        "circuit breaker tripped", "would move 80% of customers", make_context("sync_batch", None)
    )
    assert out["smtp"] == "sent"
    assert smtp_server.messages[0].rcpt_tos == ["lead@tiersync.test"]
    text = email_text(smtp_server.messages[0])
    assert "[customer-tier-sync] circuit breaker tripped" in text and RUN_LINK in text


def test_no_channel_warns_and_returns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="include.tier_sync.alerts")
    out = run_alert(make_context("compute_tiers", ValueError("boom")))
    assert out == {"smtp": "not configured", "slack": "not configured"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "No alert channel is configured" in warnings[-1].getMessage()
    assert "tier_sync_smtp" in warnings[-1].getMessage() and "tier_sync_slack" in warnings[-1].getMessage()
    assert "ValueError: boom" in warnings[-1].getMessage()


def test_broken_smtp_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    conn = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": free_port(),
        "extra": {"to": "a@b.test", "disable_tls": True, "disable_ssl": True, "retry_limit": 0, "timeout": 2},
    }
    monkeypatch.setenv("AIRFLOW_CONN_TIER_SYNC_SMTP", json.dumps(conn))
    caplog.set_level(logging.ERROR, logger="include.tier_sync.alerts")
    out = alerts.send_alert("test", "body")
    assert out == {"smtp": "failed", "slack": "not configured"}
    assert any("alert via smtp" in r.getMessage() for r in caplog.records)
    assert not any("a@b.test" in r.getMessage() for r in caplog.records)


def test_slack_webhook_posted(slack_server: type[_Hook]) -> None:
    out = alerts.send_alert(
        "sync stopped", "group count mismatch: expected 40, found 38", make_context("collect_sync_log", None)
    )
    assert out == {"smtp": "not configured", "slack": "sent"}
    assert len(slack_server.posts) == 1
    path, body = slack_server.posts[0]
    assert path == "/services/T000/B000/s3cr3t"
    assert "group count mismatch" in body["text"] and RUN_LINK in body["text"]


def test_slack_error_is_logged_without_the_url(
    slack_server: type[_Hook], caplog: pytest.LogCaptureFixture
) -> None:
    slack_server.status = 500
    caplog.set_level(logging.ERROR, logger="include.tier_sync.alerts")
    out = alerts.send_alert("x", "y")
    assert out["slack"] == "failed"
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "HTTP 500" in logged and "s3cr3t" not in logged


def test_both_channels(smtp_server: _Collector, slack_server: type[_Hook]) -> None:
    out = alerts.send_alert("both", "text")
    assert out == {"smtp": "sent", "slack": "sent"}
    assert len(smtp_server.messages) == 1 and len(slack_server.posts) == 1


def test_webhook_url_forms() -> None:
    def conn(**kw: Any) -> Any:
        base = {"host": None, "password": None, "schema": None, "port": None, "extra_dejson": {}}
        return SimpleNamespace(**(base | kw))

    assert (
        alerts.slack_webhook_url(conn(host="hooks.slack.com/services", password="T/B/X"))
        == "https://hooks.slack.com/services/T/B/X"
    )
    assert (
        alerts.slack_webhook_url(conn(password="https://hooks.slack.com/services/T/B/X"))
        == "https://hooks.slack.com/services/T/B/X"
    )
    assert (
        alerts.slack_webhook_url(conn(host="https://hooks.slack.com/services/T/B/X"))
        == "https://hooks.slack.com/services/T/B/X"
    )
    assert alerts.slack_webhook_url(conn()) is None


def test_run_url_uses_api_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.org/")
    assert alerts.run_url("d", "manual__x+y") == "https://airflow.example.org/dags/d/runs/manual__x%2By"
