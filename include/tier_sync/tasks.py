"""Task bodies of the customer_tier_sync DAG.

The DAG file only wires tasks; each task calls one function here with its Airflow context. These
functions turn the context into plain inputs (paths, rules, params, a client), call the pure
modules, and fail at once (AirflowFailException) with an operator's message where a failure needs
one (bad data, a circuit breaker, customers that could not be synced). Which of the remaining
exceptions are retried, and how, is the DAG's retry policy (include/tier_sync/retry_rules.py).

Heavy modules (pandas, pyarrow, GX, the git helpers) are imported inside the functions: the DAG
imports this module lazily too, but keeping it cheap costs nothing. From plan_sync on, no task
imports pandas, pyarrow or numpy (issue 17): they read the master's columns with the csv module
(`spreadsheet.read_raw_columns`) and the live customers from the file extract_orders leaves in the
run folder (`sync/live.py`; tests/unit/test_task_imports.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from include.tier_sync import fileio, settings
from include.tier_sync.ledger import RunPaths
from include.tier_sync.runtime import iso, resolve_as_of, run_identity, to_utc

log = logging.getLogger(__name__)
T = TypeVar("T")
LIFETIME_VALUE = "Lifetime Value"  # the approval request's sample shows it (MassChangeError)


def _fail(message: str, cause: BaseException | None = None) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(message) from cause


def run_paths(context: Mapping[str, Any]) -> RunPaths:
    """The run's paths, after the ledger's first rule: a run dated in the future reads and writes
    nothing (every task starts here, so each refuses it before touching the store or the POS)."""
    from include.tier_sync.ledger import FutureRunError, refuse_future

    as_of = resolve_as_of(context)
    try:
        refuse_future(as_of)
    except FutureRunError as exc:
        _fail(str(exc), exc)
    return RunPaths(settings.data_dir(), as_of)


def _params(context: Mapping[str, Any]) -> dict[str, Any]:
    return dict(context.get("params") or {})


def _client() -> Any:
    from include.tier_sync.lightspeed import LightspeedClient

    return LightspeedClient.from_connection(settings.LIGHTSPEED_CONN_ID)


def _setting(read: Callable[[], T]) -> T:
    """A setting read by `read`; a bad Variable fails the task at once (a retry reads the same)."""
    try:
        return read()
    except ValueError as exc:
        _fail(str(exc), exc)
        raise AssertionError("unreachable") from exc


# --------------------------------------------------------------------------------------------
# extract -> compute -> validate -> commit
# --------------------------------------------------------------------------------------------


def extract_task(context: Mapping[str, Any]) -> dict[str, Any]:
    from include.tier_sync.extract import extract_orders
    from include.tier_sync.store import MalformedRecordError, OrderStore
    from include.tier_sync.sync.live import write_for_run

    paths = run_paths(context)
    store = OrderStore(paths.store)
    try:
        with _client() as client:
            result = extract_orders(client, store, full_refresh=bool(_params(context).get("full_refresh")))
    except MalformedRecordError as exc:
        _fail(f"Lightspeed returned malformed data; nothing past the last good page was stored: {exc}", exc)
        raise AssertionError("unreachable") from exc
    write_for_run(paths, store)  # runs/<key>/live_customers.json.gz: the plan then reads no Parquet
    return result


def compute_task(context: Mapping[str, Any]) -> dict[str, Any]:
    """Tiers as of the run; sale amounts that cannot be used fail at once (a retry reads the same)."""
    from include.tier_sync.clv import AmountOverflowError
    from include.tier_sync.master_csv import compute_tiers
    from include.tier_sync.store import MalformedRecordError, OrderStore

    paths = run_paths(context)
    try:
        return compute_tiers(OrderStore(paths.store), paths, run_identity(context), settings.load_tier_rules())
    except (MalformedRecordError, AmountOverflowError) as exc:
        _fail(f"Sale amounts cannot be used; nothing was published: {exc}", exc)
    raise AssertionError("unreachable")


def validate_task(context: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the run's master CSV against the ledger's baseline; a failure fails at once."""
    from include.tier_sync.validation import DataQualityError, validate_master

    paths = run_paths(context)
    try:
        return validate_master(paths, settings.load_tier_rules())
    except DataQualityError as exc:
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key="return_value", value=exc.summary)
        _fail(str(exc), exc)
        raise AssertionError("unreachable") from exc


