"""Runs that do not end the normal way: late at the deadline, or failed before their watcher ran.

Both read the run's journal (`run_alerts.py`) because neither process can ask Airflow for task
states: the deadline callback runs on the executor, the DAG's failure callback in the dag-processor,
each with Variables and connections only.

- **The deadline, "tiers synced by HH:MM UTC"**: a `DeadlineAlert` on the DAG, counted from a
  scheduled run's logical date. A run still going then sends "tiers not synced by 06:00 UTC" naming
  the task(s) it is in.
- **A run failed without its watcher** (`dagrun_timeout`, a run marked failed while its last tasks
  never ran): the DAG's `on_failure_callback` sends the one alert `run_outcome` would have sent,
  unless `run_outcome` already did (its `outcome.json` in the journal, newer than every entry).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import time, timedelta
from typing import Any

from airflow.sdk.definitions.callback import SyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

from include.tier_sync import fileio
from include.tier_sync.alerts import SUBJECT_PREFIX, redact, run_url, send_alert
from include.tier_sync.run_alerts import (
    FAILED,
    RUNNING,
    UP_FOR_RETRY,
    WATCHER_TASK_ID,
    _data_dir,
    _group_key,
    build_run_alert,
    future_refusal,
    mark_failing,
    outcome_path,
    read_journal,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The deadline


def deadline_interval(synced_by: time, run_at: time) -> timedelta:
    """From a scheduled run's logical date (its data interval's start, the day before at `run_at`)
    to `synced_by` on the day the run starts: one day plus the time from `run_at` to `synced_by`."""
    start = timedelta(hours=run_at.hour, minutes=run_at.minute)
    end = timedelta(hours=synced_by.hour, minutes=synced_by.minute)
    if start == end:
        raise ValueError(f"the sync deadline {synced_by:%H:%M} UTC equals the schedule's start {run_at:%H:%M} UTC")
    return timedelta(days=1) + (end - start) % timedelta(days=1)


def in_dags_test(argv: Sequence[str] | None = None) -> bool:
    """True in an `airflow dags test` process (the command line says so)."""
    args = list(sys.argv if argv is None else argv)
    return len(args) >= 3 and args[1:3] == ["dags", "test"]


def sync_deadline(synced_by: time, run_at: time, argv: Sequence[str] | None = None) -> DeadlineAlert | None:
    """The DAG's deadline: "tiers synced by HH:MM UTC", counted from the run's logical date.

    None under `airflow dags test`: in Airflow 3.3.2 its in-memory DAG keeps the deadline alerts
    as dicts where the scheduler's code expects their DB ids, so every *successful* test run
    crashes ("'dict' object has no attribute 'hex'" in DeadlineAlert.get_by_id). A test run has
    no deadline to watch anyway; the scheduler and the dag-processor parse with it.
    """
    if in_dags_test(argv):
        log.info("airflow dags test: the sync deadline alert is left out (see stuck_runs.sync_deadline)")
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=deadline_interval(synced_by, run_at),
        callback=SyncCallback(deadline_missed, kwargs={"synced_by": f"{synced_by:%H:%M}"}),
        name=f"tiers synced by {synced_by:%H:%M} UTC",
    )


def where_it_is(entries: Mapping[tuple[str, int | None], Mapping[str, Any]]) -> str:
    """Which task(s) a run is in, from its journal: running or waiting to retry, else the last done."""
    active = [e for e in entries.values() if e.get("state") in (RUNNING, UP_FOR_RETRY)]
    if not active:
        done = sorted(entries.values(), key=lambda e: str(e.get("at")))
        if not done:
            return "no task has started yet (the run is queued, or waiting for a worker or a pool slot)"
        last = done[-1]
        return f"no task is running; the last one to finish was {last.get('task_id')} ({last.get('state')} at {last.get('at')})"
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for e in active:
        by_task.setdefault(str(e.get("task_id")), []).append(e)
    parts: list[str] = []
    for task_id, items in sorted(by_task.items()):
        running = [e for e in items if e.get("state") == RUNNING]
        waiting = [e for e in items if e.get("state") == UP_FOR_RETRY]
        bits = []
        if running:
            since = min(str(e.get("at")) for e in running)
            bits.append(f"{len(running)} running since {since}" if len(items) > 1 else f"running since {since}")
        for e in waiting:
            bits.append(f"{e.get('label') or 'up'} for retry after try {e.get('try_number')}: {_group_key(e)}")
        parts.append(f"{task_id} ({'; '.join(bits)})")
    return "stuck in " + ", ".join(parts)


def build_deadline_alert(dag_id: str, run_id: str, synced_by: str, deadline_time: Any, where: str) -> tuple[str, str]:
    subject = f"{SUBJECT_PREFIX} {dag_id}: tiers not synced by {synced_by} UTC ({run_id})"
    text = (
        f"DAG: {dag_id}\nRun: {run_id}\nThe run had not finished by its deadline, {synced_by} UTC "
        f"({deadline_time}): the shops may open with yesterday's tiers.\nWhere it is: {where}.\n\n"
        f"Run in the Airflow UI: {run_url(dag_id, run_id)}"
    )
    return subject, text


def deadline_missed(synced_by: str = "06:00", context: Mapping[str, Any] | None = None) -> None:
    """The DeadlineAlert callback (executor: Variables and connections only, no task states), so
    the journal says where the run is. Never raises: the alert goes out regardless."""
    context = context or {}
    dag_run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    dag_id = str(dag_run.get("dag_id"))
    run_id = str(dag_run.get("dag_run_id") or dag_run.get("run_id"))
    try:
        entries, _ = read_journal(_data_dir(), run_id)
        where = where_it_is(entries)
    except Exception as err:
        where = f"unknown (the alert journal could not be read: {type(err).__name__})"
    subject, text = build_deadline_alert(dag_id, run_id, synced_by, deadline.get("deadline_time"), where)
    send_alert(subject, text)


# --------------------------------------------------------------------------------------------
# A run that failed without its watcher


def watcher_alerted(data_dir: str, run_id: str, entries: Mapping[tuple[str, int | None], Mapping[str, Any]]) -> bool:
    """True when run_outcome sent this attempt's alert: its outcome.json is at least as new as every
    other task's entry (a cleared, re-run attempt journals newer entries)."""
    outcome = fileio.read_json(outcome_path(data_dir, run_id), default=None)
    if not isinstance(outcome, dict):
        return False
    newest = max((str(e.get("at")) for k, e in entries.items() if k[0] != WATCHER_TASK_ID), default="")
    return str(outcome.get("at")) >= newest


