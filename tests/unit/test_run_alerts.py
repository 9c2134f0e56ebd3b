"""One alert per run, "recovered", and the deadline alert: message building, journal, recovery state.

Mail goes to a real local SMTP server (aiosmtpd, tests/unit/test_alerts.py's fixture). Every
timestamp is given by the test; the task states come from a stand-in for the Task SDK's
`get_task_states`, shaped as the execution API answers (`task_id`, or `task_id_<map_index>`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from include.tier_sync import run_alerts, stuck_runs
from include.tier_sync.lightspeed_errors import LightspeedUnavailable
from tests.unit.test_alerts import _Collector, email_text, running_smtp

pytestmark = pytest.mark.unit

DAG_ID = "customer_tier_sync"
TASK_IDS = [
    "extract_orders", "compute_tiers", "validate_tiers", "publish_run", "commit_csv", "plan_sync", "approve_sync",
    "sync_batch", "verify_group_counts", "write_sync_log", "prune_runs", "run_outcome",
]
NOW = datetime(2026, 11, 25, 2, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _no_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIRFLOW_CONN_TIER_SYNC_SMTP", "AIRFLOW_CONN_TIER_SYNC_SLACK", "AIRFLOW_VAR_TIER_SYNC_ALERT_EMAILS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def smtp_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Collector]:
    """aiosmtpd on a free port and the alert connection pointing at it."""
    with running_smtp(monkeypatch) as handler:
        yield handler


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(run_alerts, "_now", lambda: NOW)
    # A failed task without a journal entry is waited for (await_failure_reasons): not for long here.
    monkeypatch.setattr(run_alerts, "REASON_GRACE_S", 0.5)
    monkeypatch.setattr(run_alerts, "REASON_POLL_S", 0.05)
    return tmp_path


class FakeTI:
    """The callback/task view of a task instance, plus the Task SDK's `get_task_states`."""

    def __init__(self, task_id: str, map_index: int = -1, label: str | None = None,
                 states: dict[str, str] | None = None, run_id: str = "") -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = DAG_ID, run_id, task_id, map_index
        self.try_number = 4 if map_index >= 0 else 1
        self.rendered_map_index = label
        self._states = states or {}

    def get_task_states(self, dag_id: str, run_ids: list[str]) -> dict[str, dict[str, str]]:
        assert dag_id == DAG_ID
        return {run_ids[0]: dict(self._states)}


def context(run_id: str, task_id: str, exc: BaseException | None = None, *, map_index: int = -1,
            label: str | None = None, states: dict[str, str] | None = None,
            run_type: str = "manual", params: dict[str, Any] | None = None) -> dict[str, Any]:
    ti = FakeTI(task_id, map_index, label, states, run_id)
    return {
        "dag": SimpleNamespace(dag_id=DAG_ID, task_ids=TASK_IDS),
        "dag_run": SimpleNamespace(dag_id=DAG_ID, run_id=run_id, run_type=run_type),
        "ti": ti,
        "run_id": run_id,
        "params": params or {},
        "exception": exc,
    }


def good_states(**failed: str) -> dict[str, str]:
    states = {t: "success" for t in TASK_IDS if t not in ("sync_batch", "run_outcome")}
    states.update({f"sync_batch_{i}": "success" for i in range(5)})
    states["run_outcome"] = "running"
    states.update(failed)
    return states


def unavailable(group: str) -> LightspeedUnavailable:
    return LightspeedUnavailable(
        f"Lightspeed POST /customer_groups/{group}/customers: 503 after 5 attempts (connection "
        f"'lightspeed_default'); token=lsxs_pt_Secret123 for ops@shop.example",
        503,
    )


# --------------------------------------------------------------------------------------------
# The journal and the message


def test_journal_entry_redacts_and_names_the_batch(data_dir: Path) -> None:
    run_alerts.on_task_failure(context("r1", "sync_batch", unavailable("0af3c9d1"), map_index=2, label="Gold 3/4"))
    entries, notices = run_alerts.read_journal(str(data_dir), "r1")
    entry = entries[("sync_batch", 2)]
    assert entry["state"] == "failed" and entry["label"] == "Gold 3/4" and entry["try_number"] == 4
    assert entry["error_type"] == "LightspeedUnavailable" and entry["at"] == "2026-11-25T02:30:00Z"
    assert "lsxs_pt_Secret123" not in entry["error"] and "ops@shop.example" not in entry["error"]
    assert "token=***" in entry["error"] and "<email>" in entry["error"]
    assert notices == []


