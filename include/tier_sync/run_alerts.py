"""One alert per run, a "recovered" notice, and the "tiers synced by HH:MM UTC" deadline alert.

How it fits together (the channels, redaction and validation lines are `alerts.py`):

- **The journal.** Every task carries four small callbacks (the DAG's default_args): when it starts,
  is retried, fails or succeeds, it writes one JSON entry under
  `<data dir>/alerts/runs/<run>/<task_id>[.<map_index>].json`: state, try, time, and for a retry or
  a failure the redacted error (plus the validation summary for a failed quality gate). Writing a
  file never fails the task: a callback that cannot write logs it and goes on.
- **The run alert.** The `run_outcome` watcher runs when everything else is done (all_done). It
  reads every task instance's state from Airflow, and for each failed one the journal's reason; a
  failed run sends *one* alert naming every failed task (mapped `sync_batch` failures grouped by
  error), then fails the run. Notices recorded by tasks (the group-count check) go into the same
  alert. A run that ends well after a failed one sends a short "recovered" notice.
- **Recovery state**: `<data dir>/alerts/state.json` says whether the last alerted outcome was a
  failure. Any failed run sets it; only a run that proves the pipeline works clears it: not a dry
  run, not a back-fill (those write nothing to the POS).
- **Runs that do not end the normal way** (late at the 06:00 UTC deadline, or failed before the
  watcher ran, e.g. on `dagrun_timeout`) are `stuck_runs.py`'s, from the same journal.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from include.tier_sync import fileio
from include.tier_sync.alerts import (
    MAX_EXCEPTION_CHARS,
    SUBJECT_PREFIX,
    VALIDATE_TASK_ID,
    _find_summary,
    _ids,
    redact,
    run_url,
    send_alert,
    validation_lines,
    validation_summary,
)

log = logging.getLogger(__name__)

WATCHER_TASK_ID = "run_outcome"
RUNNING, UP_FOR_RETRY, FAILED, SUCCESS = "running", "up_for_retry", "failed", "success"
_PATH_ID = re.compile(r"/[^/\s]*\d[^/\s]*")  # a path segment holding an id: /customer_groups/<id>/...


def _now() -> datetime:
    return datetime.now(tz=UTC).replace(microsecond=0)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Where the journal lives


def alerts_root(data_dir: str) -> str:
    return fileio.join(data_dir, "alerts")


def run_folder(data_dir: str, run_id: str) -> str:
    """One folder per Airflow run (a re-trigger of a day is a new run and starts clean)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)[:80]
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:10]
    return fileio.join(alerts_root(data_dir), "runs", f"{safe}-{digest}")


def entry_name(task_id: str, map_index: int | None) -> str:
    return f"{task_id}.{map_index}.json" if map_index is not None and map_index >= 0 else f"{task_id}.json"


def state_path(data_dir: str) -> str:
    return fileio.join(alerts_root(data_dir), "state.json")


def outcome_path(data_dir: str, run_id: str) -> str:
    """Written by the watcher once it has alerted (or found nothing to alert on) for the run."""
    return fileio.join(run_folder(data_dir, run_id), "outcome.json")


def _data_dir() -> str:
    from include.tier_sync.settings import data_dir

    return data_dir()


# --------------------------------------------------------------------------------------------
# The journal: task callbacks (in the worker)


def _error_text(exc: Any, headline_only: bool) -> str:
    text = redact(f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc))
    if headline_only and text:
        text = text.splitlines()[0]
    return text if len(text) <= MAX_EXCEPTION_CHARS else text[:MAX_EXCEPTION_CHARS] + " ..."


def task_entry(context: Mapping[str, Any], state: str, now: datetime) -> dict[str, Any]:
    """The journal entry for a task's state change (pure: ids, label, try, time, reason)."""
    ids = _ids(context)
    ti = context.get("ti") or context.get("task_instance")
    entry: dict[str, Any] = {
        "task_id": ids["task_id"],
        "map_index": ids["map_index"] if ids["map_index"] is not None and ids["map_index"] >= 0 else None,
        "label": getattr(ti, "rendered_map_index", None) or context.get("batch_label"),
        "try_number": ids["try_number"],
        "state": state,
        "at": _iso(now),
    }
    exc = context.get("exception")
    if state in (FAILED, UP_FOR_RETRY) and (exc is not None or context.get("reason")):
        summary = None
        if state == FAILED and (
            ids["task_id"] == VALIDATE_TASK_ID or _find_summary(exc if isinstance(exc, BaseException) else None)
        ):
            summary = validation_summary(context)
            if summary is not None and summary.get("success"):
                summary = None  # a passed (or stale) report says nothing about this failure
        if exc is not None:
            entry["error_type"] = type(exc).__name__ if isinstance(exc, BaseException) else None
            entry["error"] = _error_text(exc, headline_only=summary is not None)
        else:
            entry["error"] = redact(str(context.get("reason")))
        if summary is not None:
            entry["validation"] = summary
    return entry


