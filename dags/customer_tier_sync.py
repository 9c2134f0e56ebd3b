"""
### Customer tier sync

Every day at 02:00 UTC this DAG runs the retailer's loyalty program:

1. **extract_orders**: pulls what changed in Lightspeed X-Series (sales and customers, by version
   cursor) into the order store under the `tier_sync_data_dir` Variable.
2. **compute_tiers**: recomputes every customer's lifetime value and loyalty tier *as of the end of
   the run's data interval* and writes `customer_analytics_master.csv`.
3. **validate_tiers**: Great Expectations checks against the last published run (a re-run of a
   day included); a failure stops the run before anything is published, committed or sent to the
   till, and alerts.
4. **publish_run**: records the validated day in the tier history and, for the latest run,
   replaces the stable master CSV (one run at a time). A run dated in the future is refused by
   every task before it reads or writes anything.
5. **commit_csv**: commits the master CSV to the `tier_sync_git_remote` repository.
6. **plan_sync** / **approve_sync** / **sync_batch** (mapped, pool `lightspeed_api`): moves
   customers whose tier changed into the matching Lightspeed customer group. Staff, Wholesale and
   other non-tier groups are never touched. A plan that trips the circuit breaker waits in
   approve_sync for a person (Required actions: apply all, upgrades only, or abort).
7. **verify_group_counts** / **plan_progress** / **progress_batch** / **write_sync_log**: checks the
   groups against the CSV, writes each customer's progress text into the POS field the
   `tier_sync_progress_field` Variable names (opt-in; skipped when unset), and writes
   `tier_sync_log.json` (also this task's XCom).
8. **prune_runs**: removes run folders older than the `tier_sync_retention_days` Variable (default
   90), counted from the run's as_of; the tier history and each pruned run's counts are kept.

Trigger options: `dry_run` (plan and log only), `full_refresh` (rebuild the order store),
`force_resync` (re-assert every managed customer's group), `limit` (first N moves only),
`allow_mass_change` (write a mass change without asking). Back-filled and superseded runs compute and log
but never write to the POS. Every task has an `execution_timeout` and the run a `dagrun_timeout`
(defaults in include/tier_sync/settings.py; env `TIER_SYNC_TASK_TIMEOUT_MINUTES`,
`TIER_SYNC_DAGRUN_TIMEOUT_HOURS`). See the project README for operating notes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import (
    CronDataIntervalTimetable,
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)

from include.tier_sync import settings
from include.tier_sync.approval import SyncApprovalOperator
from include.tier_sync.artifacts import MASTER_CSV_ASSET
from include.tier_sync.retry_rules import describe as describe_retry_policy
from include.tier_sync.retry_rules import tier_sync_retry_policy
from include.tier_sync.run_alerts import journal_callbacks
from include.tier_sync.stuck_runs import on_run_failure, sync_deadline

DAG_ID = settings.DAG_ID

# Time bounds (settings.py: defaults, env overrides; the environment only, never a Variable or the
# DB at parse time). A hung task fails on its timeout and a stuck run on dagrun_timeout, instead of
# holding the only active run (max_active_runs=1) and blocking the days after it.
TIMEOUTS = settings.task_timeouts()
SCHEDULE_AT = settings.SCHEDULE_AT  # UTC, the cron below
# "Tiers synced by HH:MM UTC" (env TIER_SYNC_SYNCED_BY_UTC, default 06:00): counted from a scheduled
# run's logical date (its data interval's start, the day before), so 06:00 on the day it runs.
SYNCED_BY = settings.synced_by()
SAFETY_SECTION = "Safety overrides"


@dag(
    dag_id=DAG_ID,
    # CronDataIntervalTimetable gives each run a real [D-1 02:00, D 02:00) interval; Airflow 3's
    # default cron timetable would give zero-width intervals (see docs/airflow-3-notes.md §A1).
    schedule=CronDataIntervalTimetable(f"{SCHEDULE_AT.minute} {SCHEDULE_AT.hour} * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=settings.dagrun_timeout(),
    deadline=sync_deadline(SYNCED_BY, SCHEDULE_AT),  # None under `airflow dags test` (see there)
    # A run that fails before run_outcome sent its alert (dagrun_timeout): the alert from here.
    on_failure_callback=[on_run_failure],
    tags=["loyalty", "lightspeed", "customer-tiers"],
    doc_md=f"{__doc__}\n{describe_retry_policy()}\n",
    default_args={
        "owner": "loyalty-data",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=20),
        # What a retry can cure (auth and data errors fail at once, a spent rate limit waits a
        # window, transient API errors back off): include/tier_sync/retry_rules.py.
        "retry_policy": tier_sync_retry_policy(),
        # One alert per run: each task only journals its state and reason (run_alerts.py); the
        # run_outcome watcher sends the run's one alert, or "recovered" after a failed run.
        **journal_callbacks(),
    },
    params={
        "dry_run": Param(
            False, type="boolean", title="Dry run",
            description="Plan and log the group moves, but write nothing to Lightspeed (the CSV is still computed).",
        ),
        "full_refresh": Param(
            False, type="boolean", title="Full refresh",
            description="Rebuild the order store from the full Lightspeed history instead of reading only what changed.",
        ),
        # Safety overrides: a section of their own, each with its warning.
        "allow_mass_change": Param(
            False, type="boolean", title="Allow mass change (skip the approval)", section=SAFETY_SECTION,
            description=(
                "WARNING: writes a plan that moves an unusually large share of customers (or many downgrades) "
                "without asking anyone. Unset, such a run waits for a person under Required actions."
            ),
        ),
        "limit": Param(
            None, type=["null", "integer"], minimum=0, title="Limit", section=SAFETY_SECTION,
            description="WARNING: only the first N planned moves are written; the rest wait for a later run (empty: all).",
        ),
        "force_resync": Param(
            False, type="boolean", title="Force resync", section=SAFETY_SECTION,
            description=(
                "WARNING: re-asserts the group of every managed customer, not only those whose tier changed "
                "(one membership write per customer, and any manual group change in the POS is undone)."
            ),
        ),
    },
    render_template_as_native_obj=False,
)
def customer_tier_sync() -> None:
    # Each task body is one call into include/tier_sync/tasks.py (imported inside the task, so
    # parsing this file never imports pandas, GX or git).

    # one writer of the order store at a time, backfills included
    @task(max_active_tis_per_dag=1, execution_timeout=TIMEOUTS["extract_orders"])
    def extract_orders() -> dict[str, Any]:
        """Pull the sales and customer change feeds into the order store."""
        from include.tier_sync.tasks import extract_task

        return extract_task(get_current_context())

    @task(execution_timeout=TIMEOUTS["compute_tiers"])
    def compute_tiers(extracted: Any) -> dict[str, Any]:
        """CLV and tier of every customer as of the end of the data interval."""
        from include.tier_sync.tasks import compute_task

        return compute_task(get_current_context())

    @task(retries=0, execution_timeout=TIMEOUTS["validate_tiers"])
    def validate_tiers(computed: Any) -> dict[str, Any]:
        """Great Expectations gate: a failure fails at once (no retry) and blocks commit and sync."""
        from include.tier_sync.tasks import validate_task

        return validate_task(get_current_context())

    # One publisher at a time across runs (back-fills included): tier_history.csv and the stable
    # "latest" copies are read-modify-written. The ledger's lock file guards a local data dir too.
    @task(max_active_tis_per_dag=1, execution_timeout=TIMEOUTS["publish_run"])
    def publish_run(computed: Any, validated: Any) -> dict[str, Any]:
        """Publish the validated run: tier history, and for the latest run the stable master."""
        from include.tier_sync.tasks import publish_task

        return publish_task(get_current_context(), computed)

    @task(outlets=[MASTER_CSV_ASSET], max_active_tis_per_dag=1, execution_timeout=TIMEOUTS["commit_csv"])
    def commit_csv(computed: Any, published: Any) -> dict[str, Any]:
        """Commit the validated master CSV (and tier history) to the git remote."""
        from include.tier_sync.tasks import commit_task

        return commit_task(get_current_context(), computed)

    @task(execution_timeout=TIMEOUTS["plan_sync"])
    def plan_sync(committed: Any) -> list[dict[str, Any]]:
        """Decide who moves where; write batch files; return small batch references to map over."""
        from include.tier_sync.tasks import plan_sync_task

        return plan_sync_task(get_current_context())

    @task(
        pool=settings.SYNC_POOL,
        retries=3,
        retry_delay=timedelta(seconds=30),
        map_index_template="{{ batch_label }}",
        execution_timeout=TIMEOUTS["sync_batch"],  # per batch
    )
    def sync_batch(ref: dict[str, Any]) -> dict[str, Any]:
        """Move one batch of customers (idempotent: re-checks live groups before writing)."""
        from include.tier_sync.tasks import sync_batch_task

        context = get_current_context()
        context["batch_label"] = ref.get("batch") or f"{ref.get('tier')} ({ref.get('size')})"  # type: ignore[typeddict-unknown-key]
        return sync_batch_task(context, ref)

    @task(trigger_rule=TriggerRule.ALL_DONE, execution_timeout=TIMEOUTS["verify_group_counts"])
    def verify_group_counts(results: Any) -> dict[str, Any]:
        """Compare each tier group's members in Lightspeed with the master CSV."""
        from include.tier_sync.tasks import verify_group_counts_task

        return verify_group_counts_task(get_current_context())

    @task(execution_timeout=TIMEOUTS["plan_progress"])
    def plan_progress(checked: Any) -> list[dict[str, Any]]:
        """Progress at the till (opt-in, tier_sync_progress_field): whose text changed; skipped when off."""
        from include.tier_sync.tasks import plan_progress_task

        return plan_progress_task(get_current_context())

    @task(pool=settings.SYNC_POOL, retries=3, retry_delay=timedelta(seconds=30),
          map_index_template="{{ batch_label }}", execution_timeout=TIMEOUTS["progress_batch"])
    def progress_batch(ref: dict[str, Any]) -> dict[str, Any]:
        """Write one batch of progress texts (idempotent: re-reads each customer before writing)."""
        from include.tier_sync.tasks import progress_batch_task

        context = get_current_context()
        context["batch_label"] = ref.get("batch") or f"progress ({ref.get('size')})"  # type: ignore[typeddict-unknown-key]
        return progress_batch_task(context, ref)

    @task(trigger_rule=TriggerRule.ALL_DONE, execution_timeout=TIMEOUTS["write_sync_log"])
    def write_sync_log(group_check: Any) -> dict[str, Any]:
        """Aggregate every batch into tier_sync_log.json; fail the run if any customer failed."""
        from include.tier_sync.tasks import write_sync_log_task

        return write_sync_log_task(get_current_context())

    # After the log, whatever happened before (all_done); one at a time across runs and back-fills.
    @task(trigger_rule=TriggerRule.ALL_DONE, max_active_tis_per_dag=1, execution_timeout=TIMEOUTS["prune_runs"])
    def prune_runs(logged: Any) -> dict[str, Any]:
        """Remove run folders older than tier_sync_retention_days (their counts are kept)."""
        from include.tier_sync.tasks import prune_runs_task

        return prune_runs_task(get_current_context())

    # Last, whatever happened (all_done), one at a time across runs (it keeps the recovery state).
    @task(
        trigger_rule=TriggerRule.ALL_DONE,
        retries=0,
        max_active_tis_per_dag=1,
        on_failure_callback=None,
        execution_timeout=TIMEOUTS["run_outcome"],
    )
    def run_outcome() -> dict[str, Any]:
        """Send the run's one alert and fail the run when any task failed; "recovered" after a failed run.

        write_sync_log runs whatever happened (all_done) so the log is always written; without this
        watcher that successful leaf would mark a run with a failed validation or sync as a success.
        Tasks only journal their failures, so a Lightspeed outage failing 200 batches sends one mail.
        """
        from include.tier_sync.run_alerts import run_outcome as watch

        return watch(get_current_context())

    # Asks a person only when the circuit breaker stopped plan_sync (dry runs and allow_mass_change
    # never ask); its return value is the batch refs to sync (include/tier_sync/approval.py).
    approve_sync = SyncApprovalOperator(
        task_id="approve_sync",
        retries=0,  # a refusal or a timeout is the answer; a retry would ask again
        execution_timeout=TIMEOUTS["approve_sync"],  # each execution phase; the wait is the response timeout
    )

    extracted = extract_orders()
    computed = compute_tiers(extracted)
    validated = validate_tiers(computed)
    published = publish_run(computed, validated)
    committed = commit_csv(computed, published)
    refs = plan_sync(committed)
    refs >> approve_sync
    results = sync_batch.expand(ref=approve_sync.output)
    checked = verify_group_counts(results)
    to_write = plan_progress(checked)  # after the group sync, before the log
    texts = progress_batch.expand(ref=to_write)
    logged = write_sync_log(checked)
    texts >> logged
    pruned = prune_runs(logged)
    outcome = run_outcome()
    [extracted, computed, validated, published, committed, refs, approve_sync, results, checked, to_write, texts,
     logged, pruned] >> outcome


customer_tier_sync()