def test_a_journal_that_cannot_be_written_never_fails_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(blocker))
    run_alerts.on_task_failure(context("r1", "extract_orders", RuntimeError("boom")))  # no raise
    assert any("could not record failed" in r.getMessage() for r in caplog.records)


def test_failed_keys_from_task_states() -> None:
    states = good_states(sync_batch_3="failed", sync_batch_12="failed", validate_tiers="failed",
                         publish_run="upstream_failed", run_outcome="failed")
    assert run_alerts.failed_from_states(states, TASK_IDS) == [
        ("sync_batch", 3), ("sync_batch", 12), ("validate_tiers", None),
    ]


def test_the_run_alert_groups_batch_errors_and_names_every_failed_task(data_dir: Path) -> None:
    for i, (group, label) in enumerate([("0af3c9d1", "Gold 1/3"), ("0af3c9d1", "Gold 2/3"), ("77be01aa", "Silver 1/1")]):
        run_alerts.on_task_failure(context("r1", "sync_batch", unavailable(group), map_index=i, label=label))
    run_alerts.on_task_failure(
        context("r1", "sync_batch", LightspeedUnavailable("Lightspeed GET /customers: read timed out"), map_index=3)
    )
    run_alerts.on_task_failure(context("r1", "write_sync_log", RuntimeError("4 customers could not be synced")))
    entries, notices = run_alerts.read_journal(str(data_dir), "r1")
    failed = [("sync_batch", i) for i in range(4)] + [("write_sync_log", None), ("sync_batch", 9)]
    subject, text = run_alerts.build_run_alert(DAG_ID, "r1", failed, entries, notices)

    assert subject == f"[customer-tier-sync] {DAG_ID}: run failed: sync_batch (5 instances), write_sync_log (r1)"
    assert "Failed tasks (6): sync_batch (5 instances), write_sync_log" in text
    assert "== sync_batch: 5 instances failed, 3 distinct error(s)" in text
    assert (
        "- 3 x LightspeedUnavailable: Lightspeed POST /customer_groups/<id>/customers: 503 after 5 attempts"
        in text
    )
    assert "  instances: Gold 1/3, Gold 2/3, Silver 1/1" in text
    assert "- 1 x LightspeedUnavailable: Lightspeed GET /customers: read timed out" in text
    assert "- 1 x no reason recorded (the task may have been killed); see its log\n  instances: map_index 9" in text
    assert "== write_sync_log (try 1)\nError: RuntimeError: 4 customers could not be synced" in text
    assert "Task sync_batch in the Airflow UI: http://localhost:8080/dags/customer_tier_sync/runs/r1/tasks/sync_batch" in text
    assert "lsxs_pt_Secret123" not in text and "ops@shop.example" not in text