def future_refusal(context: Mapping[str, Any]) -> str | None:
    """The ledger's refusal when the run is dated in the future, else None. Such a run writes
    nothing in the data dir, not even this journal: its alert names the date from this message."""
    from include.tier_sync.ledger import FutureRunError, refuse_future
    from include.tier_sync.runtime import resolve_as_of

    try:
        refuse_future(resolve_as_of(context))
    except FutureRunError as exc:
        return str(exc)
    return None


def record(context: Mapping[str, Any], state: str) -> None:
    """Write the task's journal entry; never raises (the journal must not fail the task)."""
    try:
        if future_refusal(context):
            return  # the task refuses the run itself; the watcher's alert names the date
        entry = task_entry(context, state, _now())
        run_id = _ids(context)["run_id"]
        if not run_id or not entry["task_id"]:
            log.warning("alert journal: no run or task id in the context; nothing recorded")
            return
        folder = run_folder(_data_dir(), str(run_id))
        fileio.write_json(fileio.join(folder, entry_name(entry["task_id"], entry["map_index"])), entry)
    except Exception as err:
        log.warning("alert journal: could not record %s: %s", state, redact(f"{type(err).__name__}: {err}"))


def on_task_execute(context: Any) -> None:
    record(context, RUNNING)


def on_task_retry(context: Any) -> None:
    record(context, UP_FOR_RETRY)


def on_task_failure(context: Any) -> None:
    record(context, FAILED)


def on_task_success(context: Any) -> None:
    record(context, SUCCESS)


def journal_callbacks() -> dict[str, Any]:
    """The default_args entries that keep the journal (every task of the DAG)."""
    return {
        "on_execute_callback": [on_task_execute],
        "on_retry_callback": [on_task_retry],
        "on_failure_callback": [on_task_failure],
        "on_success_callback": [on_task_success],
    }


def record_notice(context: Mapping[str, Any], subject: str, text: str) -> None:
    """A finding that is not a task failure (e.g. group counts differ): it goes into the run's one
    alert, sent by the watcher, instead of an alert of its own."""
    ids = _ids(context)
    name = re.sub(r"[^A-Za-z0-9]+", "-", subject.lower()).strip("-")[:60] or "notice"
    folder = run_folder(_data_dir(), str(ids["run_id"]))
    fileio.write_json(
        fileio.join(folder, "notices", f"{name}.json"),
        {"task_id": ids["task_id"], "subject": subject, "text": redact(text), "at": _iso(_now())},
    )


def read_journal(data_dir: str, run_id: str) -> tuple[dict[tuple[str, int | None], dict[str, Any]], list[dict[str, Any]]]:
    """The run's entries by (task_id, map_index), and its notices."""
    folder = run_folder(data_dir, run_id)
    entries: dict[tuple[str, int | None], dict[str, Any]] = {}
    for name in fileio.listdir(folder):
        if name.endswith(".json"):
            entry = fileio.read_json(fileio.join(folder, name))
            if isinstance(entry, dict) and entry.get("task_id"):
                entries[(str(entry["task_id"]), entry.get("map_index"))] = entry
    notices = [
        n
        for name in fileio.listdir(fileio.join(folder, "notices"))
        if isinstance(n := fileio.read_json(fileio.join(folder, "notices", name)), dict)
    ]
    return entries, notices


# Airflow reports a task's terminal state before it runs the task's on_failure_callback (task SDK
# task_runner: run() sends the state, finalize() then calls the callbacks), so the watcher can start
# while a failed task is still journaling its reason. It waits up to this long for every reason.
REASON_GRACE_S = 60.0
REASON_POLL_S = 1.0


