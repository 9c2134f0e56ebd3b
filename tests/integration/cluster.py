"""A throw-away Airflow 3 deployment for integration tests: PostgreSQL + api-server + scheduler + dag-processor.

`airflow dags test` runs tasks in-process and ignores pools, backfills and executors; this harness
runs the real components as subprocesses, so a test sees what a deployment does::

    with AirflowCluster(tmp_path, env={"AIRFLOW_CONN_LIGHTSPEED_DEFAULT": ...}) as cluster:
        cluster.wait_for_dag("customer_tier_sync")
        cluster.unpause("customer_tier_sync")
        run_id = cluster.trigger("customer_tier_sync", conf={"allow_mass_change": True})
        run = cluster.wait_for_run("customer_tier_sync", run_id, timeout=300)
        tis = cluster.task_instances("customer_tier_sync", run_id)

What it does, in order (`start()`; `stop()` undoes all of it, also after a failed start):

1. creates a PostgreSQL database `tier_sync_it_<random>` (trust auth on 127.0.0.1:5432 by default,
   `TIER_SYNC_IT_PG_DSN` overrides the admin DSN) and a fresh `AIRFLOW_HOME` under `workdir`;
2. `airflow db migrate`, then loads `airflow_settings.yaml` through `python -m tools.load_settings`
   (pools and Variables, exactly as a local deployment does; placeholder connections skipped) and
   any extra `pools`;
3. starts each service (`airflow api-server` on a free port, `airflow scheduler`, `airflow
   dag-processor`, plus `extra_services`, e.g. a Celery worker) in its own process group, with
   stdout+stderr in `workdir/logs/<service>.log`, and waits until `/api/v2/monitor/health` reports
   the metadatabase, the scheduler and the dag processor healthy.

Every process gets an environment built from scratch for this cluster (no `AIRFLOW_*` variable of
the caller leaks in) plus `env` (connections and Variables as `AIRFLOW_CONN_*` / `AIRFLOW_VAR_*`).
Ports are free ones, so several clusters can run side by side. All waits are bounded and fail with
a `ClusterError` that quotes the tail of the relevant log.

Defaults that differ from a stock install, and why:

* `[scheduler] use_job_schedule = False` (pass `use_job_schedule=True` to change): only triggered
  and back-filled runs exist, so unpausing a DAG does not start a catch-up run for the latest
  interval behind the test's back.
* `[scheduler] task_instance_heartbeat_timeout = 30` s (default 300) and
  `orphaned_tasks_check_interval = 15` s (default 300): a task whose worker died is noticed within
  a test's time budget. When the scheduler itself dies with its LocalExecutor workers, only the
  orphan check recovers their task instances (the heartbeat check only looks at task instances
  queued by the *current* SchedulerJob): once the dead job's heartbeat is older than
  `scheduler_health_check_threshold` (30 s), running/restarting ones are reset for a new try.
* `[core] simple_auth_manager_all_admins = True`: the REST API needs no password (`api()` still
  sends a JWT from `GET /auth/token`, as a client of a real deployment would).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psutil
import psycopg2
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AIRFLOW = str(VENV_BIN / "airflow") if (VENV_BIN / "airflow").exists() else "airflow"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_PREFIX = "tier_sync_it_"
DEFAULT_SERVICES = ("api-server", "scheduler", "dag-processor")
FINAL_RUN_STATES = frozenset({"success", "failed"})

T = TypeVar("T")


class ClusterError(RuntimeError):
    """A cluster step failed or a bounded wait ran out; the message carries the relevant log tail."""


def admin_dsn() -> str:
    """The PostgreSQL DSN used to create and drop the per-run databases."""
    return os.environ.get("TIER_SYNC_IT_PG_DSN", DEFAULT_PG_DSN)


def postgres_unavailable_reason(dsn: str | None = None) -> str | None:
    """None when PostgreSQL accepts a connection (and CREATE DATABASE is allowed), else why not."""
    dsn = dsn or admin_dsn()
    try:
        conn = psycopg2.connect(dsn, connect_timeout=3)
    except psycopg2.Error as exc:
        return f"PostgreSQL is unreachable at {dsn}: {str(exc).strip()}"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
            row = cur.fetchone()
        if not row or not row[0]:
            return f"the PostgreSQL role of {dsn} may not create databases"
    finally:
        conn.close()
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a text file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _dsn_with_db(dsn: str, dbname: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{dbname}"


@dataclass(frozen=True)
class TaskInstanceRow:
    """One task instance try as the metadata DB holds it (the latest try per map index)."""

    task_id: str
    map_index: int
    state: str | None
    try_number: int
    start_date: datetime | None
    end_date: datetime | None
    rendered_map_index: str | None
    pool: str | None
    hostname: str | None
    pid: int | None


@dataclass(frozen=True)
class DagRunRow:
    run_id: str
    run_type: str
    state: str
    logical_date: datetime | None
    data_interval_start: datetime | None
    data_interval_end: datetime | None
    run_after: datetime | None
    start_date: datetime | None
    end_date: datetime | None
    conf: dict[str, Any] | None


# Airflow 3.3.2 race: an answer within about a second of a HITL task parking (AWAITING_INPUT)
# resumes it before the scheduler has processed the parked workload's executor event, which then
# reads as "finished while queued" and fails the task (no person answers that fast). Every test
# that answers approve_sync waits this long after seeing it park (seen on fresh clones in
# test_approval and test_make_up).
HITL_SETTLE_S = 5.0


def settle_before_answering() -> None:
    """Wait out the race above after a HITL task was seen awaiting input, before answering it."""
    time.sleep(HITL_SETTLE_S)


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 1.0,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll `condition` until it returns something other than None/False; ClusterError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            extra = diagnostics() if diagnostics else ""
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


class AirflowCluster:
    """A private Airflow deployment (see the module docstring). Use as a context manager.

    Parameters:
        workdir: an empty folder for AIRFLOW_HOME (`workdir/airflow`) and logs (`workdir/logs`).
        env: extra environment for every Airflow process (connections, Variables, config).
        executor: `[core] executor` (LocalExecutor by default; CeleryExecutor needs a broker in
            `env` and a worker in `extra_services`).
        extra_services: more long-running processes, name -> argv after `airflow`
            (e.g. `{"celery-worker": ["celery", "worker", "--concurrency", "4"]}`).
        service_env: per-service environment on top of `env` (e.g. a worker's own AIRFLOW_HOME,
            to stand for a second host that shares nothing on disk with the first).
        pools: pools to set after loading the settings file (name -> slots).
        settings_file: the Astro `airflow_settings.yaml` to load (None: skip).
        use_job_schedule: see the module docstring.
        pg_dsn: admin DSN of the PostgreSQL server (default: `admin_dsn()`).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        executor: str = "LocalExecutor",
        extra_services: Mapping[str, Sequence[str]] | None = None,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        pools: Mapping[str, int] | None = None,
        settings_file: Path | None = REPO_ROOT / "airflow_settings.yaml",
        use_job_schedule: bool = False,
        pg_dsn: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.home = self.workdir / "airflow"
        self.logs = self.workdir / "logs"
        self.executor = executor
        self.extra_services = {k: list(v) for k, v in (extra_services or {}).items()}
        self.service_env = {k: dict(v) for k, v in (service_env or {}).items()}
        self.pools = dict(pools or {})
        self.settings_file = settings_file
        self.pg_admin_dsn = pg_dsn or admin_dsn()
        self.db_name = DB_PREFIX + secrets.token_hex(6)
        self.db_dsn = _dsn_with_db(self.pg_admin_dsn, self.db_name)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._db_created = False
        self._token: str | None = None
        self._extra_env = dict(env or {})
        sa_url = "postgresql+psycopg2://" + self.db_dsn.split("://", 1)[1]
        self._base_env: dict[str, str] = {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sa_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(use_job_schedule),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        }

    # ---------------------------------------------------------------------------------- env

    @property
    def env(self) -> dict[str, str]:
        """The environment every Airflow process of this cluster gets."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env.update(self._base_env)
        env.update(self._extra_env)
        return env

    def set_env(self, env: Mapping[str, str], *, restart: Iterable[str] = ()) -> None:
        """Change the extra environment; restart the named services so they see it."""
        self._extra_env.update(env)
        for name in restart:
            self.restart_service(name)

    # ---------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> AirflowCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, *, health_timeout: float = 180) -> None:
        atexit.register(self.stop)  # a safety net if the caller never reaches stop()
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._create_database()
        self.airflow("db", "migrate", timeout=300, log_name="db-migrate")
        if self.settings_file is not None:
            self.run_logged(
                [sys.executable, "-m", "tools.load_settings", str(self.settings_file), "--skip-placeholder-connections"],
                timeout=180,
                log_name="load-settings",
            )
        for name, slots in self.pools.items():
            self.airflow("pools", "set", name, str(slots), f"{name} (integration test)", log_name=f"pool-{name}")
        for name in self.services:
            self.start_service(name)
        self.wait_healthy(timeout=health_timeout)

    def stop(self) -> None:
        """Stop every process this cluster started (TERM, then KILL), then drop the database."""
        for name in list(self.procs):
            self.stop_service(name)
        self._drop_database()
        atexit.unregister(self.stop)

    @property
    def services(self) -> list[str]:
        return [*DEFAULT_SERVICES, *self.extra_services]

    def _argv(self, name: str) -> list[str]:
        if name == "api-server":
            return [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        if name == "scheduler":
            return [AIRFLOW, "scheduler", "--skip-serve-logs"]
        if name == "dag-processor":
            return [AIRFLOW, "dag-processor"]
        if name in self.extra_services:
            return [AIRFLOW, *self.extra_services[name]]
        raise ValueError(f"unknown service {name!r}")

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        """Start one service in its own process group; output appended to logs/<name>.log."""
        if name in self.procs and self.procs[name].poll() is None:
            raise ClusterError(f"{name} is already running")
        with self.log_path(name).open("ab") as log:
            log.write(f"\n===== starting {name} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self._argv(name),
                cwd=REPO_ROOT,
                env={**self.env, **self.service_env.get(name, {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def service_tree(self, name: str) -> list[psutil.Process]:
        """The service's process and every descendant (task supervisors and tasks run in their own groups)."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return []
        try:
            root = psutil.Process(proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_service(self, name: str) -> list[int]:
        """SIGKILL the service and all its descendants at once (a machine dying); returns the pids."""
        tree = self.service_tree(name)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=10)
        proc = self.procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        return [p.pid for p in tree]

    def stop_service(self, name: str, *, timeout: float = 20) -> None:
        """SIGTERM the service's process group (and stray descendants), SIGKILL what is left."""
        proc = self.procs.get(name)
        if proc is None:
            return
        tree = self.service_tree(name)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        for p in tree:  # descendants in other process groups (task supervisors use setpgid)
            try:
                if p.is_running():
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self.procs.pop(name, None)

    def restart_service(self, name: str) -> None:
        self.stop_service(name)
        self.start_service(name)

    # ------------------------------------------------------------------------------ database

    def _admin_conn(self) -> Any:
        conn = psycopg2.connect(self.pg_admin_dsn, connect_timeout=5)
        conn.autocommit = True
        return conn

    def _create_database(self) -> None:
        conn = self._admin_conn()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.db_name}"')
            self._db_created = True
        finally:
            conn.close()

    def _drop_database(self) -> None:
        if not self._db_created:
            return
        conn = self._admin_conn()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            self._db_created = False
        finally:
            conn.close()

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a read query against this cluster's metadata DB."""
        conn = psycopg2.connect(self.db_dsn, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    # ---------------------------------------------------------------------------------- CLI

    def run_logged(self, argv: Sequence[str], *, timeout: float = 120, log_name: str, check: bool = True) -> str:
        """Run a one-shot command with the cluster env; output to logs/<log_name>.log and returned."""
        path = self.logs / f"{log_name}.log"
        try:
            done = subprocess.run(
                list(argv), cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else str(exc.output or "")
            path.write_text(out)
            raise ClusterError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s\n{tail(path)}") from exc
        out = done.stdout.decode(errors="replace")
        with path.open("a") as fh:
            fh.write(f"$ {' '.join(argv)}\n{out}\n[exit {done.returncode}]\n")
        if check and done.returncode != 0:
            raise ClusterError(f"`{' '.join(argv)}` exited {done.returncode}\n{tail(path)}")
        return out

    def airflow(self, *args: str, timeout: float = 120, log_name: str = "cli", check: bool = True) -> str:
        """`airflow <args>` with this cluster's environment; returns its output."""
        return self.run_logged([AIRFLOW, *args], timeout=timeout, log_name=log_name, check=check)

    # ---------------------------------------------------------------------------------- REST

    def token(self) -> str:
        """A JWT for the public API (SimpleAuthManager, all admins: `GET /auth/token`)."""
        if self._token is None:
            resp = requests.get(f"{self.api_url}/auth/token", timeout=10)
            resp.raise_for_status()
            self._token = str(resp.json()["access_token"])
        return self._token

    def api(self, method: str, path: str, *, json_body: Any = None, ok: Iterable[int] = (200, 201, 204)) -> Any:
        """Call `/api/v2<path>`; returns the decoded JSON (None for an empty body)."""
        resp = requests.request(
            method, f"{self.api_url}/api/v2{path}", json=json_body, timeout=30,
            headers={"Authorization": f"Bearer {self.token()}"},
        )
        if resp.status_code not in set(ok):
            raise ClusterError(f"{method} {path} -> {resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content else None

    def health(self) -> dict[str, Any] | None:
        try:
            resp = requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=5)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    def wait_healthy(self, *, timeout: float = 180, components: Sequence[str] = ("metadatabase", "scheduler", "dag_processor")) -> None:
        def ok() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode} during start-up\n{tail(self.log_path(name))}")
            h = self.health()
            if not h:
                return False
            return all((h.get(c) or {}).get("status") == "healthy" for c in components)

        wait_until(ok, timeout=timeout, what=f"a healthy cluster ({', '.join(components)})", interval=2,
                   diagnostics=lambda: f"health: {self.health()}\n" + self.log_tails())

    def log_tails(self, names: Iterable[str] | None = None, lines: int = 25) -> str:
        names = list(names) if names is not None else list(self.services)
        return "\n".join(f"--- {n} log (tail) ---\n{tail(self.log_path(n), lines)}" for n in names)

    # ------------------------------------------------------------------------------ DAG runs

    def wait_for_dag(self, dag_id: str, *, timeout: float = 120) -> None:
        """Until the dag-processor has serialised `dag_id` (and reported no import error for it)."""

        def parsed() -> bool:
            errors = self.sql("SELECT filename, stacktrace FROM import_error")
            if errors:
                raise ClusterError(f"DAG import errors: {errors}")
            return bool(self.sql("SELECT 1 FROM serialized_dag WHERE dag_id = %s", (dag_id,)))

        wait_until(parsed, timeout=timeout, what=f"DAG {dag_id} to be parsed", interval=1,
                   diagnostics=lambda: self.log_tails(["dag-processor"]))

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", json_body={"is_paused": False})

    def pause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", json_body={"is_paused": True})

    def trigger(self, dag_id: str, *, conf: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """A manual run (no logical date, as a UI/REST trigger makes it); returns its run_id."""
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        return str(self.api("POST", f"/dags/{dag_id}/dagRuns", json_body=body)["dag_run_id"])

    def dag_runs(self, dag_id: str) -> list[DagRunRow]:
        rows = self.sql(
            "SELECT run_id, run_type, state, logical_date, data_interval_start, data_interval_end, run_after,"
            " start_date, end_date, conf FROM dag_run WHERE dag_id = %s ORDER BY run_after, id",
            (dag_id,),
        )
        return [DagRunRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], _json(r[9])) for r in rows]

    def dag_run(self, dag_id: str, run_id: str) -> DagRunRow:
        for run in self.dag_runs(dag_id):
            if run.run_id == run_id:
                return run
        raise ClusterError(f"no run {run_id} of {dag_id}")

    def task_instances(self, dag_id: str, run_id: str | None = None) -> list[TaskInstanceRow]:
        query = (
            "SELECT task_id, map_index, state, try_number, start_date, end_date, rendered_map_index, pool,"
            " hostname, pid FROM task_instance WHERE dag_id = %s"
        )
        params: list[Any] = [dag_id]
        if run_id is not None:
            query += " AND run_id = %s"
            params.append(run_id)
        rows = self.sql(query + " ORDER BY start_date NULLS LAST, task_id, map_index", params)
        return [TaskInstanceRow(*r) for r in rows]

    def task_instance_tries(self, dag_id: str, run_id: str) -> list[TaskInstanceRow]:
        """Every finished earlier try (task_instance_history) plus the current ones."""
        rows = self.sql(
            "SELECT task_id, map_index, state, try_number, start_date, end_date, rendered_map_index, pool,"
            " hostname, pid FROM task_instance_history WHERE dag_id = %s AND run_id = %s",
            (dag_id, run_id),
        )
        return [TaskInstanceRow(*r) for r in rows] + self.task_instances(dag_id, run_id)

    def describe_run(self, dag_id: str, run_id: str) -> str:
        lines = [f"run {run_id}:"]
        for ti in self.task_instances(dag_id, run_id):
            lines.append(f"  {ti.task_id}[{ti.map_index}] {ti.state} try={ti.try_number} {ti.start_date} -> {ti.end_date}")
        return "\n".join(lines)

    def wait_for_run(
        self, dag_id: str, run_id: str, *, timeout: float = 300, states: Iterable[str] = FINAL_RUN_STATES
    ) -> DagRunRow:
        """Until the run reaches one of `states`; a ClusterError with TI states and log tails otherwise."""
        wanted = set(states)

        def done() -> DagRunRow | None:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} died (exit {proc.returncode}) while waiting for {run_id}\n"
                                       f"{tail(self.log_path(name))}")
            run = self.dag_run(dag_id, run_id)
            return run if run.state in wanted else None

        return wait_until(
            done, timeout=timeout, what=f"run {run_id} of {dag_id} to reach {sorted(wanted)}", interval=2,
            diagnostics=lambda: self.describe_run(dag_id, run_id) + "\n" + self.log_tails(["scheduler"]),
        )

    def task_log(self, dag_id: str, run_id: str, task_id: str, *, map_index: int = -1, try_number: int | None = None) -> str:
        """The text of a task's log file(s) under AIRFLOW_HOME/logs (all tries unless `try_number`)."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        pattern = f"attempt={try_number}.log" if try_number else "attempt=*.log"
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob(pattern)))


def _json(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode()
    try:
        out = json.loads(value)
    except (TypeError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def max_overlap(intervals: Iterable[tuple[datetime, datetime]]) -> int:
    """The largest number of [start, end) intervals that overlap at one instant."""
    events: list[tuple[datetime, int]] = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end at t frees its slot before a start at t
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best
