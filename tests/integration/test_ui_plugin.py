"""The "Loyalty tiers" Airflow plugin, end to end.

A real demo run (tools/demo.py: the simulator + `airflow dags test` twice) writes a data dir; an
Airflow api-server of our own (temp AIRFLOW_HOME, SQLite, SimpleAuthManager with known passwords,
plugins folder = plugins/) serves the page with `tier_sync_data_dir` set as a Variable in the
metadata DB (what a deployment does; the api-server cannot use the Task SDK to read it). Then:

- API tests with a token from POST /auth/token, and without one (refused);
- headless Chromium, driven over the DevTools protocol: logs into the Airflow UI through its
  login form, opens the page inside the UI (/plugin/loyalty-tiers, an iframe) and checks the
  numbers shown against the files; the screenshot is kept under test-artifacts/.

Chromium: tools/install_chromium.sh (apt; `make browser`) is run when chromium is missing; the
browser tests are skipped, with the reason, only if that fails (no root, no apt: e.g. a Mac).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # websockets' sync client is used without a `with` block: Browser.close() closes it.
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui_plugin"
BIN = Path(sys.executable).parent
ADMIN = "admin"
VIEWER = "viewer"
CLERK = "clerk"  # SimpleAuthManager's User role: may edit the DAG, so may see customers
# tier_sync_customer_lookups_per_hour on this server: the clerk's test uses it up. The admin's browser
# tests share the same hour: each page load lists the at-risk and growing names, each customer opened
# reads its record and a page of each sales list, so their lookups must fit under it too.
LOOKUP_LIMIT = 80


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a demo run --------------------------------------------------------------------------------------


def run_demo(root: Path) -> Path:
    """tools.demo end to end, under `root` instead of .demo/ (other sessions may be using that)."""
    code = (
        "import sys, tools.demo as d; from pathlib import Path; "
        f"d.DEMO = Path({str(root)!r}); sys.exit(d.main([]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    (root / "demo.out").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, f"demo run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return root / "data"


# -- an api-server -----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    home: Path
    passwords: dict[str, str]
    log: Path

    def token(self, user: str = ADMIN) -> str:
        resp = httpx.post(
            f"{self.url}/auth/token", json={"username": user, "password": self.passwords[user]}, timeout=30
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["access_token"])


def airflow_env(home: Path, data_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),  # empty: this server only serves the UI
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{ADMIN}:admin,{VIEWER}:viewer,{CLERK}:user",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(16),
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
    )
    if data_dir is None:
        env["AIRFLOW_VAR_TIER_SYNC_DATA_DIR"] = str(home / "no-data-yet")
    return env


FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
FAB_ROLES = {ADMIN: "Admin", VIEWER: "Viewer", CLERK: "User"}  # FAB's own default roles


@contextmanager
def api_server(data_dir: Path | None, home: Path, auth: str = "simple") -> Iterator[Server]:
    """`airflow api-server` on a free port; the data dir is an Airflow Variable in its DB. `auth`:
    SimpleAuthManager (users from the environment) or "fab" (the FAB auth manager a deployment
    uses, its users created through its own CLI with its default roles)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dags").mkdir(exist_ok=True)
    passwords = {user: secrets.token_urlsafe(12) for user in (ADMIN, VIEWER, CLERK)}
    (home / "passwords.json").write_text(json.dumps(passwords))
    env = airflow_env(home, data_dir)
    if auth == "fab":
        env["AIRFLOW__CORE__AUTH_MANAGER"] = FAB_AUTH_MANAGER
    airflow = str(BIN / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    if auth == "fab":
        for user, role in FAB_ROLES.items():
            made = subprocess.run(
                [airflow, "users", "create", "--username", user, "--password", passwords[user], "--role", role,
                 "--email", f"{user}@example.org", "--firstname", user, "--lastname", "Test"],
                env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    variables = {"tier_sync_customer_lookups_per_hour": str(LOOKUP_LIMIT)}
    if data_dir is not None:
        variables["tier_sync_data_dir"] = str(data_dir)
    for name, value in variables.items():
        setvar = subprocess.run(
            [airflow, "variables", "set", name, value], env=env, capture_output=True, text=True, timeout=120
        )
        assert setvar.returncode == 0, setvar.stderr[-2000:]
    port = free_port()
    log_path = home / "api-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [airflow, "api-server", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"api-server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"api-server did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Server(url=url, home=home, passwords=passwords, log=log_path)
    finally:
        try:
            os.killpg(proc.pid, 15)  # our own process group: the server and its workers
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


# -- headless Chromium over the DevTools protocol ------------------------------------------------------


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


NO_BROWSER = (
    "no Chromium on this machine and tools/install_chromium.sh could not install it (it needs root "
    "or sudo and apt): run `make browser` to install it, or put chromium on PATH"
)


def ensure_chromium() -> str | None:
    found = chromium_binary()
    if found:
        return found
    subprocess.run(["bash", str(REPO / "tools" / "install_chromium.sh")], capture_output=True, timeout=900)
    return chromium_binary()


class Browser:
    """Just enough of the Chrome DevTools protocol: navigate, evaluate JS, type, screenshot."""

    def __init__(self, binary: str, profile: Path, width: int = 1440, height: int = 2200) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        from websockets.sync.client import connect

        deadline = time.monotonic() + 30
        ws_url = None
        while ws_url is None:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            except (httpx.HTTPError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    self.close()
                    raise
                time.sleep(0.2)
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=30)  # closed in close()
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg_id = self._id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def eval(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.eval(expression)
            except RuntimeError:
                last = None
            if last:
                return last
            time.sleep(0.25)
        url = self.eval("location.href")
        raise AssertionError(f"timed out waiting for {what or expression} (at {url})")

    def type_into(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                self.ws.close()
        finally:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, 9)


# JS run inside the plugin's iframe (or the page itself when opened directly).
FRAME_DOC = (
    "(() => { const f = document.querySelector('iframe'); "
    "try { return f && f.contentDocument && f.contentDocument.body ? f.contentDocument : null } "
    "catch (e) { return null } })()"
)


def in_doc(expr: str, doc: str = FRAME_DOC) -> str:
    return f"(() => {{ const d = {doc}; if (!d) return null; return ({expr}); }})()"


# -- expectations from the files -----------------------------------------------------------------------


def read_master(data_dir: Path) -> list[dict[str, str]]:
    with (data_dir / "customer_analytics_master.csv").open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def expected_at_risk(master: list[dict[str, str]]) -> set[str]:
    """Who the page must list as at risk within 30 days, read off the CSV: Sprout only through the
    3-purchases rule (Lifetime Value under $250), so the next purchase leaving the window drops them."""
    return {
        r["Customer ID"]
        for r in master
        if r["Tier"] == "Sprout" and float(r["Lifetime Value"]) < 250 and int(r["Purchases Last 30 Days"]) >= 3
    }


def tier_counts(data_dir: Path) -> Counter[str]:
    return Counter(r["Tier"] for r in read_master(data_dir))


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # tools/demo.py prints paths relative to the repo, so its root must live inside it
    # (test-artifacts/ is git-ignored).
    root = Path(tempfile.mkdtemp(prefix="run-", dir=ARTIFACTS))
    yield root
    shutil.rmtree(root, ignore_errors=True)  # the screenshots stay, directly under ARTIFACTS


@pytest.fixture(scope="module")
def demo_data(workdir: Path) -> Path:
    started = time.monotonic()
    data = run_demo(workdir / "demo")
    print(f"demo run: {time.monotonic() - started:.0f} s")
    return data


@pytest.fixture(scope="module")
def server(demo_data: Path, workdir: Path) -> Iterator[Server]:
    with api_server(demo_data, workdir / "airflow") as srv:
        yield srv


# -- API tests ---------------------------------------------------------------------------------------


def test_unauthenticated_requests_are_refused(server: Server) -> None:
    anon = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
    for path in (
        "/loyalty-tiers/api/summary",
        "/loyalty-tiers/api/search?q=liam",
        "/loyalty-tiers/data-docs/index.html",
        "/loyalty-tiers/static/app.js",
        "/loyalty-tiers/api/at-risk",
        "/loyalty-tiers/api/runs/manual__2026-11-25T02:00:00+00:00",
        "/loyalty-tiers/static/run.js",
    ):
        resp = anon.get(path)
        assert resp.status_code == 401, (path, resp.status_code, resp.text[:200])
    bad = anon.get("/loyalty-tiers/api/summary", headers={"Authorization": "Bearer not-a-jwt"})
    assert bad.status_code in (401, 403)
    # The page itself sends a browser to Airflow's login, and back afterwards.
    page = anon.get("/loyalty-tiers/")
    assert page.status_code == 307 and "login" in page.headers["location"]
    assert "customer" not in page.text.lower()
    run_tab = anon.get("/loyalty-tiers/run", params={"dag_id": "customer_tier_sync", "run_id": "x"})
    assert run_tab.status_code == 307 and "login" in run_tab.headers["location"]


def test_api_numbers_match_the_files(server: Server, demo_data: Path) -> None:
    client = httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {server.token(VIEWER)}"}
    )
    summary = client.get("/loyalty-tiers/api/summary").json()
    counts = tier_counts(demo_data)
    assert summary["has_data"] is True
    assert summary["data_dir"] == str(demo_data)  # from the Variable in the metadata DB
    assert summary["total_customers"] == sum(counts.values())
    assert {d["tier"]: d["count"] for d in summary["distribution"]} == {
        t: counts.get(t, 0) for t in {d["tier"] for d in summary["distribution"]}
    }
    latest = json.loads((demo_data / "latest.json").read_text())
    assert summary["as_of"] == latest["as_of"]
    log = json.loads((demo_data / "tier_sync_log.json").read_text())
    assert summary["sync"]["updated"] == log["updated"]
    assert summary["sync"]["protected"] == log["protected"]
    assert summary["sync"]["errors"] == log["errors"]
    assert summary["sync"]["api_requests"] == log["api"]["requests"]
    assert summary["sync"]["rate_limited"] == log["api"]["rate_limited"]
    assert summary["sync"]["group_counts_match"] == log["group_counts_match"]
    validation = json.loads((demo_data / "validation" / "latest.json").read_text())["summary"]
    assert summary["validation"]["success"] == validation["success"]
    assert summary["validation"]["evaluated"] == validation["evaluated"]

    history = client.get("/loyalty-tiers/api/history").json()
    with (demo_data / "tier_history.csv").open(encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    last = history["points"][-1]
    assert last["as_of"] == rows[-1]["as_of"]
    assert last["counts"] == {r["tier"]: int(r["count"]) for r in rows if r["as_of"] == last["as_of"]}

    moves = client.get("/loyalty-tiers/api/moves").json()["runs"]
    key = sorted(p.name for p in (demo_data / "runs").iterdir())[-1]
    with (demo_data / "runs" / key / "tier_changes.csv").open(encoding="utf-8-sig") as fh:
        changes = list(csv.DictReader(fh))
    assert moves[-1]["key"] == key
    assert moves[-1]["changes"] == len(changes)
    assert moves[-1]["new"] == sum(1 for c in changes if c["From"] == "")

    # The viewer sees how many are at risk; who they are, and search, is the customer permission's.
    viewer_risk = client.get("/loyalty-tiers/api/at-risk", params={"limit": 200}).json()
    client = httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {server.token(ADMIN)}"}
    )
    risk = client.get("/loyalty-tiers/api/at-risk", params={"limit": 200}).json()
    assert viewer_risk["total"] == risk["total"] and viewer_risk["by_days_left"] == risk["by_days_left"]
    assert viewer_risk["customers"] == [] and viewer_risk["customers_visible"] is False
    master = read_master(demo_data)
    expected = expected_at_risk(master)
    assert {c["customer_id"] for c in risk["customers"]} == expected
    assert risk["total"] == len(expected) and risk["exact"] == len(expected)
    assert all("email" not in c for c in risk["customers"])

    someone = next(r for r in master if r["Email"])
    found = client.get("/loyalty-tiers/api/search", params={"q": someone["Email"].upper()}).json()
    assert found["match"] == "exact" and found["customers"][0]["customer_id"] == someone["Customer ID"]
    assert found["customers"][0]["tier"] == someone["Tier"]
    assert found["customers"][0]["lifetime_value"]["dollars"] == someone["Lifetime Value"]
    by_code = client.get("/loyalty-tiers/api/search", params={"q": someone["Customer Code"]}).json()
    assert by_code["customers"][0]["customer_id"] == someone["Customer ID"]
    detail = client.get(f"/loyalty-tiers/api/customers/{someone['Customer ID']}").json()
    assert detail["tier"] == someone["Tier"]
    assert client.get("/loyalty-tiers/api/customers/nope").status_code == 404

    docs = client.get("/loyalty-tiers/data-docs/index.html")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    # A client normalises "../" away, so encode it: the app must confine the path itself.
    escape = client.get("/loyalty-tiers/data-docs/%2e%2e/%2e%2e/latest.json")
    assert escape.status_code == 404 and "run_id" not in escape.text

    # The plugin is registered with the UI (navigation entry) and as a FastAPI app.
    plugins = client.get("/api/v2/plugins").json()["plugins"]
    ours = next(p for p in plugins if p["name"] == "loyalty_tiers")
    assert ours["external_views"][0]["url_route"] == "loyalty-tiers"


def client_of(server: Server, user: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {server.token(user)}"}
    )


def audit_rows(server: Server, event: str, owner: str) -> list[dict[str, Any]]:
    """Airflow's own audit log: its `log` table in this server's metadata DB. (Its REST API,
    /api/v2/eventLogs, shows a DAG's rows only once the DAG is parsed, which this UI-only server's
    empty dags folder never does.)"""
    with sqlite3.connect(server.home / "airflow.db") as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT dttm AS \"when\", dag_id, event, owner, extra FROM log WHERE event = ? AND owner = ? ORDER BY id",
            (event, owner),
        ).fetchall()
    return [dict(r) for r in rows]


def test_customer_data_by_role(server: Server, demo_data: Path) -> None:
    master = read_master(demo_data)
    someone = next(r for r in master if r["Email"])
    viewer, admin = client_of(server, VIEWER), client_of(server, ADMIN)

    # A Viewer: aggregates yes, any one customer no (and the attempt is on record).
    denied_before = len(audit_rows(server, "loyalty_customers.denied", VIEWER))
    assert viewer.get("/loyalty-tiers/api/summary").json()["access"]["customers"] is False
    for path, params in (
        ("/loyalty-tiers/api/search", {"q": someone["Email"]}),
        (f"/loyalty-tiers/api/customers/{someone['Customer ID']}", {}),
    ):
        resp = viewer.get(path, params=params)
        assert resp.status_code == 403, (path, resp.text[:300])
        assert "edit on the DAG customer_tier_sync" in resp.json()["detail"]
        assert someone["Email"] not in resp.text and someone["Name"] not in resp.text
    denied = audit_rows(server, "loyalty_customers.denied", VIEWER)[denied_before:]
    assert [json.loads(r["extra"])["action"] for r in denied] == ["search", "customer"]

    # An Admin: search lists candidates with masked emails; the customer's own view has it in full.
    assert admin.get("/loyalty-tiers/api/summary").json()["access"]["customers"] is True
    before = len(audit_rows(server, "loyalty_customers.lookup", ADMIN))
    prefix = someone["Customer Code"][:-1]
    listed = admin.get("/loyalty-tiers/api/search", params={"q": prefix, "limit": 25}).json()
    assert listed["total"] >= 1
    by_id = {r["Customer ID"]: r for r in master}
    for c in listed["customers"]:
        full = by_id[c["customer_id"]]["Email"]
        assert "•••" in c["email"] or not full
        assert c["email"] != full or not full
    detail = admin.get(f"/loyalty-tiers/api/customers/{someone['Customer ID']}").json()
    assert detail["email"] == someone["Email"]
    rows = audit_rows(server, "loyalty_customers.lookup", ADMIN)[before:]
    assert [json.loads(r["extra"])["action"] for r in rows] == ["search", "customer"]
    search_row, detail_row = (json.loads(r["extra"]) for r in rows)
    assert search_row["customer_ids"] == [c["customer_id"] for c in listed["customers"]]
    assert detail_row["customer_ids"] == [someone["Customer ID"]] and detail_row["client"] == "127.0.0.1"
    assert all(r["dag_id"] == "customer_tier_sync" and r["when"] for r in rows)
    # What a Viewer may read of the audit log holds no contact data.
    assert all(someone["Email"] not in r["extra"] and prefix not in r["extra"] for r in rows)


def test_customer_lookups_are_limited_per_user(server: Server, demo_data: Path) -> None:
    clerk = client_of(server, CLERK)
    someone = read_master(demo_data)[0]
    path = f"/loyalty-tiers/api/customers/{someone['Customer ID']}"
    answered = len(audit_rows(server, "loyalty_customers.lookup", CLERK))
    for _ in range(LOOKUP_LIMIT - answered):
        assert clerk.get(path).status_code == 200
    refused = clerk.get(path)
    assert refused.status_code == 429, refused.text[:300]
    assert int(refused.headers["retry-after"]) > 0 and f"{LOOKUP_LIMIT} per hour" in refused.json()["detail"]
    assert someone["Name"] not in refused.text
    assert clerk.get("/loyalty-tiers/api/search", params={"q": someone["Customer Code"]}).status_code == 429
    assert clerk.get("/loyalty-tiers/api/summary").status_code == 200  # aggregates are not limited
    assert len(audit_rows(server, "loyalty_customers.lookup", CLERK)) == LOOKUP_LIMIT
    assert len(audit_rows(server, "loyalty_customers.rate_limited", CLERK)) == 2
    # The limit is the clerk's, not everyone's.
    assert client_of(server, ADMIN).get(path).status_code == 200


def test_customer_permission_under_the_fab_auth_manager(demo_data: Path, workdir: Path) -> None:
    """The same policy through FAB's roles: Viewer reads aggregates, User (DAG edit) reads customers."""
    someone = next(r for r in read_master(demo_data) if r["Email"])
    with api_server(demo_data, workdir / "airflow-fab", auth="fab") as srv:
        viewer, user = client_of(srv, VIEWER), client_of(srv, CLERK)
        summary = viewer.get("/loyalty-tiers/api/summary")
        assert summary.status_code == 200 and summary.json()["access"]["customers"] is False
        assert summary.json()["total_customers"] == sum(tier_counts(demo_data).values())
        risk = viewer.get("/loyalty-tiers/api/at-risk").json()
        assert risk["customers"] == [] and risk["customers_visible"] is False
        assert viewer.get("/loyalty-tiers/api/search", params={"q": someone["Email"]}).status_code == 403
        assert viewer.get(f"/loyalty-tiers/api/customers/{someone['Customer ID']}").status_code == 403
        assert user.get("/loyalty-tiers/api/summary").json()["access"]["customers"] is True
        detail = user.get(f"/loyalty-tiers/api/customers/{someone['Customer ID']}")
        assert detail.status_code == 200 and detail.json()["email"] == someone["Email"]
        rows = audit_rows(srv, "loyalty_customers.lookup", CLERK)
        assert [json.loads(r["extra"])["customer_ids"] for r in rows] == [[someone["Customer ID"]]]
        assert len(audit_rows(srv, "loyalty_customers.denied", VIEWER)) == 2


def test_empty_state(workdir: Path) -> None:
    with api_server(None, workdir / "airflow-empty") as srv:
        client = httpx.Client(
            base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {srv.token()}"}
        )
        summary = client.get("/loyalty-tiers/api/summary").json()
        assert summary["has_data"] is False and summary["distribution"] == []
        assert client.get("/loyalty-tiers/api/at-risk").json()["total"] == 0
        assert client.get("/loyalty-tiers/api/moves").json()["runs"] == []
        assert client.get("/loyalty-tiers/api/search", params={"q": "someone"}).json()["total"] == 0
        binary = ensure_chromium()
        if binary is None:
            pytest.skip(NO_BROWSER)
        browser = Browser(binary, workdir / "chrome-empty", height=900)
        try:
            login(browser, srv)
            browser.navigate(f"{srv.url}/loyalty-tiers/")
            doc = "document"
            browser.wait_for(in_doc("d.body.dataset.ready === 'true'", doc), what="the page to load")
            assert browser.eval(in_doc("!d.getElementById('empty').hidden", doc))
            assert "No data yet" in browser.eval(in_doc("d.getElementById('empty').innerText", doc))
            browser.screenshot(ARTIFACTS / "loyalty_tiers_empty.png")
        finally:
            browser.close()


# -- the browser -------------------------------------------------------------------------------------


def login(browser: Browser, server: Server, user: str = ADMIN) -> None:
    """Through the Airflow UI's own login form (SimpleAuthManager)."""
    browser.navigate(f"{server.url}/")
    browser.wait_for("!!document.querySelector('input[name=username]')", what="the Airflow login form")
    browser.type_into("input[name=username]", user)
    browser.type_into("input[name=password]", server.passwords[user])
    browser.eval("document.querySelector('button[type=submit]').click()")
    browser.wait_for("!location.pathname.startsWith('/auth/')", what="the login to finish")


def test_page_in_the_airflow_ui(server: Server, demo_data: Path) -> None:
    binary = ensure_chromium()
    if binary is None:
        pytest.skip(NO_BROWSER)
    browser = Browser(binary, server.home / "chrome-profile")
    try:
        login(browser, server)
        browser.navigate(f"{server.url}/plugin/loyalty-tiers")
        browser.wait_for(
            in_doc("d.body.dataset.ready === 'true'"), timeout=90, what="the plugin page in the UI"
        )
        browser.wait_for(in_doc("!!d.querySelector('#risk-table, #risk p')"), what="the at-risk list")
        assert browser.eval(in_doc("d.getElementById('error').hidden")), browser.eval(
            in_doc("d.getElementById('error').innerText")
        )
        # Numbers shown vs the files.
        counts = tier_counts(demo_data)
        shown = browser.eval(
            in_doc(
                "Object.fromEntries([...d.querySelectorAll('#distribution .bar-row')].map("
                "r => [r.dataset.tier, r.querySelector('.tier-count').innerText]))"
            )
        )
        assert {t: int(v.replace(",", "")) for t, v in shown.items()} == {t: counts.get(t, 0) for t in shown}
        assert int(
            browser.eval(in_doc("d.getElementById('kpi-customers').innerText")).replace(",", "")
        ) == sum(counts.values())
        log = json.loads((demo_data / "tier_sync_log.json").read_text())
        for elem, value in (
            ("sync-updated", log["updated"]),
            ("sync-protected", log["protected"]),
            ("sync-errors", log["errors"]),
            ("sync-requests", log["api"]["requests"]),
            ("sync-429", log["api"]["rate_limited"]),
        ):
            assert browser.eval(in_doc(f"d.getElementById('{elem}').innerText")) == f"{value:,}", elem
        assert browser.eval(in_doc("d.getElementById('sync-groups-match').innerText")) == (
            "Yes" if log["group_counts_match"] else "No"
        )
        validation = json.loads((demo_data / "validation" / "latest.json").read_text())["summary"]
        assert browser.eval(in_doc("d.getElementById('quality-result').innerText")) == (
            "Passed" if validation["success"] else "Failed"
        )
        assert (
            browser.eval(in_doc("d.getElementById('data-docs-link').getAttribute('href')"))
            == "data-docs/index.html"
        )
        master = read_master(demo_data)
        at_risk = len(expected_at_risk(master))
        assert int(browser.eval(in_doc("d.getElementById('kpi-at-risk').innerText"))) == at_risk
        browser.screenshot(ARTIFACTS / "loyalty_tiers.png")

        # Search inside the iframe: by customer code, then the detail shows tier and CLV.
        someone = next(r for r in master if r["Tier"] == "Sprout")
        browser.eval(in_doc("d.getElementById('search-q').focus()"))
        browser.send("Input.insertText", text=someone["Customer Code"])
        browser.eval(in_doc("d.getElementById('search-form').requestSubmit()"))
        browser.wait_for(in_doc("!!d.getElementById('customer-detail')"), what="the search result")
        assert browser.eval(in_doc("d.getElementById('customer-tier').innerText")).strip() == someone["Tier"]
        clv = browser.eval(in_doc("d.getElementById('customer-clv').innerText"))
        assert clv.replace("$", "").replace(",", "") == someone["Lifetime Value"]
        assert (
            browser.eval(in_doc("d.querySelectorAll('#customer-detail .tier-history tbody tr').length")) >= 1
        )
        assert browser.eval(in_doc("d.getElementById('customer-detail').innerText")).count(someone["Email"]) == (
            1 if someone["Email"] else 0
        )  # the customer's own view: the full address
        # Why and what next: a Sprout is $X short of Bloom, X read off the CSV's own lifetime value.
        ltv_cents = int(someone["Lifetime Value"].replace(".", ""))
        gap = 75000 - ltv_cents
        next_steps = browser.eval(in_doc("d.getElementById('customer-next').innerText"))
        assert f"${gap // 100:,}.{gap % 100:02d} more to Bloom" in next_steps, next_steps
        because = browser.eval(in_doc("d.getElementById('customer-because').innerText"))
        assert ("Lifetime value" in because) == (ltv_cents >= 25000), because
        browser.eval(in_doc("d.getElementById('customer-detail').scrollIntoView()"))
        time.sleep(0.5)
        browser.screenshot(ARTIFACTS / "loyalty_tiers_search.png")

        # A prefix lists candidates, every email masked.
        browser.eval(in_doc("(d.getElementById('search-q').value = '', d.getElementById('search-q').focus())"))
        browser.send("Input.insertText", text=someone["Customer Code"][:3])
        browser.eval(in_doc("d.getElementById('search-form').requestSubmit()"))
        browser.wait_for(in_doc("!!d.getElementById('search-table')"), what="the list of candidates")
        shown = browser.eval(
            in_doc("[...d.querySelectorAll('#search-table .masked-email')].map(e => e.innerText)")
        )
        assert len(shown) >= 2 and all("•••@" in e for e in shown), shown
        emails = {r["Email"] for r in master if r["Email"]}
        table_text = browser.eval(in_doc("d.getElementById('search-table').innerText"))
        assert not any(e in table_text for e in emails)
    finally:
        browser.close()


def test_page_for_a_viewer(server: Server, demo_data: Path) -> None:
    """A Viewer logs in: the counts are there, the customers are not, and the page says why."""
    binary = ensure_chromium()
    if binary is None:
        pytest.skip(NO_BROWSER)
    browser = Browser(binary, server.home / "chrome-viewer", height=1600)
    try:
        login(browser, server, VIEWER)
        browser.navigate(f"{server.url}/plugin/loyalty-tiers")
        browser.wait_for(in_doc("d.body.dataset.ready === 'true'"), timeout=90, what="the page for a viewer")
        assert browser.eval(in_doc("d.getElementById('error').hidden")), browser.eval(
            in_doc("d.getElementById('error').innerText")
        )
        counts = tier_counts(demo_data)
        assert int(
            browser.eval(in_doc("d.getElementById('kpi-customers').innerText")).replace(",", "")
        ) == sum(counts.values())
        master = read_master(demo_data)
        at_risk = len(expected_at_risk(master))
        assert int(browser.eval(in_doc("d.getElementById('kpi-at-risk').innerText"))) == at_risk
        assert browser.eval(in_doc("!d.getElementById('risk-table')"))
        if at_risk:
            assert browser.eval(in_doc("!!d.getElementById('risk-hidden')"))
        note = browser.eval(in_doc("d.getElementById('customer-access-note').innerText"))
        assert "edit on the DAG customer_tier_sync" in note
        assert browser.eval(in_doc("!d.getElementById('search-form')"))
        body = browser.eval(in_doc("d.body.innerText"))
        assert not any(r["Email"] and r["Email"] in body for r in master)
        assert not any(r["Name"] and r["Name"] in body for r in master)
        browser.screenshot(ARTIFACTS / "loyalty_tiers_viewer.png")
    finally:
        browser.close()


# -- the customer view: sales and the history with the sync's actions ----------------------------------


def store_sales(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every stored sale version, read straight off the order store's Parquet files, by customer
    (each sale under every customer it ever had, as the page reads them)."""
    import pyarrow.parquet as pq

    manifest = json.loads((data_dir / "store" / "manifest.json").read_text())
    rows: list[dict[str, Any]] = []
    for seg in manifest["resources"]["sales"]["segments"]:
        rows += pq.read_table(data_dir / "store" / "segments" / "sales" / seg["name"]).to_pylist()
    by_sale: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_sale.setdefault(str(r["id"]), []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for versions in by_sale.values():
        for cid in {v["customer_id"] for v in versions if v["customer_id"]}:
            out.setdefault(str(cid), []).extend(versions)
    return out


def expected_action(data_dir: Path, key: str, cid: str, tier: str) -> tuple[str, str]:
    """(kind, a word the text must hold) of the sync's action on `cid` in run `key`, from its files."""
    plan_dir = data_dir / "runs" / key / "sync_plan"
    left = json.loads((plan_dir / "left_alone.json").read_text())["customers"]
    if cid in left:
        entry = left[cid]
        return entry["why"], entry["group"] or ""
    plan = json.loads((plan_dir / "plan.json").read_text())
    for ref in plan["refs"]:
        batch = json.loads(Path(ref["ref"]).read_text())
        if any(m["customer_id"] == cid for m in batch["moves"]):
            return "moved", batch["group_name"]
    return ("no_tier", "no tier") if tier == "None" else ("unchanged", tier)


def open_customer(browser: Browser, cid: str, code: str) -> None:
    """Search by customer code (one exact match opens the customer's view); wait for its sales."""
    browser.eval(in_doc("(d.getElementById('search-q').value = '', d.getElementById('search-q').focus())"))
    browser.send("Input.insertText", text=code)
    browser.eval(in_doc("d.getElementById('search-form').requestSubmit()"))
    detail = f"d.querySelector('#customer-detail[data-customer=\"' + {json.dumps(cid)} + '\"]')"
    browser.wait_for(
        in_doc(f"!!{detail} && !!{detail}.querySelector('#sales-counting[data-loaded]') && "
               f"!!{detail}.querySelector('#sales-not-counting[data-loaded]')"),
        what="the customer's view and sales",
    )  # fmt: skip


def shown_sales(browser: Browser, kind: str) -> list[tuple[str, str, str]]:
    return browser.eval(in_doc(
        f"[...d.querySelectorAll('#{kind}-table tbody tr')].map(r => [r.dataset.sale, r.dataset.kind, "
        "r.querySelector('.sale-reason').innerText])"
    ))  # fmt: skip


def test_customer_view_shows_the_sales_and_the_sync_actions(server: Server, demo_data: Path) -> None:
    """The sales that count and those that do not (and why), paged, and each run's tier with what
    the sync did, for customers picked off the files, checked against the oracle and the run folder."""
    from tests import oracle

    binary = ensure_chromium()
    if binary is None:
        pytest.skip(NO_BROWSER)
    master = {r["Customer ID"]: r for r in read_master(demo_data)}
    as_of = oracle.ts(json.loads((demo_data / "latest.json").read_text())["as_of"])
    assert as_of is not None
    sales_of = store_sales(demo_data)
    expected = {cid: oracle.expected_sales(v, cid, as_of) for cid, v in sales_of.items() if cid in master}
    # The customer with the most kinds of sales that do not count, and more than one page of sales.
    cid = max(expected, key=lambda c: (len({r for _, r in expected[c][1]}), len(expected[c][0]) > 10, c))
    counting, not_counting = expected[cid]
    assert counting and not_counting
    keys = sorted(p.name for p in (demo_data / "runs").iterdir())
    protected = next(
        c for c, e in json.loads((demo_data / "runs" / keys[-1] / "sync_plan" / "left_alone.json").read_text())[
            "customers"].items() if e["why"] == "protected" and c in master
    )  # fmt: skip

    browser = Browser(binary, server.home / "chrome-customer")
    try:
        login(browser, server)
        browser.navigate(f"{server.url}/plugin/loyalty-tiers")
        browser.wait_for(in_doc("d.body.dataset.ready === 'true'"), timeout=90, what="the plugin page")
        open_customer(browser, cid, master[cid]["Customer Code"])
        first = shown_sales(browser, "sales-counting")
        assert [(s, k) for s, k, _ in first] == counting[:10]
        assert browser.eval(in_doc("d.getElementById('sales-counting-count').innerText")) == f"{len(counting)} sales"
        assert "add up to the lifetime value" in browser.eval(in_doc("d.getElementById('sales-check').innerText"))
        assert f"${master[cid]['Lifetime Value']}" in browser.eval(
            in_doc("d.getElementById('sales-check').innerText")
        ).replace(",", "")
        reasons = shown_sales(browser, "sales-not-counting")
        assert [(s, k) for s, k, _ in reasons] == not_counting[:10]
        assert all(text.strip() for _, _, text in reasons)
        if len(counting) > 10:  # the next page, older sales
            browser.eval(in_doc("d.getElementById('sales-counting-next').click()"))
            browser.wait_for(in_doc("d.getElementById('sales-counting-page').innerText.startsWith('page 2')"),
                             what="page 2")  # fmt: skip
            assert [(s, k) for s, k, _ in shown_sales(browser, "sales-counting")] == counting[10:20]
        runs = browser.eval(in_doc(
            "[...d.querySelectorAll('#customer-runs tbody tr')].map(r => [r.dataset.run, r.dataset.action, "
            "r.querySelector('.run-action').innerText, r.querySelector('.run-tier').innerText.trim()])"
        ))  # fmt: skip
        assert [r[0] for r in runs] == keys[::-1]
        kind, word = expected_action(demo_data, keys[-1], cid, master[cid]["Tier"])
        assert runs[0][1] == kind and word in runs[0][2] and runs[0][3] == master[cid]["Tier"], runs[0]
        browser.eval(in_doc("d.getElementById('customer-detail').scrollIntoView()"))
        time.sleep(0.5)
        browser.screenshot(ARTIFACTS / "loyalty_tiers_customer.png")

        open_customer(browser, protected, master[protected]["Customer Code"])
        runs = browser.eval(in_doc(
            "[...d.querySelectorAll('#customer-runs tbody tr')].map(r => [r.dataset.action, r.querySelector('.run-action').innerText])"
        ))  # fmt: skip
        kind, group = expected_action(demo_data, keys[-1], protected, master[protected]["Tier"])
        assert kind == "protected" and group in ("Staff", "Wholesale")
        assert runs[0] == ["protected", f"protected: in {group} (not a tier group), never moved"], runs
    finally:
        browser.close()


# -- the "Tier sync" tab of a DAG run ----------------------------------------------------------------


def ui_encode(value: str) -> str:
    """JavaScript's encodeURIComponent, which the UI applies to {DAG_ID} / {RUN_ID} in an href."""
    return quote(value, safe="-_.!~*'()")


def test_run_tab_shows_the_runs_files(server: Server, demo_data: Path) -> None:
    """The dag_run external view inside the Airflow UI: the run page's "Tier sync" tab, its iframe
    at the href the plugin listing gives with the placeholders filled in, opened in headless
    Chromium for the demo's run; every figure shown against the run folder's files."""
    binary = ensure_chromium()
    if binary is None:
        pytest.skip(NO_BROWSER)
    key = sorted(p.name for p in (demo_data / "runs").iterdir())[-1]
    folder = demo_data / "runs" / key
    run_id = json.loads((folder / "run.json").read_text())["run_id"]
    log = json.loads((folder / "tier_sync_log.json").read_text())
    plan = json.loads((folder / "sync_plan" / "plan.json").read_text())
    validation = json.loads((folder / "validation.json").read_text())["summary"]
    with (folder / "tier_changes.csv").open(encoding="utf-8-sig") as fh:
        changes = list(csv.DictReader(fh))

    plugins = client_of(server, VIEWER).get("/api/v2/plugins").json()["plugins"]
    tab = next(v for p in plugins for v in p["external_views"] if v.get("url_route") == "tier-sync-run")
    assert tab["destination"] == "dag_run" and tab["name"] == "Tier sync"

    def src_for(dag_id: str) -> str:
        return tab["href"].replace("{DAG_ID}", ui_encode(dag_id)).replace("{RUN_ID}", ui_encode(run_id))

    browser = Browser(binary, server.home / "chrome-run-tab", height=1800)
    try:
        login(browser, server, VIEWER)  # reading a run's tab needs read access to the DAG only
        browser.navigate(f"{server.url}/dags/customer_tier_sync/runs/{ui_encode(run_id)}/plugin/tier-sync-run")
        browser.wait_for(in_doc("d.body.dataset.ready === 'true'"), timeout=90, what="the run tab in the UI")
        assert browser.eval("document.querySelector('iframe').getAttribute('src')") == src_for("customer_tier_sync")
        assert browser.eval(in_doc("d.getElementById('error').hidden")), browser.eval(
            in_doc("d.getElementById('error').innerText")
        )
        assert browser.eval(in_doc("d.body.dataset.found")) == "folder"

        def shown(elem: str) -> str:
            return str(browser.eval(in_doc(f"d.getElementById('{elem}').innerText")))

        for elem, value in (
            ("sync-written", log["updated"]),
            ("sync-failed", log["errors"]),
            ("sync-skipped", log["skipped"]),
            ("sync-protected", log["protected"]),
            ("sync-changed", log["changed_in_pos"]),
            ("plan-planned", plan["summary"]["planned_moves"]),
            ("moves-changes", len(changes)),
            ("moves-new", sum(1 for c in changes if c["From"] == "")),
        ):
            assert shown(elem) == f"{value:,}", elem
        assert shown("validation-result") == ("Passed" if validation["success"] else "Failed")
        assert "approval" not in plan  # the demo's runs never ask (allow_mass_change, then no change)
        assert shown("approval-status") == "Not needed"
        browser.screenshot(ARTIFACTS / "run_tab.png")

        # The tab is on every DAG's runs (Airflow cannot limit it): another DAG's run is told so.
        browser.navigate(f"{server.url}/dags/daily_report/runs/{ui_encode(run_id)}/plugin/tier-sync-run")
        browser.wait_for(in_doc("d.body.dataset.found === 'other_dag'"), what="another DAG's run tab")
        assert browser.eval("document.querySelector('iframe').getAttribute('src')") == src_for("daily_report")
        assert "not a tier-sync run" in shown("notice-text")
        assert browser.eval(in_doc("d.getElementById('content').hidden"))
    finally:
        browser.close()


ADD_DAG_RUN = """
import sys
from datetime import datetime, timedelta
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from airflow.utils.state import DagRunState
end = datetime.fromisoformat(sys.argv[2])
start = end - timedelta(days=1)
with create_session() as session:
    session.add(DagRun("customer_tier_sync", sys.argv[1], logical_date=start, run_after=end,
                       data_interval=(start, end), run_type="scheduled", state=DagRunState.SUCCESS))
"""


def test_run_tab_finds_a_run_by_airflows_dag_run(server: Server, demo_data: Path) -> None:
    """A run no folder names is placed by the as_of of its DagRun (the api-server's metadata DB):
    here a scheduled run of the demo's day whose folder a later run of that day rewrote."""
    key = sorted(p.name for p in (demo_data / "runs").iterdir())[-1]
    owner = json.loads((demo_data / "runs" / key / "run.json").read_text())["run_id"]
    as_of = datetime.strptime(key, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    run_id = f"scheduled__{(as_of - timedelta(days=1)).isoformat()}"
    added = subprocess.run(
        [sys.executable, "-c", ADD_DAG_RUN, run_id, as_of.isoformat()],
        env=airflow_env(server.home, demo_data), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr[-3000:]
    viewer = client_of(server, VIEWER)
    got = viewer.get(f"/loyalty-tiers/api/runs/{ui_encode(run_id)}", params={"dag_id": "customer_tier_sync"})
    assert got.status_code == 200, got.text[:500]
    body = got.json()
    assert (body["found"], body["key"], body["run_id"]) == ("other_run", key, run_id)
    assert owner in body["message"] and "sync" not in body
    unknown = viewer.get("/loyalty-tiers/api/runs/manual__not-a-run", params={"dag_id": "customer_tier_sync"}).json()
    assert unknown["found"] == "not_found" and unknown["key"] is None
    assert httpx.get(f"{server.url}/loyalty-tiers/api/runs/{ui_encode(run_id)}", timeout=30).status_code == 401