def publish_task(context: Mapping[str, Any], computed: Mapping[str, Any]) -> dict[str, Any]:
    """Publish the validated run (the ledger's serialized step); only validated data gets here."""
    from include.tier_sync.master_csv import publish_run

    paths = run_paths(context)
    latest = publish_run(paths, run_identity(context), dict(computed["tier_breakdown"]))
    return {"run_key": paths.key, "published_as_latest": latest}


def commit_task(context: Mapping[str, Any], computed: Mapping[str, Any]) -> dict[str, Any]:
    from include.tier_sync.artifacts import MASTER_CSV_ASSET, master_asset_extra, write_run_manifest
    from include.tier_sync.git_export import commit_master

    paths = run_paths(context)
    identity = run_identity(context)
    result = commit_master(
        paths,
        identity,
        dict(computed),
        branch=settings.git_branch(),
        conn_id=settings.GIT_CONN_ID,
        without_contacts=_setting(settings.git_without_contacts),
    )
    outlet_events = context.get("outlet_events")
    if outlet_events is not None:
        outlet_events[MASTER_CSV_ASSET].extra = master_asset_extra(paths, result)
    write_run_manifest(paths, identity)
    return result


# --------------------------------------------------------------------------------------------
# plan -> mapped sync -> group check -> sync log
# --------------------------------------------------------------------------------------------


def is_latest_interval(context: Mapping[str, Any], now: datetime | None = None) -> bool:
    """True when no later data interval has ended yet (the run covers the newest closed interval).

    The schedule's period is read off the run's own interval, so this holds for any fixed-period
    schedule; a run without an interval (manual) is not a back-fill and does not need it.
    """
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None or not end > start:
        return False
    now = now or datetime.now(tz=UTC)
    return bool(now < to_utc(end) + (to_utc(end) - to_utc(start)))


def _master_columns(paths: RunPaths, *columns: str) -> dict[str, list[str]]:
    """The run's master CSV, only `columns`, each cell raw (str), without pandas."""
    from include.tier_sync.spreadsheet import read_raw_columns

    url = paths.run_master_csv
    return read_raw_columns(fileio.read_bytes(url), columns, where=f"master CSV {url}")