def test_a_validation_failure_keeps_its_counts(data_dir: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from tests.unit.test_alerts import RUN_ID, bad_run, make_context

    _paths, dq_error = bad_run(data_dir)
    try:
        raise AirflowFailException(str(dq_error)) from dq_error
    except AirflowFailException as exc:
        run_alerts.on_task_failure(make_context("validate_tiers", exc))
    entries, notices = run_alerts.read_journal(str(data_dir), RUN_ID)
    subject, text = run_alerts.build_run_alert(DAG_ID, RUN_ID, [("validate_tiers", None)], entries, notices)
    assert subject.endswith(f"data validation failed ({RUN_ID})")
    assert "customer_id_unique" in text and "unexpected=2" in text and "cust-0003" in text
    assert "rows=14 min=95 previous=100" in text
    assert "Nothing was committed or synced to the POS for this run." in text
    assert "@example.com" not in text


# --------------------------------------------------------------------------------------------
# The watcher: one alert, then "recovered" once


def test_a_failed_run_sends_one_alert_then_the_next_good_run_one_recovery(
    data_dir: Path, smtp_server: _Collector
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    failed = {f"sync_batch_{i}": "failed" for i in (0, 2, 4)} | {"write_sync_log": "failed"}
    for i in (0, 2, 4):
        run_alerts.on_task_failure(context("bad", "sync_batch", unavailable("g1"), map_index=i, label=f"Gold {i}"))
    run_alerts.record_notice(context("bad", "write_sync_log"), "Lightspeed group counts do not match the master CSV",
                             "Gold: expected 40, found 38")
    with pytest.raises(AirflowFailException, match=r"sync_batch\[0\], sync_batch\[2\], sync_batch\[4\], write_sync_log"):
        run_alerts.run_outcome(context("bad", "run_outcome", states=good_states(**failed)))
    assert len(smtp_server.messages) == 1
    text = email_text(smtp_server.messages[0])
    assert "3 x LightspeedUnavailable" in text and "instances: Gold 0, Gold 2, Gold 4" in text
    assert "Lightspeed group counts do not match the master CSV" in text and "expected 40, found 38" in text
    state = json.loads((data_dir / "alerts" / "state.json").read_text())
    assert state == {"failing": True, "failed_run_id": "bad", "at": "2026-11-25T02:30:00Z"}

    # A dry run or a back-fill that ends well proves nothing: no notice, still failing.
    assert run_alerts.run_outcome(context("dry", "run_outcome", states=good_states(), params={"dry_run": True}))["sent"] == []
    assert run_alerts.run_outcome(context("bf", "run_outcome", states=good_states(), run_type="backfill"))["sent"] == []
    assert len(smtp_server.messages) == 1

    out = run_alerts.run_outcome(context("good", "run_outcome", states=good_states(), run_type="scheduled"))
    assert out == {"failed": [], "sent": [f"[customer-tier-sync] {DAG_ID}: recovered (good)"]}
    assert len(smtp_server.messages) == 2
    recovered = email_text(smtp_server.messages[1])
    assert "finished successfully after the failed run bad" in recovered

    assert run_alerts.run_outcome(context("good2", "run_outcome", states=good_states()))["sent"] == []
    assert len(smtp_server.messages) == 2


def test_a_good_run_with_a_notice_sends_that_one_alert_and_succeeds(data_dir: Path, smtp_server: _Collector) -> None:
    run_alerts.record_notice(context("r", "write_sync_log"), "Lightspeed group counts do not match the master CSV", "x")
    out = run_alerts.run_outcome(context("r", "run_outcome", states=good_states()))
    assert out["failed"] == [] and len(smtp_server.messages) == 1
    assert "group counts do not match" in email_text(smtp_server.messages[0])


def test_unreadable_task_states_fail_loudly_with_an_alert(data_dir: Path, smtp_server: _Collector) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    ctx = context("r", "run_outcome")

    def broken(**_: Any) -> Any:
        raise ConnectionError("execution API down")

    ctx["ti"].get_task_states = broken
    with pytest.raises(AirflowFailException, match="could not read the task states"):
        run_alerts.run_outcome(ctx)
    assert "run outcome unknown" in email_text(smtp_server.messages[0])


# --------------------------------------------------------------------------------------------
# The deadline


def test_deadline_interval_from_the_logical_date() -> None:
    assert stuck_runs.deadline_interval(time(6, 0), time(2, 0)) == timedelta(hours=28)
    assert stuck_runs.deadline_interval(time(1, 30), time(2, 0)) == timedelta(hours=47, minutes=30)
    with pytest.raises(ValueError, match="equals the schedule's start"):
        stuck_runs.deadline_interval(time(2, 0), time(2, 0))


def test_the_dags_deadline_is_0600_on_the_day_a_scheduled_run_starts() -> None:
    """The scheduled run for [Nov 24 02:00, Nov 25 02:00) must be done by Nov 25 06:00 UTC."""
    from airflow.models import DagBag

    dag = DagBag("dags").dags[DAG_ID]
    (alert,) = dag.deadline
    assert type(alert.reference).__name__ == "DagRunLogicalDateDeadline"
    assert alert.callback.path == "include.tier_sync.stuck_runs.deadline_missed"
    assert alert.callback.kwargs == {"synced_by": "06:00"}
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.interval import CronDataIntervalTimetable

    timetable = CronDataIntervalTimetable(dag.timetable.expression, timezone="UTC")  # the scheduler's side
    info = timetable.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=datetime(2026, 11, 24, 2, tzinfo=UTC), latest=None, catchup=True),
    )
    assert info is not None and info.logical_date is not None
    assert info.data_interval.end == datetime(2026, 11, 25, 2, tzinfo=UTC)
    assert info.logical_date + alert.interval == datetime(2026, 11, 25, 6, tzinfo=UTC)


