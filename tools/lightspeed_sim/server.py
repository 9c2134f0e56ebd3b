"""The HTTP side of the simulator: API 2.0 routes, bearer auth, rate limit, faults, admin endpoints.

Real HTTP on 127.0.0.1 (ThreadingHTTPServer, HTTP/1.1 keep-alive) so the pipeline's real client,
retries and timeouts are exercised exactly as against Lightspeed.
"""

from __future__ import annotations

import bisect
import email.utils
import hmac
import logging
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, NamedTuple
from urllib.parse import parse_qs, urlsplit

from tools.lightspeed_sim.faults import Fault, FaultRegistry, RateLimiter
from tools.lightspeed_sim.jsonutil import dumps, loads
from tools.lightspeed_sim.store import SimStore, StoreError

log = logging.getLogger(__name__)

API_PREFIX = "/api/2.0"
ADMIN_PREFIX = "/_sim"
MAX_MEMBERSHIP_IDS = 100
DEFAULT_PAGE_SIZE = 100

_ID = r"([^/]+)"
_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^/customers/?$"), "customers"),
    (re.compile(rf"^/customers/{_ID}/?$"), "customer"),
    (re.compile(r"^/customer_groups/?$"), "groups"),
    (re.compile(rf"^/customer_groups/{_ID}/?$"), "group"),
    (re.compile(rf"^/customer_groups/{_ID}/customers/?$"), "members"),
    (re.compile(r"^/sales/?$"), "sales"),
    (re.compile(rf"^/sales/{_ID}/?$"), "sale"),
]
_ALLOWED = {
    "customers": ("GET",),
    "customer": ("GET", "PUT"),
    "groups": ("GET", "POST"),
    "group": ("GET",),
    "members": ("GET", "POST", "DELETE"),
    "sales": ("GET",),
    "sale": ("GET",),
}


class RequestRecord(NamedTuple):
    """One request the server handled: `status` 0 means the connection was reset (no answer)."""

    method: str
    path: str
    status: int


@dataclass
class Response:
    """What a route produced; `body` None means no body (204)."""

    status: int
    body: Any = None
    headers: dict[str, str] | None = None


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> Response:
    names = {
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        405: "Method Not Allowed",
        429: "Too Many Requests",
        500: "Internal Server Error",
    }
    return Response(status, {"error": names.get(status, "Error"), "message": message})