def await_failure_reasons(
    data_dir: str,
    run_id: str,
    failed: Sequence[tuple[str, int | None]],
    grace_s: float | None = None,
    sleep: Any = time.sleep,
) -> tuple[dict[tuple[str, int | None], dict[str, Any]], list[dict[str, Any]]]:
    """`read_journal` once every failed task instance has journaled its failure, or after the
    grace period (a task killed outright never does: its alert line then says so)."""
    deadline = time.monotonic() + (REASON_GRACE_S if grace_s is None else grace_s)
    while True:
        entries, notices = read_journal(data_dir, run_id)
        missing = [key for key in failed if (entries.get(key) or {}).get("state") != FAILED]
        if not missing:
            return entries, notices
        if time.monotonic() >= deadline:
            log.warning("alert journal: no failure recorded for %s; alerting without their reasons",
                        ", ".join(t if m is None else f"{t}[{m}]" for t, m in missing))
            return entries, notices
        sleep(REASON_POLL_S)


# --------------------------------------------------------------------------------------------
# The run alert (pure)


def failed_from_states(states: Mapping[str, Any], task_ids: Iterable[str]) -> list[tuple[str, int | None]]:
    """(task_id, map_index) of every failed task instance, from `get_task_states` keys
    (`task_id` or `task_id_<map_index>`), the watcher itself left out."""
    known = set(task_ids)
    out: list[tuple[str, int | None]] = []
    for key, state in states.items():
        if str(state) != FAILED:
            continue
        if key in known:
            task_id, map_index = key, None
        else:
            base, _, index = key.rpartition("_")
            if base not in known or not index.isdigit():
                task_id, map_index = key, None  # unknown shape: name it as it came
            else:
                task_id, map_index = base, int(index)
        if task_id != WATCHER_TASK_ID:
            out.append((task_id, map_index))
    return sorted(out, key=lambda k: (k[0], -1 if k[1] is None else k[1]))


def _group_key(entry: Mapping[str, Any] | None) -> str:
    if not entry or not entry.get("error"):
        return "no reason recorded (the task may have been killed); see its log"
    return _PATH_ID.sub("/<id>", str(entry["error"]).splitlines()[0])


def build_run_alert(
    dag_id: str,
    run_id: str,
    failed: list[tuple[str, int | None]],
    entries: Mapping[tuple[str, int | None], Mapping[str, Any]],
    notices: Sequence[Mapping[str, Any]] = (),
) -> tuple[str, str]:
    """(subject, text) of the one alert for a run: every failed task with its reason (validation
    failures with their counts; mapped instances grouped by error), then the notices."""
    by_task: dict[str, list[int | None]] = {}
    for task_id, map_index in failed:
        by_task.setdefault(task_id, []).append(map_index)
    names = [t if by_task[t] == [None] else f"{t} ({len(by_task[t])} instances)" for t in by_task]
    validation_failed = any(
        (entries.get((t, None)) or {}).get("validation") for t, mi in failed if mi is None
    )
    if validation_failed:
        subject = f"{SUBJECT_PREFIX} {dag_id}: data validation failed ({run_id})"
    elif failed:
        subject = f"{SUBJECT_PREFIX} {dag_id}: run failed: {', '.join(names)} ({run_id})"
    else:
        subject = f"{SUBJECT_PREFIX} {dag_id}: {notices[0].get('subject') if notices else 'notice'} ({run_id})"
    lines = [f"DAG: {dag_id}", f"Run: {run_id}"]
    if failed:
        lines.append(f"Failed tasks ({len(failed)}): {', '.join(names)}")
    for task_id, indexes in by_task.items():
        lines.append("")
        if indexes == [None]:
            entry = entries.get((task_id, None)) or {}
            tried = f" (try {entry['try_number']})" if entry.get("try_number") else ""
            lines.append(f"== {task_id}{tried}")
            lines.append(f"Error: {entry.get('error') or _group_key(None)}")
            if entry.get("validation"):
                lines += [*validation_lines(entry["validation"]), "Nothing was committed or synced to the POS for this run."]
            continue
        groups: dict[str, list[str]] = {}
        for mi in indexes:
            found = entries.get((task_id, mi))
            label = (found or {}).get("label") or f"map_index {mi}"
            groups.setdefault(_group_key(found), []).append(str(label))
        lines.append(f"== {task_id}: {len(indexes)} instances failed, {len(groups)} distinct error(s)")
        for key, labels in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {len(labels)} x {key}")
            lines.append(f"  instances: {', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}")
    for notice in notices:
        lines += ["", f"== {notice.get('subject')} (from {notice.get('task_id')})", str(notice.get("text"))]
    link = run_url(dag_id, run_id)
    lines += ["", f"Run in the Airflow UI: {link}" if link else "Run in the Airflow UI: (unknown run)"]
    for task_id in by_task:
        lines.append(f"Task {task_id} in the Airflow UI: {run_url(dag_id, run_id, task_id)}")
    return subject, "\n".join(lines)