def test_synced_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from include.tier_sync import settings

    monkeypatch.delenv(settings.ENV_SYNCED_BY, raising=False)
    assert settings.synced_by() == time(6, 0)
    monkeypatch.setenv(settings.ENV_SYNCED_BY, "05:30")
    assert settings.synced_by() == time(5, 30)
    for bad in ("6:00", "24:00", "06:60", "six"):
        monkeypatch.setenv(settings.ENV_SYNCED_BY, bad)
        with pytest.raises(ValueError, match="TIER_SYNC_SYNCED_BY_UTC must be a UTC time of day as HH:MM"):
            settings.synced_by()


def test_the_deadline_alert_says_which_task_the_run_is_stuck_in(data_dir: Path, smtp_server: _Collector) -> None:
    for task_id in ("extract_orders", "compute_tiers", "validate_tiers", "publish_run", "commit_csv", "plan_sync"):
        run_alerts.on_task_success(context("late", task_id))
    run_alerts.on_task_execute(context("late", "sync_batch", map_index=0, label="Gold 1/2"))
    run_alerts.on_task_retry(context("late", "sync_batch", unavailable("g1"), map_index=1, label="Gold 2/2"))
    stuck_runs.deadline_missed(
        synced_by="06:00",
        context={
            "dag_run": {"dag_id": DAG_ID, "dag_run_id": "late", "state": "running"},
            "deadline": {"id": "d1", "deadline_time": "2026-11-25T06:00:00+00:00"},
        },
    )
    assert len(smtp_server.messages) == 1
    text = html.unescape(email_text(smtp_server.messages[0]))
    assert f"{DAG_ID}: tiers not synced by 06:00 UTC (late)" in text
    assert "stuck in sync_batch (1 running since 2026-11-25T02:30:00Z; Gold 2/2 for retry after try 4: " \
           "LightspeedUnavailable: Lightspeed POST /customer_groups/<id>/customers" in text
    assert "lsxs_pt_Secret123" not in text


def test_where_it_is_before_any_task_started_and_between_tasks() -> None:
    assert stuck_runs.where_it_is({}).startswith("no task has started yet")
    done = {("plan_sync", None): {"task_id": "plan_sync", "state": "success", "at": "2026-11-25T03:00:00Z"}}
    assert stuck_runs.where_it_is(done) == (
        "no task is running; the last one to finish was plan_sync (success at 2026-11-25T03:00:00Z)"
    )


# --------------------------------------------------------------------------------------------
# A run that failed before its watcher ran (dagrun_timeout): the DAG's failure callback


def dag_failure_context(run_id: str, reason: str = "timed_out") -> dict[str, Any]:
    """What the dag-processor passes a DAG-level on_failure_callback."""
    return {"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": run_id, "reason": reason}


def test_a_timed_out_run_alerts_from_the_dag_callback(data_dir: Path, smtp_server: _Collector) -> None:
    run_alerts.on_task_success(context("slow", "extract_orders"))
    run_alerts.on_task_failure(context("slow", "compute_tiers", RuntimeError("killed: token=abc123")))
    run_alerts.on_task_execute(context("slow", "validate_tiers"))
    stuck_runs.on_run_failure(dag_failure_context("slow"))
    assert len(smtp_server.messages) == 1
    text = html.unescape(email_text(smtp_server.messages[0]))
    assert f"{DAG_ID}: run failed (timed_out) before its watcher ran (slow)" in text
    assert "== compute_tiers (try 1)\nError: RuntimeError: killed: token=***" in text and "abc123" not in text
    assert "Where it was: stuck in validate_tiers (running since 2026-11-25T02:30:00Z)." in text
    assert json.loads((data_dir / "alerts" / "state.json").read_text())["failed_run_id"] == "slow"


