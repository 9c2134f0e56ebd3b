"""The deployment files say what the tests prove: compose topology, image, local settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from tools.load_settings import convert

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_compose_has_the_official_airflow_3_services(compose: dict) -> None:  # type: ignore[type-arg]
    assert {
        "postgres",
        "redis",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-worker",
        "airflow-triggerer",
        "airflow-init",
    } <= set(compose["services"])
    assert compose["services"]["airflow-worker"]["command"] == "celery worker"
    assert compose["services"]["airflow-apiserver"]["command"] == "api-server"


def test_compose_runs_celery_on_postgres_and_redis_with_this_project(compose: dict) -> None:  # type: ignore[type-arg]
    worker = compose["services"]["airflow-worker"]
    env = worker["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["PYTHONPATH"] == "/opt/airflow"  # `include` importable in every container
    mounts = {m.rsplit(":", 2)[1] if m.endswith(":ro") else m.rsplit(":", 1)[1] for m in worker["volumes"]}
    assert {"/opt/airflow/dags", "/opt/airflow/include", "/opt/airflow/plugins"} <= mounts
    # Every Airflow service is built from this project's image and shares the data volume.
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker"):
        service = compose["services"][name]
        assert service["build"] == "." and "tier-sync-data:/opt/airflow/data" in service["volumes"]


def test_image_installs_the_pinned_requirements_and_git() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM apache/airflow:3.3.2-python3.11" in dockerfile
    assert "-r /requirements.txt" in dockerfile and "install -y --no-install-recommends git" in dockerfile
    assert "apache-airflow==3.3.2\n" in (REPO / "requirements.txt").read_text()


def test_airflow_settings_convert_to_airflow_import_formats() -> None:
    settings = yaml.safe_load((REPO / "airflow_settings.yaml").read_text())
    pools, variables, connections = convert(settings, skip_placeholders=False)
    assert pools["lightspeed_api"]["slots"] == 2
    assert {"tier_sync_data_dir", "tier_sync_git_remote", "tier_sync_git_branch", "tier_sync_rules"} <= set(variables)
    conn = connections["lightspeed_default"]
    assert conn["conn_type"] == "http" and conn["host"].endswith("/api/2.0")
    # A placeholder token is never loaded over a real one when asked to skip placeholders.
    _, _, kept = convert(settings, skip_placeholders=True)
    assert "lightspeed_default" not in kept


MAX_MODULE_LINES = 600  # "modules a reader can hold in mind": one job each, a few hundred lines


def test_no_module_in_include_is_too_long_to_hold_in_mind() -> None:
    too_long = {
        str(path.relative_to(REPO)): n
        for path in sorted((REPO / "include").rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"split these by job (over {MAX_MODULE_LINES} lines): {too_long}"


def test_ruff_keeps_the_complexity_rule_on() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]["lint"]
    assert "C90" in config["select"] and config["mccabe"]["max-complexity"] <= 15
