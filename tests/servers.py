"""Real servers of the protocols a deployment uses, started by tests on free loopback ports and
stopped after: redis-server (the request budget, the Celery broker), moto's S3 API (the data dir)
and `git http-backend` behind Basic auth (a hosted git remote).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A `redis-server` subprocess on a free 127.0.0.1 port, no persistence."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip(
                "redis-server is not installed (apt-get install redis-server): Redis budget not tested"
            )
        self.port = free_port()
        self.password = password
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(directory)] + (["--requirepass", password] if password else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=1)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                if probe.ping():
                    break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("redis-server did not answer PING")
        self.client = probe

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextmanager
def redis_server(directory: Path, password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(directory, password)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 API on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


_GIT = shutil.which("git") or "git"


class _GitHTTPHandler(BaseHTTPRequestHandler):
    """`git http-backend` behind Basic auth (the CGI the git docs describe, minus a web server)."""

    root = ""
    user = "bot"
    token = ""
    auth_headers: list[str] = []

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def _serve(self) -> None:
        header = self.headers.get("Authorization") or ""
        type(self).auth_headers.append(header)
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.token}".encode()).decode()
        if header != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="tiers"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type") or "",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding") or "",
            "REMOTE_USER": self.user,
            "REMOTE_ADDR": "127.0.0.1",
        }
        out = subprocess.run([_GIT, "http-backend"], input=body, env=env, capture_output=True).stdout
        head, sep, content = out.partition(b"\r\n\r\n")
        if not sep:
            head, _, content = out.partition(b"\n\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


@contextmanager
def git_http_server(root: Path, *, user: str, token: str) -> Iterator[tuple[str, list[str]]]:
    """Serve the bare repositories under `root` over http://127.0.0.1:<free port> to `user` with
    password `token`; yields (base URL, the Authorization headers received)."""
    handler: type[_GitHTTPHandler] = type(
        "Handler", (_GitHTTPHandler,), {"root": str(root), "user": user, "token": token, "auth_headers": []}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.auth_headers
    finally:
        server.shutdown()
        server.server_close()