def test_the_dag_callback_is_silent_when_the_watcher_alerted(data_dir: Path, smtp_server: _Collector) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    run_alerts.on_task_failure(context("r", "extract_orders", RuntimeError("boom")))
    with pytest.raises(AirflowFailException):
        run_alerts.run_outcome(context("r", "run_outcome", states=good_states(extract_orders="failed")))
    assert len(smtp_server.messages) == 1
    stuck_runs.on_run_failure(dag_failure_context("r", reason="task_failure"))
    assert len(smtp_server.messages) == 1  # no second alert for the same run


def test_a_cleared_attempt_is_not_covered_by_an_older_watcher_alert(
    data_dir: Path, smtp_server: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    run_alerts.on_task_failure(context("r", "extract_orders", RuntimeError("boom")))
    with pytest.raises(AirflowFailException):
        run_alerts.run_outcome(context("r", "run_outcome", states=good_states(extract_orders="failed")))
    # The run is cleared; its new attempt journals later and then times out before the watcher.
    monkeypatch.setattr(run_alerts, "_now", lambda: NOW + timedelta(hours=1))
    run_alerts.on_task_execute(context("r", "extract_orders"))
    stuck_runs.on_run_failure(dag_failure_context("r"))
    assert len(smtp_server.messages) == 2
    assert "stuck in extract_orders (running since 2026-11-25T03:30:00Z)" in html.unescape(
        email_text(smtp_server.messages[1])
    )


def test_a_run_dated_in_the_future_journals_nothing_and_its_alert_names_the_date(
    data_dir: Path, smtp_server: _Collector
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    future = datetime(2099, 1, 1, 2, tzinfo=UTC)
    ctx = context("typo", "extract_orders", RuntimeError("Refusing ..."))
    ctx["data_interval_start"], ctx["data_interval_end"] = future - timedelta(days=1), future
    run_alerts.on_task_execute(ctx)
    run_alerts.on_task_failure(ctx)
    watcher = context("typo", "run_outcome", states=good_states(extract_orders="failed"))
    watcher["data_interval_start"], watcher["data_interval_end"] = ctx["data_interval_start"], future
    with pytest.raises(AirflowFailException, match="Refusing a run as of 2099-01-01T02:00:00Z"):
        run_alerts.run_outcome(watcher)
    stuck_runs.on_run_failure({**dag_failure_context("typo"), "data_interval_end": future})
    assert sorted(p for p in data_dir.rglob("*") if p.is_file()) == []  # not even the journal
    assert len(smtp_server.messages) == 1
    text = email_text(smtp_server.messages[0])
    assert "run failed: extract_orders (typo)" in text and "Refusing a run as of 2099-01-01T02:00:00Z" in text


def test_no_deadline_under_airflow_dags_test() -> None:
    """Airflow 3.3.2's `dags test` crashes on a successful run of a DAG with deadline alerts."""
    airflow = ["/venv/bin/airflow"]
    assert stuck_runs.sync_deadline(time(6, 0), time(2, 0), argv=[*airflow, "dags", "test", DAG_ID]) is None
    for argv in ([*airflow, "scheduler"], [*airflow, "dag-processor"], ["pytest", "tests"]):
        alert = stuck_runs.sync_deadline(time(6, 0), time(2, 0), argv=argv)
        assert alert is not None and alert.interval == timedelta(hours=28), argv


def test_the_watcher_waits_for_a_reason_journaled_after_the_failed_state(data_dir: Path, smtp_server: _Collector) -> None:
    """Airflow sends a task's failed state before its on_failure_callback journals the reason, so
    the watcher may start first: the reason written while it waits is in the one alert."""
    import threading

    from airflow.sdk.exceptions import AirflowFailException

    states = good_states(approve_sync="failed", sync_batch_1="failed")
    late = threading.Timer(0.2, run_alerts.on_task_failure,
                           [context("r", "approve_sync", RuntimeError("The sync was aborted by ops: numbers look wrong"))])
    late.start()
    try:
        with pytest.raises(AirflowFailException):
            run_alerts.run_outcome(context("r", "run_outcome", states=states))
    finally:
        late.join()
    text = email_text(smtp_server.messages[0])
    assert len(smtp_server.messages) == 1
    assert "RuntimeError: The sync was aborted by ops: numbers look wrong" in text
    # sync_batch[1] never journaled (a task killed outright): after the grace period, said plainly.
    assert "no reason recorded (the task may have been killed)" in text