class SimServer:
    """The simulator: a store served over HTTP, with auth, a rate limit and fault injection.

    Use `start()`/`stop()` (background thread, for tests) or `serve_forever()` (CLI).
    """

    def __init__(
        self,
        store: SimStore | None = None,
        *,
        token: str = "sim-token",
        host: str = "127.0.0.1",
        port: int = 0,
        page_cap: int = 200,
        default_page_size: int = DEFAULT_PAGE_SIZE,
        registers: int = 1,
        rate_limit: int | None = None,
        window_seconds: float = 300.0,
        empty_version: str = "null",
        retry_after: str = "http-date",
        fault_seed: int = 0,
        time_source: Callable[[], float] = time.time,
        log_requests: bool = False,
        membership_bumps_version: bool = True,
        put_semantics: str = "merge",
        put_response: str = "data",
    ) -> None:
        if host != "127.0.0.1":
            raise ValueError("the simulator only listens on 127.0.0.1")
        if empty_version not in ("null", "missing"):
            raise ValueError("empty_version must be 'null' or 'missing'")
        if retry_after not in ("http-date", "seconds"):
            raise ValueError("retry_after must be 'http-date' or 'seconds'")
        if put_semantics not in ("merge", "replace"):
            raise ValueError("put_semantics must be 'merge' or 'replace'")
        if put_response not in ("data", "bare"):
            raise ValueError("put_response must be 'data' or 'bare'")
        if page_cap < 1:
            raise ValueError("page_cap must be >= 1")
        self.store = store if store is not None else SimStore()
        self.token = token
        self.token_expired = False
        self.page_cap = page_cap
        self.default_page_size = default_page_size
        self.registers = registers
        self.empty_version = empty_version
        self.retry_after = retry_after
        self.log_requests = log_requests
        # The API reference leaves open whether a membership call re-stamps the customer's
        # version (§5.1); False serves the variant where it does not (the feed never shows it).
        self.membership_bumps_version = membership_bumps_version
        # PUT /customers/{id} (§4.1, UNCONFIRMED): merge the fields sent or replace the record;
        # answer {"data": customer} or the bare customer.
        self.put_semantics = put_semantics
        self.put_response = put_response
        limit = rate_limit if rate_limit is not None else 300 * registers + 50
        self.rate_limiter = RateLimiter(limit, window_seconds, time_source)
        self._time = time_source
        self.faults = FaultRegistry(fault_seed)
        self.requests: list[RequestRecord] = []
        self._index: dict[str, tuple[tuple[int, int, int], list[int], list[dict[str, Any]]]] = {}
        self._requests_lock = threading.Lock()
        self.stopping = threading.Event()  # ends trickled answers when the server stops
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:8123 (admin endpoints live under /_sim)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """API base URL, what the `lightspeed_default` connection's host must be."""
        return f"{self.url}{API_PREFIX}"

    #: What a client of this server needs besides URL and token: the simulator speaks plain http,
    #: which the client refuses unless the connection opts in (it would send the token in clear).
    CLIENT_OPTIONS: ClassVar[dict[str, Any]] = {"allow_insecure_http": True}

    def airflow_connection(self, token: str, **extra: Any) -> dict[str, Any]:
        """The `lightspeed_default` connection (Airflow JSON form) that points at this simulator."""
        return {
            "conn_type": "http",
            "host": self.base_url,
            "password": token,
            "extra": {**self.CLIENT_OPTIONS, **extra},
        }

    def start(self) -> SimServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="lightspeed-sim"
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until `stop()` (or KeyboardInterrupt)."""
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- controls ----------------------------------------------------------------------------

    def expire_token(self) -> None:
        """The token stops working: every API call answers 401 from now on."""
        self.token_expired = True

    def set_token(self, token: str) -> None:
        """Install a new valid token (un-expires)."""
        self.token = token
        self.token_expired = False

    def record(self, method: str, path: str, status: int) -> None:
        """Append to `requests` (thread-safe)."""
        with self._requests_lock:
            self.requests.append(RequestRecord(method, path, status))

    def authorized(self, header: str | None) -> bool:
        """Bearer token check (constant-time compare)."""
        if self.token_expired or not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def retry_after_value(self, window_end: float) -> str:
        """Retry-After for a 429: the window's end as an HTTP-date (or delta-seconds, if configured)."""
        end = math.ceil(window_end)
        if self.retry_after == "seconds":
            return str(max(1, math.ceil(end - self._time())))
        return email.utils.formatdate(end, usegmt=True)

    # -- routing (called with the store locked) ----------------------------------------------

    def route(self, method: str, sub: str, query: dict[str, list[str]], body: bytes) -> Response:
        """Dispatch one authorised API request to its handler."""
        for pattern, name in _ROUTES:
            m = pattern.match(sub)
            if m is None:
                continue
            if method not in _ALLOWED[name]:
                resp = _error(405, f"{method} not allowed on {sub}")
                resp.headers = {"Allow": ", ".join(_ALLOWED[name])}
                return resp
            handler: Callable[..., Response] = getattr(self, f"_{name}_{method.lower()}")
            try:
                return handler(*m.groups(), query=query, body=body)
            except _BadRequest as exc:
                return _error(exc.status, str(exc))
            except StoreError as exc:
                return _error(exc.status, str(exc))
        return _error(404, f"no route for {sub}")

    # lists ------------------------------------------------------------------------------------

    def _sorted(self, kind: str, records: dict[str, dict[str, Any]]) -> tuple[list[int], list[dict[str, Any]]]:
        """Records of one resource in version order, cached until the version counter moves.

        Every write takes a new version from the store, so (counter, size, dict identity) changing
        is what invalidates the index; big stores then page in O(page) instead of O(store).
        """
        key = (id(records), self.store.next_version, len(records))
        cached = self._index.get(kind)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        ordered = sorted(records.values(), key=lambda r: int(r["version"]))
        versions = [int(r["version"]) for r in ordered]
        self._index[kind] = (key, versions, ordered)
        return versions, ordered

    def _page(
        self,
        kind: str,
        records: dict[str, dict[str, Any]],
        query: dict[str, list[str]],
        keep: Callable[[dict[str, Any]], bool] | None = None,
    ) -> Response:
        after = _int_param(query, "after", 0) or 0
        before = _int_param(query, "before", None)
        size = _int_param(query, "page_size", self.default_page_size)
        if size is None or size < 1:
            raise _BadRequest("page_size must be a positive integer")
        size = min(size, self.page_cap)
        versions, ordered = self._sorted(kind, records)
        page: list[dict[str, Any]] = []
        for i in range(bisect.bisect_right(versions, after), len(ordered)):
            if before is not None and versions[i] >= before:
                break
            if keep is None or keep(ordered[i]):
                page.append(ordered[i])
                if len(page) >= size:
                    break
        envelope: dict[str, Any] = {"data": page}
        if page:
            envelope["version"] = {"min": int(page[0]["version"]), "max": int(page[-1]["version"])}
        elif self.empty_version == "null":
            envelope["version"] = {"min": None, "max": None}
        return Response(200, envelope)

    def _customers_get(self, *, query: dict[str, list[str]], body: bytes) -> Response:
        keep = None if _bool_param(query, "deleted") else _live
        return self._page("customers", self.store.customers, query, keep)

    def _groups_get(self, *, query: dict[str, list[str]], body: bytes) -> Response:
        keep = None if _bool_param(query, "deleted") else _live
        return self._page("groups", self.store.groups, query, keep)

    def _sales_get(self, *, query: dict[str, list[str]], body: bytes) -> Response:
        # Deleted sales are included without being asked (the one live capture shows them).
        return self._page("sales", self.store.sales, query)

    def _members_get(self, group_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        self._group_or_404(group_id)

        def keep(customer: dict[str, Any]) -> bool:
            return customer.get("customer_group_id") == group_id and customer.get("deleted_at") is None

        return self._page("customers", self.store.customers, query, keep)

    # single records ---------------------------------------------------------------------------

    def _customer_get(self, customer_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        customer = self.store.customers.get(customer_id)
        if customer is None:
            return _error(404, "Customer not found")
        return Response(200, {"data": customer})

    def _customer_put(self, customer_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        payload = _json_object(body)
        if isinstance(payload.get("data"), dict) and len(payload) == 1:
            payload = payload["data"]
        customer = self.store.update_customer(customer_id, payload, replace=self.put_semantics == "replace")
        return Response(200, customer if self.put_response == "bare" else {"data": customer})

    def _group_get(self, group_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        group = self.store.groups.get(group_id)
        if group is None:
            return _error(404, "Customer group not found")
        return Response(200, {"data": group})

    def _groups_post(self, *, query: dict[str, list[str]], body: bytes) -> Response:
        payload = _json_object(body)
        name = payload.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _BadRequest("name is required")
        code = payload.get("group_id")
        if code is not None and not isinstance(code, str):
            raise _BadRequest("group_id must be a string")
        return Response(201, {"data": self.store.create_group(name, code)})

    def _sale_get(self, sale_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        sale = self.store.sales.get(sale_id)
        if sale is None:
            return _error(404, "Sale not found")
        return Response(200, {"data": sale})

    # membership -------------------------------------------------------------------------------

    def _group_or_404(self, group_id: str) -> dict[str, Any]:
        group = self.store.live_group(group_id)
        if group is None:
            raise _BadRequest("Customer group not found", 404)
        return group

    def _member_ids(self, body: bytes) -> list[dict[str, Any]]:
        """Validate `{"customer_ids": [...]}`: 1..100 ids, every one a live customer, else 400."""
        payload = _json_object(body)
        ids = payload.get("customer_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _BadRequest("customer_ids must be a non-empty array of customer ids")
        if len(ids) > MAX_MEMBERSHIP_IDS:
            raise _BadRequest(f"at most {MAX_MEMBERSHIP_IDS} customer_ids per request")
        unknown = [i for i in ids if self.store.live_customer(i) is None]
        if unknown:
            raise _BadRequest(f"unknown or deleted customer ids: {', '.join(unknown[:10])}")
        customers: dict[str, dict[str, Any]] = {}
        for i in ids:
            customers[i] = self.store.customers[i]
        return list(customers.values())

    def _members_post(self, group_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        self._group_or_404(group_id)
        for customer in self._member_ids(body):
            self._set_group(customer, group_id)
        return Response(201, True)

    def _set_group(self, customer: dict[str, Any], group_id: str) -> None:
        """A membership call's change: stamped (the default) or, in that variant, version kept."""
        if self.membership_bumps_version:
            self.store.set_customer_group(customer, group_id)
            return
        with self.store.lock:
            customer["customer_group_id"] = group_id

    def _members_delete(self, group_id: str, *, query: dict[str, list[str]], body: bytes) -> Response:
        self._group_or_404(group_id)
        customers = self._member_ids(body)
        default = self.store.default_group_id()
        if default is None:
            raise _BadRequest("store has no default customer group", 500)
        for customer in customers:
            if customer.get("customer_group_id") == group_id:
                self._set_group(customer, default)
        return Response(204)

    # -- admin (no auth, no rate limit, not recorded) ------------------------------------------

    def admin(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        """Out-of-process control: /_sim/faults, /_sim/state, /_sim/requests, /_sim/token, /_sim/move."""
        sub = path[len(ADMIN_PREFIX) :].rstrip("/")
        routes: dict[tuple[str, str], Callable[[bytes], Response]] = {
            ("/faults", "GET"): lambda _: Response(200, {"data": [f.as_dict() for f in self.faults.faults]}),
            ("/faults", "POST"): self._admin_add_fault,
            ("/faults", "DELETE"): lambda _: self._admin_done(self.faults.clear),
            # exact decimals, taken under the store lock
            ("/state", "GET"): lambda _: Response(200, self.store.dumps().encode("utf-8"), {"Content-Type": "application/json"}),
            ("/requests", "GET"): lambda _: Response(200, {"data": self._request_rows()}),
            ("/token", "POST"): self._admin_token,
            ("/move", "POST"): self._admin_move,
            ("/rate_limit", "DELETE"): lambda _: self._admin_done(self.rate_limiter.reset),
        }
        route = routes.get((sub, method))
        if route is None:
            return _error(404, f"no admin route {method} {path}")
        try:
            return route(body)
        except (_BadRequest, StoreError) as exc:
            return _error(exc.status, str(exc))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))

    @staticmethod
    def _admin_done(action: Callable[[], object]) -> Response:
        action()
        return Response(204)

    def _request_rows(self) -> list[list[Any]]:
        with self._requests_lock:
            return [list(r) for r in self.requests]

    def _admin_add_fault(self, body: bytes) -> Response:
        spec = _json_object(body)
        allowed = {"kind", "method", "path", "times", "probability", "status", "body", "seconds"}
        allowed |= {"chunk_bytes", "skip"}
        extra = set(spec) - allowed
        if extra:
            raise _BadRequest(f"unknown fault fields: {sorted(extra)}")
        kwargs = {k: v for k, v in spec.items() if k != "kind"}
        for key in ("probability", "seconds"):
            if kwargs.get(key) is not None:
                kwargs[key] = float(kwargs[key])
        fault = self.faults.add(str(spec.get("kind")), **kwargs)
        return Response(201, {"data": fault.as_dict()})

    def _admin_token(self, body: bytes) -> Response:
        spec = _json_object(body)
        if spec.get("expire"):
            self.expire_token()
        if isinstance(spec.get("token"), str):
            self.set_token(spec["token"])
        return Response(200, {"data": {"expired": self.token_expired}})

    def _admin_move(self, body: bytes) -> Response:
        spec = _json_object(body)
        customer = self.store.move_customer_to_group(str(spec.get("customer_id")), str(spec.get("group_id")))
        return Response(200, {"data": customer})


def _live(record: dict[str, Any]) -> bool:
    return record.get("deleted_at") is None


def _int_param(query: dict[str, list[str]], name: str, default: int | None) -> int | None:
    values = query.get(name)
    if not values or values[-1] == "":
        return default
    try:
        return int(values[-1])
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None


def _bool_param(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    return bool(values) and values is not None and values[-1].lower() in ("true", "1", "yes")


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise _BadRequest("a JSON object body is required")
    try:
        payload = loads(body)
    except ValueError:
        raise _BadRequest("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise _BadRequest("body must be a JSON object")
    return payload


_HTML_PAGES = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _pause(stopping: threading.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stopping` is set (then True). Sleeps in short steps instead of
    `stopping.wait(seconds)`: under libfaketime (make test-calendar) a timed Event.wait waits on a
    kernel clock that faketime does not move, i.e. for the faked offset (a year), not `seconds`."""
    deadline = time.monotonic() + max(0.0, seconds)
    while not stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.01))
    return True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], sim: SimServer) -> None:
        self.sim = sim
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LightspeedSim/1.0"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls on keep-alive connections
    server: _HTTPServer
    _headers_buffer: list[bytes]  # set by BaseHTTPRequestHandler.send_response (not in typeshed)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.sim.log_requests:
            log.info("%s %s", self.address_string(), format % args)

    # -- plumbing --------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self, resp: Response, extra_headers: dict[str, str] | None = None, trickle: Fault | None = None
    ) -> None:
        headers = dict(extra_headers or {})
        headers.update(resp.headers or {})
        self.send_response(resp.status)
        for key, value in headers.items():
            self.send_header(key, value)
        if resp.status == 204 or resp.body is None:
            if resp.status != 204:
                self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(resp.body, str):
            payload = resp.body.encode("utf-8")
            content_type = "text/html; charset=utf-8"
        elif isinstance(resp.body, bytes):
            payload = resp.body
            content_type = "text/html; charset=utf-8"
        else:
            payload = dumps(resp.body).encode("utf-8")
            content_type = "application/json"
        if "Content-Type" not in headers:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if trickle is not None:
            self.end_headers()
            self._trickle(payload, trickle)
            return
        # Headers and body in one write (one TCP segment for small answers).
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(payload)
        self.flush_headers()

    def _trickle(self, payload: bytes, fault: Fault) -> None:
        """Send the body `chunk_bytes` at a time, `seconds` apart (a slow edge); stop when the client
        hangs up or the server stops, leaving the body incomplete."""
        stopping = self.server.sim.stopping
        for start in range(0, len(payload), fault.chunk_bytes):
            if _pause(stopping, fault.seconds):
                self.close_connection = True
                return
            try:
                self.wfile.write(payload[start : start + fault.chunk_bytes])
                self.wfile.flush()
            except OSError:  # the client gave up (its deadline): nothing more to send
                self.close_connection = True
                return

    def _reset(self) -> None:
        """Abort the connection with a TCP RST and no response at all."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _dispatch(self) -> None:
        sim = self.server.sim
        method = self.command.upper()
        split = urlsplit(self.path)
        path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        body = self._read_body()

        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            self._send(sim.admin(method, path, query, body))
            return
        if not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            sim.record(method, path, 404)
            self._send(_error(404, f"no route for {path}"))
            return
        sub = path[len(API_PREFIX) :] or "/"

        if not sim.authorized(self.headers.get("Authorization")):
            headers = {
                "X-RateLimit-Limit": str(sim.rate_limiter.limit),
                "X-RateLimit-Remaining": str(sim.rate_limiter.peek()),
                "WWW-Authenticate": 'Bearer realm="api"',
            }
            sim.record(method, path, 401)
            self._send(_error(401, "The access token is missing, invalid or expired"), headers)
            return

        allowed, remaining, window_end = sim.rate_limiter.hit()
        headers = {"X-RateLimit-Limit": str(sim.rate_limiter.limit), "X-RateLimit-Remaining": str(remaining)}
        if not allowed:
            headers["Retry-After"] = sim.retry_after_value(window_end)
            sim.record(method, path, 429)
            self._send(Response(429, {"error": "Too Many Requests", "message": "Rate limiting enforced"}), headers)
            return

        fault = sim.faults.match(method, sub, path)
        if fault is not None and fault.kind == "reset":
            sim.record(method, path, 0)
            self._reset()
            return
        if fault is not None and fault.kind == "latency":
            time.sleep(max(0.0, fault.seconds))
        if fault is not None and fault.kind == "status":
            sim.record(method, path, fault.status)
            self._send(_fault_response(fault), headers)
            return

        with sim.store.lock:
            try:
                resp = sim.route(method, sub, query, body)
            except Exception:  # a simulator bug must still produce an HTTP answer
                log.exception("simulator error on %s %s", method, sub)
                resp = _error(500, "simulator error")
            if fault is not None and fault.kind == "apply_then_500":
                resp = _error(500, "Internal Server Error")
            if fault is not None and fault.kind == "creep":
                resp = _creep(fault, resp, query)
            # Encode under the lock so a concurrent write cannot change a record mid-serialisation.
            if resp.body is not None and not isinstance(resp.body, str | bytes):
                resp = Response(resp.status, dumps(resp.body).encode("utf-8"), resp.headers)
                headers["Content-Type"] = "application/json"
        sim.record(method, path, resp.status)
        self._send(resp, headers, trickle=fault if fault is not None and fault.kind == "trickle" else None)


def _creep(fault: Fault, resp: Response, query: dict[str, list[str]]) -> Response:
    """A feed whose cursor creeps: the first non-empty page this rule sees is served and pinned;
    every later fire answers the same records with `version.max` = the request's `after` + 1."""
    body = resp.body
    if resp.status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return resp
    if fault.pinned is None:
        if body["data"]:
            fault.pinned = list(body["data"])
        return resp
    after = _int_param(query, "after", 0) or 0
    version_min = min(int(r["version"]) for r in fault.pinned)
    return Response(200, {"data": fault.pinned, "version": {"min": version_min, "max": after + 1}})


def _fault_response(fault: Fault) -> Response:
    if fault.body is None:
        reason = _HTML_PAGES.get(fault.status, "Error")
        return Response(fault.status, f"<html><body><h1>{fault.status} {reason}</h1></body></html>\n")
    return Response(fault.status, fault.body)
