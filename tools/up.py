"""`make up` / `make down`: the embedded default, for clicking around in the Airflow UI.

`make up` starts, in the background, under `.demo/up/` (or `--state-dir`):

1. the Lightspeed simulator with the demo store (its live store is saved on exit and served again
   by the next `make up`, so the POS keeps what the pipeline wrote);
2. `airflow standalone` (scheduler, dag-processor, triggerer, api-server; LocalExecutor; SQLite
   metadata DB under `<state>/airflow`; SimpleAuthManager, which generates the admin password into
   `<state>/airflow/simple_auth_manager_passwords.json.generated`);

after loading `airflow_settings.yaml` (pool, Variables; connections unless their password is a
placeholder) and pointing the `lightspeed_default` connection at the simulator, with the extras of
`airflow_settings.yaml`. It then unpauses the DAG, prints the UI address and the login, and returns.

The store's first sync: on a fresh install the scheduler starts the first scheduled run as soon as
the DAG is unpaused, and that sync moves most customers at once, which the circuit breaker stops
on purpose. The run does not fail: it waits in the `approve_sync` task for a person, under
"Required actions" in the UI (apply all, apply upgrades only, or abort). `make up` waits until
that run exists and prints the link to answer it; there is no special onboarding path.
`--no-simulator` (a real store) starts no simulator, keeps whatever `lightspeed_default`
connection the DB has, and leaves the DAG paused.

`make down` (`--down`) stops exactly the process groups recorded in `<state>/pids.json` (and any
process they spawned, e.g. task runners in their own groups), nothing else. `make up` twice does
not start a second copy.

    python -m tools.up [--port 8080] [--host 127.0.0.1] [--state-dir .demo/up] [--no-simulator]
                       [--settings airflow_settings.yaml]
    python -m tools.up --down [--state-dir .demo/up]
    python -m tools.up --status [--state-dir .demo/up]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import requests
import yaml

from tools.load_settings import convert

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO / ".demo" / "up"
DAG_ID = "customer_tier_sync"
CONN_ID = "lightspeed_default"
SIM_TOKEN = "demo-store-token"  # the simulator's token for the demo store; not a real secret
ADMIN_USER = "admin"
VIEWER_USER = "viewer"  # Airflow's Viewer role: the page's counts, never one customer (README: Privacy)
PIDS_FILE = "pids.json"
APPROVAL_TASK = "approve_sync"


class UpError(RuntimeError):
    """A clear, user-facing reason `make up` could not finish."""


# ------------------------------------------------------------------------------------------
# State: what we started
# ------------------------------------------------------------------------------------------


@dataclass
class Started:
    """One process group `make up` started (the leader is the process we spawned)."""

    name: str
    pid: int
    pgid: int
    create_time: float
    cmd: list[str]
    log: str


@dataclass
class Paths:
    state: Path

    @property
    def home(self) -> Path:
        return self.state / "airflow"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pids(self) -> Path:
        return self.state / PIDS_FILE

    @property
    def info(self) -> Path:
        return self.state / "up.json"

    @property
    def sim_store(self) -> Path:
        return self.state / "sim-store.json"

    @property
    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"


def read_started(paths: Paths) -> list[Started]:
    if not paths.pids.exists():
        return []
    doc = json.loads(paths.pids.read_text())
    return [Started(**p) for p in doc.get("processes", [])]


def write_started(paths: Paths, started: list[Started]) -> None:
    tmp = paths.pids.with_suffix(".tmp")
    tmp.write_text(json.dumps({"processes": [asdict(s) for s in started]}, indent=2))
    tmp.replace(paths.pids)


def _leader(s: Started) -> psutil.Process | None:
    """The recorded leader, if it is still the very process we started (pid reuse guarded)."""
    try:
        proc = psutil.Process(s.pid)
        if abs(proc.create_time() - s.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def group_members(s: Started) -> list[psutil.Process]:
    """Live processes of the recorded group, plus everything they spawned (their own groups too).

    A process group id cannot be reused while any member is alive, so members of `s.pgid` are ours
    when the leader is gone; if a *different* process now has the leader's pid, the group is not
    ours any more and nothing is returned.
    """
    leader_alive = psutil.pid_exists(s.pid)
    if leader_alive and _leader(s) is None:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(s.pid).status() != psutil.STATUS_ZOMBIE:
                return []  # pid reused by someone else
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == s.pgid and proc.create_time() >= s.create_time - 1.0:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    return [p for p in found.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_running(s: Started) -> bool:
    return _leader(s) is not None


def stop_started(started: list[Started], *, timeout: float = 30.0) -> list[int]:
    """SIGTERM each recorded group (and its spawned processes), then SIGKILL what is left.

    Airflow first, the simulator last (it saves its store on SIGTERM, after the last write).
    Returns the pids that were signalled.
    """
    signalled: list[int] = []
    order = sorted(started, key=lambda s: s.name == "simulator")
    for s in order:
        procs = group_members(s)
        if not procs:
            continue
        signalled.extend(p.pid for p in procs)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.pgid, signal.SIGTERM)
        for p in procs:  # spawned processes in their own groups (task runners)
            with contextlib.suppress(psutil.Error):
                if os.getpgid(p.pid) != s.pgid:
                    p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        alive = [p for p in alive if _alive(p)]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    return signalled


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def latest_boundary(now: datetime) -> datetime:
    """The end of the newest complete daily interval (02:00 UTC)."""
    boundary = now.replace(hour=2, minute=0, second=0, microsecond=0)
    return boundary if boundary <= now else boundary - timedelta(days=1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    # Something may listen on another address of this machine (e.g. 127.0.0.1 vs 0.0.0.0).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def airflow_bin() -> str:
    path = Path(sys.executable).with_name("airflow")
    return str(path) if path.exists() else "airflow"


def base_env(paths: Paths) -> dict[str, str]:
    """The environment of every Airflow command: ours, whatever AIRFLOW__* the shell has."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("AIRFLOW__") or k in {"AIRFLOW_HOME", "AIRFLOW_CONFIG"})
    }
    env.update(
        AIRFLOW_HOME=str(paths.home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),  # the "Loyalty tiers" UI page
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",  # `make up` unpauses once settings are loaded
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{ADMIN_USER}:admin,{VIEWER_USER}:viewer",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # standalone runs `airflow`
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def run_logged(cmd: list[str], env: dict[str, str], log: Path, what: str, timeout: float = 300) -> None:
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if code != 0:
        raise UpError(f"{what} failed (exit {code}); see {log}\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def spawn(name: str, cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], Started]:
    """Start `cmd` as the leader of a new session/process group, output to `log`."""
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    create_time = psutil.Process(proc.pid).create_time()
    return proc, Started(name, proc.pid, proc.pid, create_time, cmd, str(log))


def wait_for(what: str, check: Any, timeout: float, procs: list[tuple[subprocess.Popen[bytes], Started]]) -> Any:
    """Poll `check()` until it returns something truthy; fail early if a started process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, s in procs:
            if proc.poll() is not None:
                raise UpError(f"{s.name} exited (code {proc.returncode}) while waiting for {what}; "
                              f"see {s.log}\n{tail(Path(s.log))}")
        try:
            result = check()
        except (requests.RequestException, OSError, ValueError):
            result = None
        if result:
            return result
        time.sleep(1.0)
    raise UpError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------------
# The REST API (the same calls the UI makes)
# ------------------------------------------------------------------------------------------


class Api:
    def __init__(self, base: str, username: str, password: str) -> None:
        self.base = base.rstrip("/")
        self.session = requests.Session()
        resp = self.session.post(f"{self.base}/auth/token", json={"username": username, "password": password}, timeout=30)
        resp.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(f"{self.base}/api/v2{path}", params=params, timeout=30)

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return self.session.post(f"{self.base}/api/v2{path}", json=body, timeout=30)

    def patch(self, path: str, body: dict[str, Any]) -> requests.Response:
        return self.session.patch(f"{self.base}/api/v2{path}", json=body, timeout=30)


def read_password(paths: Paths, user: str = ADMIN_USER) -> str | None:
    try:
        return str(json.loads(paths.password_file.read_text())[user])
    except (OSError, ValueError, KeyError):
        return None


def dag_ready(api: Api) -> dict[str, Any] | None:
    resp = api.get(f"/dags/{DAG_ID}")
    if resp.status_code == 200:
        return dict(resp.json())
    errors = api.get("/importErrors")
    if errors.status_code == 200:
        for err in errors.json().get("import_errors", []):
            if "customer_tier_sync" in str(err.get("filename", "")):
                raise UpError(f"the DAG file has import errors:\n{err.get('stack_trace')}")
    return None


def has_runs(api: Api) -> bool:
    runs = api.get(f"/dags/{DAG_ID}/dagRuns", limit=1)
    runs.raise_for_status()
    return bool(runs.json().get("total_entries", 0))


def first_run(api: Api) -> str | None:
    """The run the scheduler starts once the DAG is unpaused on a fresh install (None: not yet)."""
    runs = api.get(f"/dags/{DAG_ID}/dagRuns", limit=1)
    runs.raise_for_status()
    found = runs.json().get("dag_runs") or []
    return str(found[0]["dag_run_id"]) if found else None


def required_actions_url(url: str, run_id: str) -> str:
    """Where the approval of a run is answered in the UI (Airflow 3.3's Required actions tab)."""
    return f"{url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/{APPROVAL_TASK}/required_actions"


# ------------------------------------------------------------------------------------------
# up / down / status
# ------------------------------------------------------------------------------------------


def start_simulator(paths: Paths, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Started, str]:
    log = paths.logs / "simulator.log"
    log.write_text("")
    cmd = [sys.executable, "-m", "tools.lightspeed_sim", "--port", "0", "--token", SIM_TOKEN,
           "--save-on-exit", str(paths.sim_store)]
    if paths.sim_store.exists():
        cmd += ["--store", str(paths.sim_store)]  # the POS as the last `make down` left it
    else:
        cmd += ["--seed", "42", "--customers", "300", "--now", latest_boundary(datetime.now(tz=UTC)).isoformat()]
    proc, started = spawn("simulator", cmd, env, log)

    def url() -> str | None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("LIGHTSPEED_SIM_URL="):
                return line.split("=", 1)[1].strip()
        return None

    return proc, started, str(wait_for("the simulator", url, 60, [(proc, started)]))


def load_settings(paths: Paths, env: dict[str, str], settings_file: Path, sim_url: str | None) -> None:
    log = paths.logs / "load-settings.log"
    run_logged([sys.executable, "-m", "tools.load_settings", str(settings_file), "--skip-placeholder-connections"],
               env, log, "loading airflow_settings.yaml")
    if sim_url is None:
        return
    # The simulator's URL and token replace the placeholder; extras come from airflow_settings.yaml.
    settings = yaml.safe_load(settings_file.read_text()) or {}
    _, _, conns = convert(settings, skip_placeholders=False)
    conn = dict(conns.get(CONN_ID) or {"conn_type": "http"})
    extra = json.loads(conn.get("extra") or "{}")
    extra["rate_budget_dir"] = str(paths.state / "rate_budget")
    extra["allow_insecure_http"] = True  # the simulator speaks plain http (testing only)
    conn.update(host=sim_url, password=SIM_TOKEN, extra=json.dumps(extra))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "connections.json"
        path.write_text(json.dumps({CONN_ID: conn}))
        run_logged([airflow_bin(), "connections", "import", "--overwrite", str(path)], env, log,
                   f"setting the {CONN_ID} connection to the simulator")


def retention_setting(settings_file: Path) -> int:
    """The `tier_sync_retention_days` that airflow_settings.yaml sets (validated like the task does:
    a bad value stops `make up` naming the Variable, before anything starts)."""
    from include.tier_sync import settings as tier_settings

    _, variables, _ = convert(yaml.safe_load(settings_file.read_text()) or {}, skip_placeholders=False)
    env = os.environ.get(f"AIRFLOW_VAR_{tier_settings.VAR_RETENTION_DAYS.upper()}")
    try:
        return tier_settings.check_retention_days(env if env is not None else variables.get(tier_settings.VAR_RETENTION_DAYS))
    except ValueError as exc:
        raise UpError(f"{settings_file}: {exc}") from None


def print_banner(info: dict[str, Any], paths: Paths, *, already: bool) -> None:
    url = info["url"]
    password = read_password(paths) or f"(see {paths.password_file})"
    print()
    print("customer-tier-sync is " + ("already running" if already else "up") + ":")
    print(f"  Airflow UI:   {url}")
    print(f"  login:        {ADMIN_USER} / {password}")
    print(f"                {VIEWER_USER} / {read_password(paths, VIEWER_USER) or '(see the same file)'} (Viewer role: the")
    print("                Loyalty tiers page shows it the counts, never one customer)")
    print(f"                (generated by Airflow's SimpleAuthManager into {paths.password_file})")
    if info.get("sim_url"):
        print(f"  simulator:    {info['sim_url']} (demo store, token {SIM_TOKEN}; saved to {paths.sim_store} on down)")
    if info.get("sim_url"):
        print(f"  DAG:          {url}/dags/{DAG_ID} (unpaused; daily at 02:00 UTC)")
    else:
        print(f"  DAG:          {url}/dags/{DAG_ID} (left paused: no simulator)")
        print(f"                Set the {CONN_ID} connection (Admin -> Connections: host = your API base URL,")
        print("                password = your personal token), run once with {\"dry_run\": true}, then unpause:")
        print("                the first sync moves most customers at once and waits for your approval.")
    if info.get("first_run"):
        print(f"  first sync:   run {info['first_run']} stops at the circuit breaker (it moves most customers")
        print("                at once) and waits for your approval. Answer it under Required actions:")
        print(f"                {required_actions_url(url, info['first_run'])}")
        print("                (the run's approve_sync task -> Required actions; Browse -> Required Actions")
        print("                lists every open one): Apply all, Apply upgrades only, or Abort.")
    print(f"  logs:         {paths.logs} (Airflow task logs under {paths.home / 'logs'})")
    print(f"  data:         {paths.home / 'tier_sync_data'}")
    if info.get("retention_days"):
        print(f"  retention:    run folders older than {info['retention_days']} days are pruned by the prune_runs task")
        print("                (Variable tier_sync_retention_days, set from airflow_settings.yaml; minimum 7, no 'off')")
    print()
    print("Trigger a run from the UI (Trigger button) or the CLI:")
    print(f"  AIRFLOW_HOME={paths.home} {Path(sys.executable).parent / 'airflow'} dags trigger {DAG_ID} "
          "-c '{\"dry_run\": true}'")
    print("A sync that would move an unusually large share of customers waits for an approval under")
    print("Required actions; trigger with conf '{\"allow_mass_change\": true}' to write one without asking.")
    print("Stop everything with `make down`.")


def up(args: argparse.Namespace) -> int:
    paths = Paths(Path(args.state_dir).resolve())
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(exist_ok=True)
    paths.home.mkdir(exist_ok=True)

    recorded = read_started(paths)
    if recorded:
        if all(is_running(s) for s in recorded) and paths.info.exists():
            print_banner(json.loads(paths.info.read_text()), paths, already=True)
            return 0
        dead = [s.name for s in recorded if not is_running(s)]
        print(f"a previous `make up` is partly gone ({', '.join(dead)} not running): stopping the rest first")
        stop_started(recorded)
        paths.pids.unlink(missing_ok=True)

    if port_taken(args.host, args.port):
        raise UpError(f"port {args.port} is already in use on this machine: choose another with PORT=<n> "
                      f"(`make up PORT=8081`) or `--port`")

    retention_days = retention_setting(Path(args.settings))
    env = base_env(paths)
    started: list[Started] = []
    procs: list[tuple[subprocess.Popen[bytes], Started]] = []
    t0 = time.monotonic()
    try:
        sim_url: str | None = None
        if not args.no_simulator:
            sim_proc, sim_started, sim_url = start_simulator(paths, env)
            started.append(sim_started)
            procs.append((sim_proc, sim_started))
            write_started(paths, started)
            print(f"simulator:  {sim_url}")

        print(f"airflow:    migrating the SQLite metadata DB under {paths.home} ...")
        run_logged([airflow_bin(), "db", "migrate"], env, paths.logs / "db-migrate.log", "airflow db migrate")
        print(f"settings:   loading {args.settings} (pool, Variables, connections) ...")
        load_settings(paths, env, Path(args.settings), sim_url)

        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        af_env = dict(env)
        af_env.update(
            AIRFLOW__API__HOST=args.host,
            AIRFLOW__API__PORT=str(args.port),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{url}/execution/",
            AIRFLOW__API__BASE_URL=url,  # links in alerts and logs point at this UI
            # Other Airflow installs on this machine may hold the default log-server ports.
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
            # LocalExecutor starts `parallelism` worker processes up front (32 by default, several GB);
            # 8 is plenty for one DAG whose widest step is the 2-slot pool.
            AIRFLOW__CORE__PARALLELISM=os.environ.get("AIRFLOW__CORE__PARALLELISM", "8"),
        )
        print(f"airflow:    starting `airflow standalone` on {url} ...")
        af_proc, af_started = spawn("airflow-standalone", [airflow_bin(), "standalone"], af_env,
                                    paths.logs / "airflow-standalone.log")
        started.append(af_started)
        procs.append((af_proc, af_started))
        write_started(paths, started)

        wait_for("the api-server", lambda: requests.get(f"{url}/api/v2/version", timeout=5).status_code == 200,
                 args.timeout, procs)
        password = wait_for("the admin password file", lambda: read_password(paths), 60, procs)
        api = Api(url, ADMIN_USER, password)
        print("airflow:    api-server up; waiting for the dag-processor to parse the DAG ...")
        wait_for(f"the DAG {DAG_ID} to be parsed", lambda: dag_ready(api), args.timeout, procs)

        first: str | None = None
        if not args.no_simulator:  # against a real store, the user unpauses once the connection is set
            fresh = not has_runs(api)
            resp = api.patch(f"/dags/{DAG_ID}", {"is_paused": False})
            if resp.status_code != 200:
                raise UpError(f"could not unpause {DAG_ID}: {resp.status_code} {resp.text[:300]}")
            if fresh:  # the scheduler starts the newest interval's run; it will ask for approval
                first = wait_for("the first scheduled run", lambda: first_run(api), args.timeout, procs)
        info = {"url": url, "port": args.port, "sim_url": sim_url, "first_run": first,
                "retention_days": retention_days, "airflow_home": str(paths.home), "started_at": datetime.now(tz=UTC).isoformat()}
        paths.info.write_text(json.dumps(info, indent=2))
        print(f"ready in {time.monotonic() - t0:.0f} s")
        print_banner(info, paths, already=False)
        return 0
    except BaseException:
        if started:
            print("`make up` did not finish: stopping what it started", file=sys.stderr)
            stop_started(started)
            paths.pids.unlink(missing_ok=True)
        raise


def down(args: argparse.Namespace) -> int:
    paths = Paths(Path(args.state_dir).resolve())
    recorded = read_started(paths)
    if not recorded:
        print(f"nothing to stop (no {paths.pids})")
        return 0
    signalled = stop_started(recorded)
    leftovers = [p.pid for s in recorded for p in group_members(s)]
    if leftovers:
        print(f"could not stop: {leftovers}", file=sys.stderr)
        return 1
    paths.pids.unlink(missing_ok=True)
    paths.info.unlink(missing_ok=True)
    names = ", ".join(s.name for s in recorded)
    print(f"stopped {names} ({len(signalled)} processes)" + (
        f"; simulator store saved to {paths.sim_store}" if paths.sim_store.exists() else ""))
    return 0


def status(args: argparse.Namespace) -> int:
    paths = Paths(Path(args.state_dir).resolve())
    recorded = read_started(paths)
    if not recorded:
        print("not running")
        return 1
    for s in recorded:
        print(f"{s.name:20} pid {s.pid:>7}  {'running' if is_running(s) else 'gone'}  log {s.log}")
    return 0 if all(is_running(s) for s in recorded) else 1


@contextlib.contextmanager
def state_lock(state_dir: str) -> Iterator[None]:
    """One `up`/`down` at a time per state dir (a second `make up` waits, then finds it running)."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    with (state / "up.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another `make up`/`make down` is working on {state}; waiting for it ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _clear_errors() -> Iterator[None]:
    try:
        yield
    except UpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--down", action="store_true", help="stop what `make up` started")
    parser.add_argument("--status", action="store_true", help="show what `make up` started")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8080),
                        help="UI/API port (default: $PORT or 8080)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the api-server binds (default 127.0.0.1; 0.0.0.0 for other machines)")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="default .demo/up")
    parser.add_argument("--settings", default=str(REPO / "airflow_settings.yaml"))
    parser.add_argument("--no-simulator", action="store_true",
                        help="no simulator: the lightspeed_default connection is yours (UI or airflow_settings.yaml); "
                             "the DAG is left paused")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each component")
    args = parser.parse_args(argv)
    if args.status:
        return status(args)
    with _clear_errors(), state_lock(args.state_dir):
        if args.down:
            return down(args)
        return up(args)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