def build_recovery_notice(dag_id: str, run_id: str, failed_run_id: str | None) -> tuple[str, str]:
    subject = f"{SUBJECT_PREFIX} {dag_id}: recovered ({run_id})"
    text = (
        f"DAG: {dag_id}\nRun: {run_id} finished successfully after the failed run "
        f"{failed_run_id or '(unknown)'}.\nTiers are synced again.\n\nRun in the Airflow UI: {run_url(dag_id, run_id)}"
    )
    return subject, text


# --------------------------------------------------------------------------------------------
# The watcher (run_outcome) and the recovery state


def proves_recovery(context: Mapping[str, Any]) -> bool:
    """A good run clears "failing" only when it did the real thing: not a dry run, not a back-fill."""
    params = context.get("params") or {}
    run_type = getattr(context.get("dag_run"), "run_type", None)
    return not params.get("dry_run") and str(getattr(run_type, "value", run_type)) != "backfill"


def _state_lock(data_dir: str) -> Any:
    return fileio.exclusive_lock(fileio.join(alerts_root(data_dir), "state.lock"))


def mark_failing(data_dir: str, run_id: str, now: datetime | None = None) -> None:
    """Record a failed run for the "recovered" notice (the DAG callback's path; the watcher's is inline)."""
    with _state_lock(data_dir):
        fileio.write_json(state_path(data_dir), {"failing": True, "failed_run_id": run_id, "at": _iso(now or _now())})


def _task_states(context: Mapping[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    ti = context.get("ti") or context.get("task_instance")
    states = ti.get_task_states(dag_id=dag_id, run_ids=[run_id])  # type: ignore[union-attr]
    return dict(states.get(run_id) or {})


def run_outcome(context: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """The watcher's body: one alert for a failed run (then raise), "recovered" after one.

    Returns what it did (sent, failed tasks); raises AirflowFailException when any task failed.
    """
    from airflow.sdk.exceptions import AirflowFailException

    ids = _ids(context)
    dag_id, run_id = str(ids["dag_id"]), str(ids["run_id"])
    data_dir = _data_dir()
    dag = context.get("dag")
    task_ids = list(getattr(dag, "task_ids", None) or [])
    try:
        states = _task_states(context, dag_id, run_id)
    except Exception as err:  # cannot tell whether anything failed: say so, loudly
        text = f"The watcher could not read the task states of run {run_id}: {type(err).__name__}. Check the run in the UI."
        send_alert(f"{dag_id}: run outcome unknown ({run_id})", text, context)
        raise AirflowFailException(text) from err
    failed = failed_from_states(states, task_ids)
    outcome: dict[str, Any] = {"failed": [f"{t}[{m}]" if m is not None else t for t, m in failed], "sent": []}
    refusal = future_refusal(context)
    if refusal:  # nothing journaled, nothing to write: the alert gives the refusal as every reason
        entries = {key: {"task_id": key[0], "error": redact(refusal)} for key in failed}
        subject, text = build_run_alert(dag_id, run_id, failed, entries)
        send_alert(subject, text)
        raise AirflowFailException(f"The run failed: {', '.join(outcome['failed']) or 'a task'} failed: {refusal}")
    entries, notices = await_failure_reasons(data_dir, run_id, failed)
    at = _iso(now or _now())
    with _state_lock(data_dir):
        state = fileio.read_json(state_path(data_dir), default=None) or {}
        if failed or notices:
            subject, text = build_run_alert(dag_id, run_id, failed, entries, notices)
            send_alert(subject, text)
            outcome["sent"].append(subject)
        if failed:
            fileio.write_json(state_path(data_dir), {"failing": True, "failed_run_id": run_id, "at": at})
        elif state.get("failing") and proves_recovery(context):
            subject, text = build_recovery_notice(dag_id, run_id, state.get("failed_run_id"))
            send_alert(subject, text)
            outcome["sent"].append(subject)
            fileio.write_json(state_path(data_dir), {"failing": False, "recovered_run_id": run_id, "at": at})
    fileio.write_json(outcome_path(data_dir, run_id), {**outcome, "at": at})  # the DAG callback's "done"
    if failed:
        raise AirflowFailException(
            f"The run failed: {', '.join(outcome['failed'])} failed (one alert sent; see tier_sync_log.json)."
        )
    return outcome
