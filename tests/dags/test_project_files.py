"""The deployment files say what the tests prove: compose topology, image, local settings."""

from __future__ import annotations

import re
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
    # A production auth manager (users and roles in the DB), never SimpleAuthManager's password file.
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
    init = compose["services"]["airflow-init"]["environment"]
    assert init["_AIRFLOW_WWW_USER_CREATE"] == "true" and init["_AIRFLOW_DB_MIGRATE"] == "true"
    mounts = {m.rsplit(":", 2)[1] if m.endswith(":ro") else m.rsplit(":", 1)[1] for m in worker["volumes"]}
    # The code is the image's, not a bind mount of whatever checkout the host has.
    assert not {"/opt/airflow/dags", "/opt/airflow/include", "/opt/airflow/plugins"} & mounts
    # Every Airflow service is built from this project's image and shares the data volume.
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker"):
        service = compose["services"][name]
        assert service["build"] == "." and "tier-sync-data:/opt/airflow/data" in service["volumes"]


# The service keys this file may use (the Compose Specification's service properties it needs).
SERVICE_KEYS = {"image", "build", "environment", "volumes", "user", "depends_on", "command", "entrypoint",
                "ports", "expose", "healthcheck", "restart", "profiles"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def test_compose_file_is_structurally_valid(compose: dict) -> None:  # type: ignore[type-arg]
    """No Docker here (`docker compose config` is unavailable), so the checks it would make that
    matter for this file: known keys, dependencies on services that exist with valid conditions,
    named volumes declared, healthchecks with a test, interpolations well formed."""
    services = compose["services"]
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        assert "image" in service or "build" in service, name
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services and dep != name, (name, dep)
            assert spec["condition"] in CONDITIONS, (name, dep, spec)
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if not source.startswith(("$", ".", "/")):
                assert source in compose["volumes"], (name, source)
        if "healthcheck" in service:
            assert service["healthcheck"]["test"], name
        env = service.get("environment") or {}
        assert isinstance(env, dict) and all(isinstance(v, str) for v in env.values()), name
    text = (REPO / "docker-compose.yaml").read_text()
    for expr in re.findall(r"\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(?:(?::?-|:?\?)[^}]*)?", expr), expr


def test_image_holds_the_pinned_requirements_and_the_code() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM apache/airflow:3.3.2-python3.11" in dockerfile
    assert "-r /requirements.txt" in dockerfile
    assert "apt-get" not in dockerfile  # the official image already has git
    for folder in ("dags", "plugins", "include", "tools"):
        assert f"COPY --chown=airflow:0 {folder}/ /opt/airflow/{folder}/" in dockerfile
    assert "compileall" in dockerfile and "--compile" in dockerfile
    assert "apache-airflow==3.3.2\n" in (REPO / "requirements.txt").read_text()


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (REPO / name).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            package, _, version = line.partition("==")
            found[package.split("[")[0].lower()] = version
    return found


def test_the_image_gets_runtime_packages_only_at_the_development_versions() -> None:
    runtime, dev = pins("requirements.txt"), pins("requirements-dev.txt")
    tools = {"pytest", "pytest-timeout", "ruff", "mypy", "deptry", "moto", "aiosmtpd", "requests-mock"}
    assert not tools & set(runtime), sorted(tools & set(runtime))
    assert tools <= set(dev)
    assert {p: v for p, v in runtime.items() if dev.get(p) != v} == {}  # one set of versions
    assert runtime["apache-airflow"] == "3.3.2"
    # make install and the image install what their lists say.
    makefile, dockerfile = (REPO / "Makefile").read_text(), (REPO / "Dockerfile").read_text()
    assert "-r requirements-dev.txt" in makefile and "COPY --chown=airflow:0 requirements.txt" in dockerfile


def test_the_build_context_leaves_out_local_state_and_secrets() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".demo", ".env", "test-artifacts", "**/__pycache__"} <= ignored
    assert "!.env.example" in ignored


COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            pairs[name.strip()] = value
    return pairs


def test_every_variable_compose_reads_is_in_env_example() -> None:
    text = (REPO / "docker-compose.yaml").read_text()
    used = {m.group(1): m.group(2) for m in COMPOSE_VAR.finditer(text)}
    example = env_example()
    assert set(used) <= set(example), f"missing from .env.example: {sorted(set(used) - set(example))}"
    # Secrets have no default: compose stops with a message instead of running unencrypted.
    for name in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__BASE_URL",
                 "AIRFLOW__API__SECRET_KEY", "_AIRFLOW_WWW_USER_PASSWORD"):
        assert used[name] in (":?", "?"), name
        assert example[name] == "" or name == "AIRFLOW__API__BASE_URL"  # no sample secret to reuse
    assert example["AIRFLOW__API__BASE_URL"].startswith("http")


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