def plan_sync_task(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Plan the sync. A tripped circuit breaker on a writing run does not fail: plan.json records
    the plan (not dispatched) and an approval request, and approve_sync asks a person."""
    from include.tier_sync.sync.plan import MassChangeError

    params = _params(context)
    try:
        return _prepare(context, allow_mass_change=bool(params.get("allow_mass_change")))
    except MassChangeError as exc:
        _request_approval(run_paths(context), exc)
        log.warning("%s The run now waits for a person: see the approve_sync task (Required actions).", exc)
        return []


def _prepare(
    context: Mapping[str, Any],
    *,
    allow_mass_change: bool,
    only_upgrades: bool = False,
    expect_cursor: int | None = None,
) -> list[dict[str, Any]]:
    """prepare_sync with this run's inputs; raises MassChangeError when the breaker stops it.

    ``expect_cursor``: the customers cursor the approved plan was made at; a different one (the
    order store changed since) fails before anything is planned or written.
    """
    from include.tier_sync.sync.live import live_customers, store_cursor
    from include.tier_sync.sync.plan import MASTER_ID, MASTER_TIER, MassChangeError
    from include.tier_sync.sync.prepare import decide_writes, prepare_sync

    paths = run_paths(context)
    params = _params(context)
    identity = run_identity(context)
    dry_run = bool(params.get("dry_run"))
    writes_allowed, reason = decide_writes(
        paths, dry_run=dry_run, run_type=identity.get("run_type"), latest_interval=is_latest_interval(context)
    )
    if reason:
        log.info("Writes to Lightspeed are skipped for this run: %s", reason)
    cursor = store_cursor(paths)
    if expect_cursor is not None and int(cursor) != int(expect_cursor):
        _fail(
            f"The order store changed since the approved plan was made (customers cursor {expect_cursor} -> "
            f"{cursor}); nothing was written. Trigger the run again to plan and ask anew."
        )
    limit = params.get("limit")
    master = _master_columns(paths, MASTER_ID, MASTER_TIER, LIFETIME_VALUE)
    try:
        with _client() as client:
            refs = prepare_sync(
                client,
                master,
                live_customers(paths, cursor),
                settings.load_tier_rules(),
                paths,
                customers_cursor=cursor,
                writes_allowed=writes_allowed,
                skipped_reason=reason,
                dry_run=dry_run,
                force_resync=bool(params.get("force_resync")),
                limit=int(limit) if limit is not None else None,
                allow_mass_change=allow_mass_change,
                only_upgrades=only_upgrades,
            )
            return [dict(ref) for ref in refs]  # BatchRef (include/tier_sync/sync/contracts.py)
    except MassChangeError as exc:
        exc.lifetime_values = dict(zip(master[MASTER_ID], master[LIFETIME_VALUE], strict=True))  # type: ignore[attr-defined]
        raise
    raise AssertionError("unreachable")


def _request_approval(paths: RunPaths, exc: Any) -> None:
    """Add the approval request (a sample of the changes, ids and values only) to plan.json."""
    from include.tier_sync.approval import pick_sample, request_record
    from include.tier_sync.sync.batches import read_plan_doc, write_plan_doc

    doc = read_plan_doc(paths)
    if doc is None:
        _fail(f"Circuit breaker: {exc} plan.json is missing, so no approval can be asked; nothing was written.")
        raise AssertionError("unreachable")
    sample = pick_sample(exc.changes, getattr(exc, "lifetime_values", {}))
    write_plan_doc(paths, {**doc, "approval": request_record(sample, datetime.now(UTC))})


APPROVAL_RESERVE_MINUTES = 60  # what the sync after an answer may need inside the run's timeout


def _run_deadline(context: Mapping[str, Any]) -> datetime | None:
    dag_run, dag = context.get("dag_run"), context.get("dag")
    start, timeout = getattr(dag_run, "start_date", None), getattr(dag, "dagrun_timeout", None)
    return to_utc(start) + timeout if start is not None and timeout is not None else None


def approval_request(context: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """approve_sync, first part: {"refs": [...]} when nothing needs asking (plan_sync's refs pass
    on); else the request (subject, body, approvers, timeout), recorded in plan.json and sent on the
    alert channels, for the operator to ask."""
    from datetime import timedelta

    from include.tier_sync.alerts import base_url, run_url, send_alert
    from include.tier_sync.approval import TASK_ID, asking, check_deadline, needs_approval, request_text
    from include.tier_sync.sync.batches import plan_path, read_plan_doc, write_plan_doc

    paths = run_paths(context)
    doc = read_plan_doc(paths)
    if doc is None or not needs_approval(doc):
        ti = context.get("ti")
        refs = ti.xcom_pull(task_ids="plan_sync") if ti is not None else None
        log.info("No approval needed (the circuit breaker did not stop this run, or it may not write).")
        return {"refs": [dict(r) for r in refs or []]}
    timeout = _setting(settings.approval_timeout)
    approvers = _setting(settings.approvers)
    now = now or datetime.now(UTC)
    deadline = now + timeout
    try:
        check_deadline(deadline, _run_deadline(context), timedelta(minutes=APPROVAL_RESERVE_MINUTES))
    except ValueError as exc:
        _fail(str(exc), exc)
    ids = run_identity(context)
    link = run_url(ids.get("dag_id"), ids.get("run_id"), TASK_ID)
    subject, body = request_text(
        doc,
        deadline=deadline,
        plan_location=plan_path(paths),
        run_link=run_url(ids.get("dag_id"), ids.get("run_id")),
        data_docs_link=f"{base_url()}/loyalty-tiers/data-docs/",
        approvers=approvers,
    )
    write_plan_doc(
        paths,
        {**doc, "skipped_reason": "circuit_breaker", "approval": asking(doc.get("approval"), deadline=deadline, approvers=approvers)},
    )
    answer_at = f"{link}/required_actions" if link else "the run's Required actions"
    send_alert(f"Approval needed: {subject}", f"{body}\n\nAnswer here: {answer_at}", context)
    log.info("Asking for approval until %s (approvers: %s): %s", iso(deadline), approvers or "any", subject)
    return {"refs": None, "subject": subject, "body": body, "approvers": approvers, "timeout": timeout}


def approval_answered(
    context: Mapping[str, Any], event: Mapping[str, Any], now: datetime | None = None
) -> list[dict[str, Any]]:
    """approve_sync, second part: record the decision in plan.json; an approval plans the writes
    (the same plan, or its upgrades only) and returns the refs to sync; anything else fails."""
    from include.tier_sync.approval import decision_record, direction, only_upgrades, refusal_message
    from include.tier_sync.sync.batches import read_plan_doc, write_plan_doc

    paths = run_paths(context)
    doc = read_plan_doc(paths)
    if doc is None:
        _fail("plan.json disappeared while the approval was asked; nothing was written.")
        raise AssertionError("unreachable")
    try:
        decision = decision_record(event, requested=doc.get("approval"), decided_at=now or datetime.now(UTC))
    except ValueError as exc:
        _fail(str(exc), exc)
        raise AssertionError("unreachable") from exc
    log.info(
        "Approval decision: %s",
        {k: v for k, v in decision.items() if k != "sample"},
    )
    message = refusal_message(decision)
    if message is not None:
        write_plan_doc(paths, {**doc, "approval": decision, "skipped_reason": f"approval {decision['status']}"})
        _fail(message)
    upgrades = only_upgrades(decision)
    shown = dict((doc.get("summary") or {}).get("moves") or {})
    expected = {k: v for k, v in shown.items() if direction(k) in ("upgrade", "new tier")} if upgrades else shown
    refs = _prepare(
        context, allow_mass_change=True, only_upgrades=upgrades, expect_cursor=int(doc.get("customers_cursor", -1))
    )
    new = read_plan_doc(paths) or doc
    planned = dict((new.get("summary") or {}).get("moves") or {})
    if planned != expected:
        write_plan_doc(paths, {**new, "approval": decision, "dispatched": False, "writes_allowed": False,
                               "skipped_reason": "approval: the plan changed since it was shown"})
        _fail(
            f"The plan changed since it was approved (shown {expected}, now {planned}); no customer was "
            "moved. Trigger the run again to plan and ask anew."
        )
    write_plan_doc(paths, {**new, "approval": decision})
    log.info("Approved (%s): %s batches to sync", decision["option"], len(refs))
    return refs


def sync_batch_task(context: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    # One of up to 256 mapped instances: it loads its batch file only (the write decision comes in
    # its XCom ref), never the master CSV, and imports no pandas (tests/unit/test_sync_write_imports.py).
    from include.tier_sync.sync.write import sync_batch

    run_paths(context)  # refuses a run dated in the future
    with _client() as client:
        return dict(sync_batch(ref, client, writes_allowed=bool(ref.get("writes_allowed"))))


def verify_group_counts_task(context: Mapping[str, Any]) -> dict[str, Any]:
    """Compare tier groups in Lightspeed with the CSV; skipped (with a reason) when nothing was planned."""
    from include.tier_sync.sync.batches import groups_from_plan, read_expected_members
    from include.tier_sync.sync.log import left_alone_ids
    from include.tier_sync.sync.plan import MASTER_ID, MASTER_TIER
    from include.tier_sync.sync.verify import verify_group_counts, write_group_check

    paths = run_paths(context)
    groups = groups_from_plan(paths)  # None when there is no plan.json
    if groups is None:
        return dict(write_group_check(paths, {"checked": False, "reason": "no sync plan for this run"}))
    with _client() as client:
        check = verify_group_counts(
            client,
            _master_columns(paths, MASTER_ID, MASTER_TIER),
            groups,
            expected_members=read_expected_members(paths),
            left_alone=left_alone_ids(paths),
            paths=paths,  # the plan's group state + the feed since its cursor: no full group listing
        )
    return dict(write_group_check(paths, {"checked": True, **check}))  # runs/<key>/group_check.json


def _why_nothing_was_planned(context: Mapping[str, Any], paths: RunPaths) -> str | None:
    """A human reason for a run that never reached the sync (validation failure, breaker, ...)."""
    report = fileio.read_json(paths.run_validation_json)
    validation = report.get("summary") if isinstance(report, dict) else None
    if isinstance(validation, dict) and validation.get("success") is False:
        failed = validation.get("failed") or []
        return f"validation failed ({', '.join(map(str, failed[:5]))}); nothing was committed or synced"
    dag_run = context.get("dag_run")
    get_tis = getattr(dag_run, "get_task_instances", None)
    if callable(get_tis):
        try:
            for ti in get_tis():
                if str(getattr(ti, "state", "")) in {"failed", "upstream_failed"}:
                    return f"task {ti.task_id} {ti.state}; nothing was synced"
        except Exception:  # reading task states is a nicety, never a reason to lose the log
            log.debug("could not read task states", exc_info=True)
    return None


def write_sync_log_task(context: Mapping[str, Any]) -> dict[str, Any]:
    """Write tier_sync_log.json (always), then fail the run if any customer could not be synced."""
    from include.tier_sync.artifacts import write_run_manifest
    from include.tier_sync.run_alerts import record_notice
    from include.tier_sync.sync.batches import read_plan_doc
    from include.tier_sync.sync.log import finish_sync, raise_for_sync_errors
    from include.tier_sync.sync.verify import read_group_check

    paths = run_paths(context)
    identity = run_identity(context)
    params = _params(context)
    from include.tier_sync.sync.progress import finish_progress, raise_for_progress_errors

    group_check = read_group_check(paths)  # runs/<key>/group_check.json
    no_plan_reason = None if read_plan_doc(paths) else _why_nothing_was_planned(context, paths)
    progress = finish_progress(paths)  # progress at the till (opt-in)
    log_doc = finish_sync(
        paths,
        identity,
        group_check=group_check if group_check is not None and group_check.get("checked") else None,
        dry_run=bool(params.get("dry_run")),
        no_plan_reason=no_plan_reason,
        progress=progress,
    )
    write_run_manifest(paths, identity)
    if log_doc["synced"] and log_doc.get("group_counts_match") is False:
        record_notice(  # part of the run's one alert (run_alerts.py), not an alert of its own
            context,
            "Lightspeed group counts do not match the master CSV",
            "After the sync, at least one tier group in Lightspeed does not hold exactly the customers the "
            f"CSV puts there: {log_doc.get('group_counts')}. See tier_sync_log.json of run {identity.get('run_id')}.",
        )
    try:
        raise_for_sync_errors(log_doc)
        raise_for_progress_errors(progress)
    except Exception as exc:
        _fail(str(exc), exc)
    return dict(log_doc)


def plan_progress_task(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Progress at the till: skipped (setting off) or the refs of the texts to write (sync/progress.py)."""
    from airflow.sdk.exceptions import AirflowSkipException

    field = _setting(settings.progress_field)
    if field is None:
        raise AirflowSkipException(f"Progress at the till is off (Variable {settings.VAR_PROGRESS_FIELD} unset)")
    from include.tier_sync.sync.batches import read_plan_doc
    from include.tier_sync.sync.live import live_customers, store_cursor
    from include.tier_sync.sync.progress import MASTER_COLUMNS, NoSyncPlan, plan_progress

    paths = run_paths(context)
    try:
        if read_plan_doc(paths) is None:  # before reading the master, which a failed run may lack
            raise NoSyncPlan("no sync plan for this run (plan_sync did not finish): nothing is shown at the till")
        return plan_progress(paths, _master_columns(paths, *MASTER_COLUMNS), live_customers(paths, store_cursor(paths)),
                             settings.load_tier_rules(), field=field, dry_run=bool(_params(context).get("dry_run")))
    except NoSyncPlan as exc:  # the failed task upstream is the run's failure (and its alert)
        raise AirflowSkipException(str(exc)) from exc
    except ValueError as exc:
        _fail(f"Progress at the till: {exc}", exc)
        raise AssertionError("unreachable") from exc


def progress_batch_task(context: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    # Like sync_batch: one batch file, no master CSV, no pandas (tests/unit/test_task_imports.py).
    from include.tier_sync.sync.progress_write import write_progress_batch

    run_paths(context)  # refuses a run dated in the future
    with _client() as client:
        return write_progress_batch(ref, client, writes_allowed=bool(ref.get("writes_allowed")))


def prune_runs_task(context: Mapping[str, Any]) -> dict[str, Any]:
    """Remove run folders older than `tier_sync_retention_days` (counted from this run's as_of)."""
    from include.tier_sync.retention import prune_runs

    paths = run_paths(context)
    return prune_runs(paths, _setting(settings.retention_days))
