"""DAG integrity: imports cleanly, parses without touching connections/variables/DB, and is shaped
as the operators expect (schedule with real data intervals, retries, pool, trigger rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO_ROOT / "dags"
DAG_ID = "customer_tier_sync"

pytestmark = pytest.mark.unit


def _declared_pools() -> set[str]:
    settings = yaml.safe_load((REPO_ROOT / "airflow_settings.yaml").read_text())
    return {p["pool_name"] for p in settings["airflow"]["pools"]}


@pytest.fixture(scope="module")
def dagbag():  # type: ignore[no-untyped-def]
    """Parse dags/ with every way of reaching a connection or Variable patched to a spy."""
    from airflow.models import DagBag

    spies = {
        "sdk_conn": mock.patch("airflow.sdk.BaseHook.get_connection"),
        "sdk_var": mock.patch("airflow.sdk.Variable.get"),
        "models_var": mock.patch("airflow.models.Variable.get"),
    }
    started = {name: patcher.start() for name, patcher in spies.items()}
    try:
        bag = DagBag(dag_folder=str(DAGS_DIR), known_pools=_declared_pools() | {"default_pool"})
    finally:
        for patcher in spies.values():
            patcher.stop()
    bag.parse_spies = started  # type: ignore[attr-defined]
    return bag


def test_no_import_errors(dagbag) -> None:  # type: ignore[no-untyped-def]
    assert dagbag.import_errors == {}
    assert DAG_ID in dagbag.dags


def test_parse_touches_no_connection_or_variable(dagbag) -> None:  # type: ignore[no-untyped-def]
    for name, spy in dagbag.parse_spies.items():
        assert spy.call_count == 0, f"{name} called at parse time"


def test_pools_are_declared(dagbag) -> None:  # type: ignore[no-untyped-def]
    assert [w.message for w in dagbag.dag_warnings] == []
    dag = dagbag.dags[DAG_ID]
    assert dag.get_task("sync_batch").pool == "lightspeed_api"
    assert dag.get_task("progress_batch").pool == "lightspeed_api"  # the same slots as the group sync
    assert "lightspeed_api" in _declared_pools()


def test_schedule_has_real_data_intervals(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags[DAG_ID]
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == "0 2 * * *"
    assert str(dag.timetable.timezone) in {"UTC", "Timezone('UTC')"}
    assert dag.catchup is False
    assert dag.max_active_runs == 1


def test_tags_owner_retries_doc(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags[DAG_ID]
    assert {"loyalty", "lightspeed"} <= set(dag.tags)
    assert dag.doc_md and "Customer tier sync" in dag.doc_md
    for t in dag.tasks:
        assert t.owner == "loyalty-data"
        if t.task_id not in {"validate_tiers", "run_outcome", "approve_sync"}:
            assert t.retries >= 2, t.task_id
    # A data-quality failure must not be retried: it would only re-fail and delay the alert.
    assert dag.get_task("validate_tiers").retries == 0
    # A refused or unanswered approval is the answer: a retry would ask again.
    assert dag.get_task("approve_sync").retries == 0


def test_every_task_and_the_run_are_time_bounded(dagbag) -> None:  # type: ignore[no-untyped-def]
    """A hung task must fail on its own timeout, a stuck run on dagrun_timeout (max_active_runs=1:
    otherwise one hang blocks every later day)."""
    from include.tier_sync import settings

    dag = dagbag.dags[DAG_ID]
    assert dag.dagrun_timeout == timedelta(hours=20)  # 6 h of work + the 12 h an approval may wait
    assert {t.task_id for t in dag.tasks} == set(settings.TASK_TIMEOUT_MINUTES)
    for t in dag.tasks:
        assert t.execution_timeout == timedelta(minutes=settings.TASK_TIMEOUT_MINUTES[t.task_id]), t.task_id
    assert dag.get_task("extract_orders").execution_timeout == timedelta(minutes=60)
    assert dag.get_task("sync_batch").execution_timeout == timedelta(minutes=30)  # per mapped batch
    assert max(t.execution_timeout for t in dag.tasks) < dag.dagrun_timeout


def _parse_with_env(monkeypatch: pytest.MonkeyPatch, **env: str):  # type: ignore[no-untyped-def]
    """A fresh parse of the DAG file (a new DagBag re-imports it) with `env` set."""
    from airflow.models import DagBag

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return DagBag(
        dag_folder=str(DAGS_DIR / "customer_tier_sync.py"),
        known_pools=_declared_pools() | {"default_pool"},
    )


def test_timeouts_follow_the_environment_at_parse_time(monkeypatch: pytest.MonkeyPatch) -> None:
    bag = _parse_with_env(
        monkeypatch,
        TIER_SYNC_TASK_TIMEOUT_MINUTES="extract_orders=90, sync_batch=45",
        TIER_SYNC_DAGRUN_TIMEOUT_HOURS="8",
    )
    assert bag.import_errors == {}
    dag = bag.dags[DAG_ID]
    assert dag.get_task("extract_orders").execution_timeout == timedelta(minutes=90)
    assert dag.get_task("sync_batch").execution_timeout == timedelta(minutes=45)
    assert dag.get_task("compute_tiers").execution_timeout == timedelta(minutes=30)  # default kept
    assert dag.dagrun_timeout == timedelta(hours=8)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIER_SYNC_DAGRUN_TIMEOUT_HOURS", "soon"),
        ("TIER_SYNC_DAGRUN_TIMEOUT_HOURS", "0.5"),  # shorter than extract_orders' 60 minutes
        ("TIER_SYNC_TASK_TIMEOUT_MINUTES", "extract=5"),
        ("TIER_SYNC_TASK_TIMEOUT_MINUTES", "sync_batch=0"),
    ],
)
def test_a_bad_timeout_setting_fails_the_parse_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    bag = _parse_with_env(monkeypatch, **{name: value})
    assert DAG_ID not in bag.dags
    errors = "\n".join(str(e) for e in bag.import_errors.values())
    assert name in errors, errors


def test_pipeline_shape(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags[DAG_ID]
    edges = sorted((up, t.task_id) for t in dag.tasks for up in t.upstream_task_ids)
    assert edges == sorted(
        [
            ("extract_orders", "compute_tiers"),
            ("compute_tiers", "validate_tiers"),
            ("compute_tiers", "commit_csv"),
            ("validate_tiers", "publish_run"),
            ("compute_tiers", "publish_run"),
            ("publish_run", "commit_csv"),
            ("commit_csv", "plan_sync"),
            ("plan_sync", "approve_sync"),
            ("approve_sync", "sync_batch"),
            ("sync_batch", "verify_group_counts"),
            ("verify_group_counts", "write_sync_log"),
            ("verify_group_counts", "plan_progress"),
            ("plan_progress", "progress_batch"),
            ("progress_batch", "write_sync_log"),
            ("write_sync_log", "prune_runs"),
        ]
        + [
            (t, "run_outcome")
            for t in ("extract_orders", "compute_tiers", "validate_tiers", "publish_run", "commit_csv", "plan_sync",
                      "approve_sync", "sync_batch", "verify_group_counts", "plan_progress", "progress_batch",
                      "write_sync_log", "prune_runs")
        ]
    )
    # A failed task must fail the run even though the all_done log task after it succeeds; the
    # watcher runs after everything (all_done) so its one alert names every failed task.
    assert dag.get_task("run_outcome").trigger_rule == "all_done"
    assert [t.task_id for t in dag.tasks if not t.downstream_task_ids] == ["run_outcome"]
    # The log must be written when nothing is synced (mapped task skipped) and when batches failed.
    assert dag.get_task("write_sync_log").trigger_rule == "all_done"
    assert dag.get_task("verify_group_counts").trigger_rule == "all_done"
    # Retention runs whatever happened before it, one instance at a time across runs and back-fills.
    assert dag.get_task("prune_runs").trigger_rule == "all_done"
    assert dag.get_task("prune_runs").max_active_tis_per_dag == 1


def test_trigger_form_params(dagbag) -> None:  # type: ignore[no-untyped-def]
    params = dagbag.dags[DAG_ID].params
    for name in ("dry_run", "full_refresh", "force_resync", "limit", "allow_mass_change"):
        assert name in params, name
        assert params.get_param(name).description, name
    assert params["dry_run"] is False
    assert params["limit"] is None
    # The safety overrides sit in a section of their own, each with a warning; the rest do not.
    for name in ("allow_mass_change", "limit", "force_resync"):
        param = params.get_param(name)
        assert param.schema.get("section") == "Safety overrides", name
        assert param.description.startswith("WARNING:"), name
    for name in ("dry_run", "full_refresh"):
        assert "section" not in params.get_param(name).schema, name


def test_parse_imports_no_heavy_modules() -> None:
    """pandas, GX, git and pyarrow stay out of DAG parsing (fresh interpreter, real import)."""
    code = (
        "import sys, json, importlib.util;"
        f"spec = importlib.util.spec_from_file_location('d', {str(DAGS_DIR / 'customer_tier_sync.py')!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "heavy = ['pandas', 'great_expectations', 'git', 'pyarrow', 'requests_mock'];"
        "print(json.dumps([h for h in heavy if h in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
