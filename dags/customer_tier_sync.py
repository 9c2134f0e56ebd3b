"""
### Customer tier sync

Every day at 02:00 UTC this DAG runs the retailer's loyalty program:

1. **extract_orders**: pulls what changed in Lightspeed X-Series (sales and customers, by version
   cursor) into the order store under the `tier_sync_data_dir` Variable.
2. **compute_tiers**: recomputes every customer's lifetime value and loyalty tier *as of the end of
   the run's data interval* and writes `customer_analytics_master.csv`.
3. **validate_tiers**: Great Expectations checks; a failure stops the run before anything is
   committed or sent to the till, and alerts.
4. **commit_csv**: commits the master CSV to the `tier_sync_git_remote` repository.
5. **plan_sync** / **sync_batch** (mapped, pool `lightspeed_api`): moves customers whose tier
   changed into the matching Lightspeed customer group. Staff, Wholesale and other non-tier groups
   are never touched.
6. **verify_group_counts** / **write_sync_log**: checks the groups against the CSV and writes
   `tier_sync_log.json` (also this task's XCom).

Trigger options: `dry_run` (plan and log only), `full_refresh` (rebuild the order store),
`force_resync` (re-assert every managed customer's group), `limit` (first N moves only),
`allow_mass_change` (override the circuit breaker). Back-filled and superseded runs compute and log
but never write to the POS. See the project README for operating notes.
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
from airflow.sdk.exceptions import AirflowFailException

from include.tier_sync import settings
from include.tier_sync.alerts import TierSyncNotifier
from include.tier_sync.artifacts import MASTER_CSV_ASSET
from include.tier_sync.runtime import RunPaths, resolve_as_of, run_identity

DAG_ID = "customer_tier_sync"


def _paths() -> RunPaths:
    """The current run's file locations (as_of from the task context)."""
    return RunPaths(settings.data_dir(), resolve_as_of(get_current_context()))


def _identity() -> dict[str, Any]:
    return run_identity(get_current_context())


@dag(
    dag_id=DAG_ID,
    # CronDataIntervalTimetable gives each run a real [D-1 02:00, D 02:00) interval; Airflow 3's
    # default cron timetable would give zero-width intervals (see docs/airflow-3-notes.md §A1).
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["loyalty", "lightspeed", "customer-tiers"],
    doc_md=__doc__,
    default_args={
        "owner": "loyalty-data",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=20),
        "on_failure_callback": [TierSyncNotifier()],
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
        "force_resync": Param(
            False, type="boolean", title="Force resync",
            description="Re-assert the group of every managed customer, not only those whose tier changed.",
        ),
        "limit": Param(
            None, type=["null", "integer"], minimum=0, title="Limit",
            description="Only the first N planned moves (empty: all).",
        ),
        "allow_mass_change": Param(
            False, type="boolean", title="Allow mass change",
            description="Override the circuit breaker that stops a run planning to move an unusually large share of customers.",
        ),
    },
    render_template_as_native_obj=False,
)
def customer_tier_sync() -> None:
    @task
    def extract_orders(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Pull the sales and customer change feeds into the order store."""
        from include.tier_sync.extract import extract_orders as run_extract
        from include.tier_sync.lightspeed import LightspeedClient
        from include.tier_sync.store import OrderStore

        client = LightspeedClient.from_connection(settings.LIGHTSPEED_CONN_ID)
        store = OrderStore(_paths().store)
        return run_extract(client, store, full_refresh=bool((params or {}).get("full_refresh")))

    @task
    def compute_tiers(extracted: dict[str, Any]) -> dict[str, Any]:
        """CLV and tier of every customer as of the end of the data interval."""
        from include.tier_sync.master_csv import compute_tiers as run_compute
        from include.tier_sync.store import OrderStore

        paths = _paths()
        return run_compute(OrderStore(paths.store), paths, _identity(), settings.load_tier_rules())

    @task(retries=0)
    def validate_tiers(computed: dict[str, Any]) -> dict[str, Any]:
        """Great Expectations gate: a failure fails at once (no retry) and blocks commit and sync."""
        from include.tier_sync.validation import DataQualityError, validate_master

        try:
            return validate_master(_paths(), settings.load_tier_rules())
        except DataQualityError as exc:
            raise AirflowFailException(str(exc)) from exc

    @task(outlets=[MASTER_CSV_ASSET])
    def commit_csv(computed: dict[str, Any], validated: dict[str, Any]) -> dict[str, Any]:
        """Commit the validated master CSV (and tier history) to the git remote."""
        from include.tier_sync.git_export import commit_master

        paths = _paths()
        result = commit_master(
            paths,
            _identity(),
            computed,
            remote=settings.git_remote(),
            branch=settings.git_branch(),
            conn_id=settings.GIT_CONN_ID,
        )
        get_current_context()["outlet_events"][MASTER_CSV_ASSET].extra = {
            "path": paths.master_csv,
            "run_path": paths.run_master_csv,
            "as_of": computed.get("as_of"),
            "commit": result.get("commit"),
        }
        return result

    @task
    def plan_sync(committed: dict[str, Any], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Decide who moves where; write batch files; return small batch references to map over."""
        from include.tier_sync.tasks import plan_sync_task

        return plan_sync_task(get_current_context(), params or {})

    @task(
        pool=settings.SYNC_POOL,
        retries=3,
        retry_delay=timedelta(seconds=30),
        map_index_template="{{ batch_label }}",
    )
    def sync_batch(ref: dict[str, Any]) -> dict[str, Any]:
        """Move one batch of customers (idempotent: re-checks live groups before writing)."""
        from include.tier_sync.tasks import sync_batch_task

        context = get_current_context()
        context["batch_label"] = f"{ref.get('tier')} x{ref.get('size')}"  # type: ignore[typeddict-unknown-key]
        return sync_batch_task(context, ref)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def verify_group_counts(results: Any) -> dict[str, Any]:
        """Compare each tier group's members in Lightspeed with the master CSV."""
        from include.tier_sync.tasks import verify_group_counts_task

        return verify_group_counts_task(get_current_context())

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def write_sync_log(group_check: Any) -> dict[str, Any]:
        """Aggregate every batch into tier_sync_log.json; fail the run if any customer failed."""
        from include.tier_sync.tasks import write_sync_log_task

        return write_sync_log_task(get_current_context())

    extracted = extract_orders()
    computed = compute_tiers(extracted)
    validated = validate_tiers(computed)
    committed = commit_csv(computed, validated)
    refs = plan_sync(committed)
    results = sync_batch.expand(ref=refs)
    checked = verify_group_counts(results)
    write_sync_log(checked)


customer_tier_sync()
