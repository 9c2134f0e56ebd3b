"""Issue 13's boundaries: what `tier_sync_data_dir` may name, and how Data Docs are served.

The api-server reads files from the data dir and serves Data Docs from it on the Airflow origin:
an http:// data dir made /data-docs a proxy (it served a fake cloud-metadata response), and the
Data Docs HTML ran as active content next to the viewer's Airflow session.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import dashboard, settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ENV = "AIRFLOW_VAR_TIER_SYNC_DATA_DIR"
SECRET = "wJalrXUtnFEMI-s3cr3t"


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    dashboard.clear_cache()  # the page caches the resolved Variable for 30 s
    yield
    dashboard.clear_cache()


# -- the data dir ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "scheme"),
    [
        ("http://169.254.169.254/latest/meta-data", "'http'"),
        ("https://example.org/tier-sync", "'https'"),
        ("ftp://files.example.org/tier-sync", "'ftp'"),
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/tier-sync", "s3://"),
        (f"s3://{SECRET}+x@bucket/tier-sync", "s3://"),
        ("s3://bucket/tier-sync?endpoint_url=http://169.254.169.254", "s3://"),
        ("s3://bucket/tier-sync#frag", "s3://"),
        ("simplecache::s3://bucket/tier-sync", None),
        ("file://metadata.internal/etc", "file://"),
        ("gs:///tier-sync", "gs://"),  # no bucket
        ("relative/tier_sync_data", None),
        ("./tier_sync_data", None),
    ],
)
def test_data_dir_refuses_anything_but_local_or_object_storage(
    monkeypatch: pytest.MonkeyPatch, value: str, scheme: str | None
) -> None:
    monkeypatch.setenv(ENV, value)
    for resolve in (settings.data_dir, dashboard.resolve_data_dir):  # tasks, and the page
        dashboard.clear_cache()
        with pytest.raises(ValueError, match="tier_sync_data_dir") as caught:
            resolve()
        message = str(caught.value)
        if scheme is not None:
            assert scheme in message, message
        assert SECRET not in message and "AKIAEXAMPLE" not in message and value not in message


def test_a_relative_path_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "data")
    with pytest.raises(ValueError, match="tier_sync_data_dir.*relative path.*absolute path"):
        settings.data_dir()


def test_unset_data_dir_needs_an_absolute_airflow_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "")  # blank: the default under AIRFLOW_HOME
    monkeypatch.setenv("AIRFLOW_HOME", "relative-home")
    with pytest.raises(ValueError, match="tier_sync_data_dir.*AIRFLOW_HOME"):
        settings.data_dir()


@pytest.mark.parametrize(
    "value",
    [
        "s3://bucket/x",
        "/abs/path",
        "file:///abs",
        "gs://bucket/tier-sync",
        "abfs://container@account.dfs.core.windows.net/tier-sync",
        "memory://somewhere",  # tests only: fsspec's in-process store
    ],
)
def test_data_dir_accepts_local_paths_and_object_storage(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV, value)
    assert settings.check_data_dir(value) == value
    assert settings.data_dir() == value
    assert dashboard.resolve_data_dir() == value


# -- the page: Data Docs responses and a refused data dir ----------------------------------------------


@pytest.fixture
def plugin_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    sys.modules.pop("loyalty_tiers.app", None)
    from loyalty_tiers.app import app, require_user  # type: ignore[import-not-found]

    app.dependency_overrides[require_user] = lambda: {"name": "test"}
    try:
        yield app
    finally:
        app.dependency_overrides.clear()


def _directives(response: Any) -> dict[str, str]:
    policy = response.headers.get("content-security-policy") or ""
    out = {}
    for part in policy.split(";"):
        name, _, value = part.strip().partition(" ")
        if name:
            out[name] = value.strip()
    return out


def test_data_docs_are_sandboxed_and_not_sniffed(
    plugin_app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    docs = tmp_path / "validation" / "data_docs"
    (docs / "static").mkdir(parents=True)
    (docs / "index.html").write_text("<html><script>fetch('/api/v2/variables')</script>docs</html>")
    (docs / "static" / "style.css").write_text("body { color: black }")
    (docs / "notes").write_text("<html><script>alert(1)</script></html>")  # no extension
    monkeypatch.setenv(ENV, str(tmp_path))
    client = TestClient(plugin_app)
    responses = {
        path: client.get(f"/data-docs/{path}")
        for path in ("index.html", "static/style.css", "notes", "missing.html")
    }
    assert responses["index.html"].status_code == 200 and "docs" in responses["index.html"].text
    assert responses["static/style.css"].status_code == 200
    assert responses["notes"].headers["content-type"] == "application/octet-stream"
    assert responses["missing.html"].status_code == 404
    for path, response in responses.items():
        policy = _directives(response)
        assert policy.get("sandbox") == "", (path, policy)  # no allow-scripts, no allow-same-origin
        assert policy.get("default-src") == "'none'", (path, policy)
        assert "script-src" not in policy and "allow-scripts" not in str(policy), (path, policy)
        assert response.headers.get("x-content-type-options") == "nosniff", path
        assert response.headers.get("cache-control") == "no-store", path


class _FakeMetadata(BaseHTTPRequestHandler):
    """Answers everything like a cloud metadata service would; counts what it was asked."""

    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = json.dumps({"AccessKeyId": "ASIAFAKE", "SecretAccessKey": SECRET}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def metadata_server() -> Iterator[tuple[str, list[str]]]:
    _FakeMetadata.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data", _FakeMetadata.hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_an_http_data_dir_is_refused_by_the_page_without_a_request(
    plugin_app: Any, metadata_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    url, hits = metadata_server
    monkeypatch.setenv(ENV, url)
    client = TestClient(plugin_app)
    docs = client.get("/data-docs/index.html")
    summary = client.get("/api/summary")
    for response in (docs, summary):
        assert response.status_code == 500
        detail = response.json()["detail"]
        assert "tier_sync_data_dir" in detail and "'http'" in detail, detail
        assert SECRET not in response.text and url not in response.text
    assert _directives(docs).get("sandbox") == "" and docs.headers["x-content-type-options"] == "nosniff"
    assert hits == []  # nothing was fetched from the URL