def on_run_failure(context: Mapping[str, Any]) -> None:
    """The DAG's on_failure_callback (dag-processor): the run's one alert when run_outcome never
    sent it (e.g. `dagrun_timeout`). Never raises."""
    try:
        dag_id = str(getattr(context.get("dag"), "dag_id", None))
        run_id = str(context.get("run_id"))
        if future_refusal(context):
            return  # refused by every task; run_outcome alerted without writing a thing
        data_dir = _data_dir()
        entries, notices = read_journal(data_dir, run_id)
        if watcher_alerted(data_dir, run_id, entries):
            return
        failed = sorted(
            (k for k, e in entries.items() if e.get("state") == FAILED and k[0] != WATCHER_TASK_ID),
            key=lambda k: (k[0], -1 if k[1] is None else k[1]),
        )
        _subject, text = build_run_alert(dag_id, run_id, failed, entries, notices)
        reason = redact(str(context.get("reason") or "unknown reason"))
        subject = f"{SUBJECT_PREFIX} {dag_id}: run failed ({reason}) before its watcher ran ({run_id})"
        text += f"\n\nThe run ended ({reason}) before run_outcome ran. Where it was: {where_it_is(entries)}."
        send_alert(subject, text)
        mark_failing(data_dir, run_id)
    except Exception as err:
        log.error("run failure callback: could not send the run's alert: %s", redact(f"{type(err).__name__}: {err}"))
