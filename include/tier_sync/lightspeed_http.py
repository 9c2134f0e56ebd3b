"""The HTTP step under the Lightspeed client: send one logical request safely, get parsed JSON back.

It exists apart from `lightspeed.py` (the API calls: pagination, customer groups, customers) so the
hard part of talking to X-Series can be read in one place: bearer auth on one `requests.Session`
(the token checked first; plain http only to a local host), a socket timeout and a wall-clock
deadline per attempt (a timeout alone lets a trickling server hold a request for ever), bounded
retries with jittered exponential backoff on 5xx / timeouts / network errors / 2xx bodies that are
not the endpoint's shape (`expect`), 429 waits until `Retry-After` (HTTP-date or seconds, capped),
pacing when `X-RateLimit-Remaining` runs low, the optional shared `RequestBudget`, 401/403
failing fast with the connection named, the `ApiStats` counters, and Decimal-exact JSON both ways.
Every requests / urllib3 exception becomes one of our errors, its message method, path and status.

`HttpTransport` is the base of `LightspeedClient`, never used on its own: the client is still one
object, with one session, one set of counters and one pacer. Stdlib + requests (urllib3) only.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from include.tier_sync.lightspeed_errors import (
    LightspeedAuthError,
    LightspeedClientError,
    LightspeedConfigError,
    LightspeedError,
    LightspeedNotFound,
    LightspeedProtocolError,
    LightspeedRateLimited,
    LightspeedTimeout,
    LightspeedUnavailable,
)
from include.tier_sync.rate_budget import WINDOW_SECONDS, RequestBudget, store_limit

# The client's logger, not __name__: every line the client logs keeps the one name it always had.
log = logging.getLogger("include.tier_sync.lightspeed")

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 5
MAX_RETRY_AFTER = 360.0  # one 5-minute window plus slack; a longer Retry-After is not believed
MAX_BACKOFF = 60.0
LOW_REMAINING_FRACTION = 0.05  # pace once fewer than 5 % of the window's requests are left
MAX_PACING_PAUSE = 30.0
DEFAULT_REQUEST_DEADLINE = 120.0  # wall clock per attempt, headers to the body's last byte
READ_CHUNK = 64 * 1024

# Sent again after a backoff; any other requests exception cannot be cured by re-sending.
_RETRYABLE_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
# What reading a streamed body can raise (urllib3 wraps socket and http.client errors).
_BODY_READ_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


# -- counters and pacing state ---------------------------------------------------------------------


@dataclass
class ApiStats:
    """Counts for the run report: every HTTP attempt, every 429 received, every re-send."""

    requests: int = 0
    rate_limited: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "rate_limited": self.rate_limited, "retries": self.retries}


@dataclass
class _Pacer:
    """When the server says few requests are left, spread the rest instead of running into 429."""

    not_before: float = 0.0
    last_remaining: int | None = None
    last_limit: int | None = None
    pauses: list[float] = field(default_factory=list)


# -- JSON and header values ------------------------------------------------------------------------


def _loads(raw: bytes) -> Any:
    """Parse a JSON body with Decimal floats; an empty body is None."""
    if not raw or not raw.strip():
        return None
    return json.loads(raw, parse_float=Decimal)


def dumps_exact(body: Any) -> str:
    """JSON-encode `body`, writing each Decimal as the exact number it holds (never via float).

    `json` cannot emit a Decimal as a bare number, so each one is swapped for a unique string token,
    encoded, and the quoted token replaced by the Decimal's own text.
    """
    salt = uuid.uuid4().hex
    numbers: dict[str, str] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, Decimal):
            if not value.is_finite():
                raise ValueError(f"cannot send a non-finite number: {value}")
            token = f"__dec_{salt}_{len(numbers)}__"
            numbers[token] = str(value)
            return token
        if isinstance(value, Mapping):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(body), separators=(",", ":"))
    for token, number in numbers.items():
        text = text.replace(f'"{token}"', number)
    return text


def int_or_none(value: Any) -> int | None:
    """An int from a header or JSON value; None when missing, a bool, or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP-date. None when unusable."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


# -- what the connection may send, and where -------------------------------------------------------


def clean_token(token: str | None, conn_id: str) -> str:
    """The token without surrounding whitespace; refused when empty or with anything but visible ASCII
    inside (a pasted line break would otherwise reach a header, and requests' error would echo it).
    The message names the connection, never the value."""
    text = (token or "").strip()
    if not text:
        raise LightspeedAuthError(
            f"Lightspeed connection '{conn_id}' has no token: set its password to a personal token",
            status=401,
        )
    if any(not "!" <= ch <= "~" for ch in text):
        raise LightspeedAuthError(
            f"The token of Lightspeed connection '{conn_id}' contains whitespace, control or non-ASCII "
            "characters (a line break or space pasted inside it?): store only the personal token as the "
            f"password of connection '{conn_id}'",
            status=None,
        )
    return text


def check_base_url(base_url: str, conn_id: str, *, allow_insecure_http: bool = False) -> str:
    """The API base URL, refused when the token could leak: plain http (unless the connection opts
    in with `allow_insecure_http`, for a local test server), credentials, a query or a fragment. Messages never echo
    the URL, only the scheme and host."""
    url = base_url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        host, has_credentials, parts = "", False, urlsplit("")
    where = f"Lightspeed connection '{conn_id}'"
    if parts.scheme not in ("http", "https") or not host:
        raise LightspeedConfigError(f"{where}: the API base URL must look like https://<host>/api/2.0")
    if has_credentials or parts.query or parts.fragment:
        raise LightspeedConfigError(
            f"{where}: the API base URL must not carry credentials, a query or a fragment; "
            "put the personal token in the connection's password"
        )
    if parts.scheme == "http" and not allow_insecure_http:
        raise LightspeedConfigError(
            f"{where} points at plain http://{host}: the token would travel unencrypted. Use https, or, "
            "for a local test server only (such as the project's simulator), set the connection extra "
            "allow_insecure_http: true"
        )
    return url


# -- one attempt -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """A complete HTTP answer: the status, the headers we read (rate limit, Retry-After), the body."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class _AttemptFailed(Exception):
    """No complete answer (network, timeout, deadline). Holds only safe words: an exception's type
    name, never its message, which can carry a URL or a header value."""

    def __init__(self, what: str, error: type[LightspeedError], *, retryable: bool = True) -> None:
        super().__init__(what)
        self.what = what
        self.error = error
        self.retryable = retryable


def _read_body(raw: Any, deadline: float, seconds: float, monotonic: Callable[[], float]) -> bytes:
    """The whole body, read a socket read at a time (`read1`), the deadline checked between reads:
    a server sending a byte now and then never holds us past deadline + one read timeout."""
    read = getattr(raw, "read1", None) or raw.read
    chunks: list[bytes] = []
    while True:
        if monotonic() > deadline:
            raise _AttemptFailed(f"no complete answer within the {seconds:g} s deadline", LightspeedTimeout)
        chunk = read(READ_CHUNK, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- the transport ---------------------------------------------------------------------------------


class HttpTransport:
    """Sends requests for `LightspeedClient` (its base class; callers use the client, not this).

    Owns the session (bearer token checked and set once, never logged, never in `repr`), the retry,
    deadline and rate-limit settings, `stats`, and the pacer. `sleep`, `clock` (epoch seconds) and
    `rng` are injectable so tests never really wait; the deadline runs on the real monotonic clock.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        conn_id: str,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        registers: int = 1,
        budget: RequestBudget | None = None,
        max_rate_limit_waits: int | None = None,
        max_retry_after: float = MAX_RETRY_AFTER,
        rate_window_seconds: float = WINDOW_SECONDS,
        low_remaining_fraction: float = LOW_REMAINING_FRACTION,
        backoff_base: float = 1.0,
        request_deadline_seconds: float = DEFAULT_REQUEST_DEADLINE,
        allow_insecure_http: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
    ) -> None:
        token = clean_token(token, conn_id)
        self.base_url = check_base_url(base_url, conn_id, allow_insecure_http=allow_insecure_http)
        self.conn_id = conn_id
        self.timeout = float(timeout)
        self.request_deadline_seconds = float(request_deadline_seconds)
        if not (self.timeout > 0 and self.request_deadline_seconds > 0):
            raise LightspeedConfigError(
                f"Lightspeed connection '{conn_id}': timeout and request_deadline_seconds must be > 0"
            )
        self.max_retries = max(0, int(max_retries))
        # 429s are the server asking us to wait, not a failure: allow a few more of them.
        self.max_rate_limit_waits = (
            max(self.max_retries, 8) if max_rate_limit_waits is None else max(0, max_rate_limit_waits)
        )
        self.max_retry_after = float(max_retry_after)
        # The server's window (5 min on X-Series; short in simulator tests) and when to start pacing
        # (0 turns header pacing off).
        self.rate_window_seconds = float(rate_window_seconds)
        self.low_remaining_fraction = max(0.0, float(low_remaining_fraction))
        self.backoff_base = float(backoff_base)
        self.registers = max(1, int(registers))
        self.budget = budget
        self.stats = ApiStats()
        self._sleep = sleep
        self._clock = clock
        self._monotonic = time.monotonic
        self._rng = rng or random.Random()
        self._pacer = _Pacer()
        self._session = session or requests.Session()
        self._session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "customer-tier-sync/0.1 (python-requests)",
            }
        )

    def close(self) -> None:
        self._session.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        idempotent: bool = True,
        expect: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """Send one logical request with budget, pacing, deadline and bounded retries; parsed JSON back.

        `expect(body)` names what is wrong with a 2xx body for this endpoint (None: it is fine); such
        a body, like one that is not JSON, is a `LightspeedProtocolError`, retried like a 5xx.
        """
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        data = dumps_exact(json_body).encode("utf-8") if json_body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        failures = 0
        waits_429 = 0
        while True:
            self._wait_for_pacing()
            if self.budget is not None:
                self.budget.acquire()
            self.stats.requests += 1
            try:
                answer = self._send_once(method, url, params=params, data=data, headers=headers)
            except _AttemptFailed as failed:
                # A non-idempotent write may have been applied before the error: its caller decides.
                if not failed.retryable:
                    self._fail(failed.error, method, path, failed.what, None)
                failures = self._retry_transient(
                    method, path, failed.what, failures, idempotent, error=failed.error
                )
                continue

            status = answer.status
            self._observe_rate_headers(answer.headers)
            if 200 <= status < 300:
                body, problem = _check_2xx(answer.content, expect)
                if problem is None:
                    return body
                what, error = f"{status} but {problem}", LightspeedProtocolError
                failures = self._retry_transient(
                    method, path, what, failures, idempotent, status, error=error
                )
                continue
            if status == 429:
                waits_429 = self._wait_after_429(method, path, answer, waits_429)
                continue
            self._raise_for_refusal(method, path, status)
            # 5xx (and anything unexpected, e.g. a 3xx we did not follow): transient.
            failures = self._retry_transient(method, path, str(status), failures, idempotent, status)

    def _send_once(self, method: str, url: str, **send: Any) -> _Answer:
        """One HTTP attempt, read to the end within `request_deadline_seconds`, or `_AttemptFailed`.

        The failure is raised outside the `except`, so no requests exception (its message can hold a
        URL or a header value) is chained to what we raise.
        """
        deadline = self._monotonic() + self.request_deadline_seconds
        failed: _AttemptFailed | None = None
        try:
            timeout = min(self.timeout, self.request_deadline_seconds)
            resp = self._session.request(method, url, **send, timeout=timeout, stream=True)
        except requests.Timeout as exc:
            failed = _AttemptFailed(type(exc).__name__, LightspeedTimeout)
        except _RETRYABLE_NETWORK_ERRORS as exc:
            failed = _AttemptFailed(type(exc).__name__, LightspeedUnavailable)
        except (requests.RequestException, ValueError) as exc:  # a request that cannot be built or sent
            what = f"could not send the request ({type(exc).__name__})"
            failed = _AttemptFailed(what, LightspeedConfigError, retryable=False)
        except _BODY_READ_ERRORS as exc:  # not wrapped by requests (rare): a network failure all the same
            failed = _AttemptFailed(type(exc).__name__, LightspeedUnavailable)
        if failed is not None:
            raise failed
        try:
            content = _read_body(resp.raw, deadline, self.request_deadline_seconds, self._monotonic)
        except urllib3.exceptions.ReadTimeoutError as exc:
            failed = _AttemptFailed(type(exc).__name__, LightspeedTimeout)
        except urllib3.exceptions.DecodeError as exc:
            failed = _AttemptFailed(f"{type(exc).__name__} (body not decodable)", LightspeedProtocolError)
        except _BODY_READ_ERRORS as exc:
            failed = _AttemptFailed(f"{type(exc).__name__} while reading the body", LightspeedUnavailable)
        finally:
            resp.close()  # after a complete read the connection is already back in the pool
        if failed is not None:
            raise failed
        return _Answer(resp.status_code, resp.headers, content)

    def _fail(
        self, error: type[LightspeedError], method: str, path: str, what: str, status: int | None
    ) -> NoReturn:
        log.error("Lightspeed %s %s -> %s", method, path, what)
        message = f"Lightspeed {method} {path} -> {what} on connection '{self.conn_id}'"
        raise error(message, status, method=method, path=path)

    def _raise_for_refusal(self, method: str, path: str, status: int) -> None:
        """401/403, 404 and other 4xx (not 429) raise at once: re-sending cannot change the answer."""
        where = {"method": method, "path": path}
        if status in (401, 403):
            log.error("Lightspeed %s %s -> %d", method, path, status)
            what = "rejected the token" if status == 401 else "refused access (missing scope?)"
            raise LightspeedAuthError(
                f"Lightspeed {what} of connection '{self.conn_id}' ({status}) on {method} {path}: "
                f"regenerate the personal token (Setup > Personal Tokens) and store it as the "
                f"password of Airflow connection '{self.conn_id}'",
                status=status,
                **where,
            )
        if status == 404:
            log.info("Lightspeed %s %s -> 404", method, path)
            raise LightspeedNotFound(
                f"Lightspeed {method} {path}: not found (connection '{self.conn_id}')", status=404, **where
            )
        if 400 <= status < 500:
            log.warning("Lightspeed %s %s -> %d", method, path, status)
            raise LightspeedClientError(
                f"Lightspeed {method} {path} refused with {status} (connection '{self.conn_id}')",
                status=status,
                **where,
            )

    def _wait_after_429(self, method: str, path: str, answer: _Answer, waits_429: int) -> int:
        """Wait as long as the 429 asks (shared budget blocked too); raise once the waits are spent."""
        self.stats.rate_limited += 1
        wait = self._retry_after(answer, waits_429)
        if waits_429 >= self.max_rate_limit_waits:
            log.error("Lightspeed %s %s -> 429 (after %d waits)", method, path, waits_429)
            raise LightspeedRateLimited(
                f"Lightspeed {method} {path}: still rate limited (429) on connection "
                f"'{self.conn_id}' after {waits_429} waits",
                status=429,
                method=method,
                path=path,
            )
        waits_429 += 1
        log.warning(
            "Lightspeed %s %s -> 429; waiting %.1f s (wait %d/%d)",
            method,
            path,
            wait,
            waits_429,
            self.max_rate_limit_waits,
        )
        if self.budget is not None:
            self.budget.block_until(self._clock() + wait)
        self.stats.retries += 1
        self._sleep(wait)
        return waits_429

    def _retry_transient(
        self,
        method: str,
        path: str,
        what: str,
        failures: int,
        idempotent: bool,
        status: int | None = None,
        *,
        error: type[LightspeedError] = LightspeedUnavailable,
    ) -> int:
        """Back off before re-sending after a transient failure; raise `error` once the retries are spent.

        Returns the new failure count. A non-idempotent request is never re-sent: it may have been
        applied, and only its caller can tell.
        """
        if failures >= self.max_retries or not idempotent:
            self._fail(error, method, path, f"{what} (after {failures} retries)", status)
        delay = self._backoff(failures)
        failures += 1
        log.warning(
            "Lightspeed %s %s -> %s; retry %d/%d in %.1f s",
            method,
            path,
            what,
            failures,
            self.max_retries,
            delay,
        )
        self.stats.retries += 1
        self._sleep(delay)
        return failures

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter (half fixed, half random) so parallel tasks spread out."""
        ceiling = min(MAX_BACKOFF, self.backoff_base * (2.0**failures))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _retry_after(self, answer: _Answer, waits: int) -> float:
        """Seconds a 429 asks for: header, else a body `retry-after`, else backoff; capped."""
        now = self._clock()
        wait = parse_retry_after(answer.headers.get("Retry-After"), now)
        if wait is None:
            try:
                body = _loads(answer.content)
            except ValueError:
                body = None
            if isinstance(body, Mapping):
                for key in ("retry-after", "retry_after", "Retry-After"):
                    if body.get(key) is not None:
                        wait = parse_retry_after(str(body[key]), now)
                        if wait is not None:
                            break
        if wait is None:
            wait = self._backoff(waits)
        return min(wait, self.max_retry_after)

    def _observe_rate_headers(self, headers: Mapping[str, str]) -> None:
        """Read X-RateLimit-Limit/Remaining; when few are left, set a pause before the next send."""
        remaining = int_or_none(headers.get("X-RateLimit-Remaining"))
        limit = int_or_none(headers.get("X-RateLimit-Limit"))
        if remaining is None:
            return
        if limit is None or limit <= 0:
            limit = store_limit(self.registers)
        self._pacer.last_remaining, self._pacer.last_limit = remaining, limit
        if self.low_remaining_fraction <= 0:
            return
        threshold = max(1, int(limit * self.low_remaining_fraction))
        if remaining >= threshold:
            return
        # The server counts one window for every machine; spread what is left over the window, and
        # more slowly the closer we are to zero (one average interval per missing request).
        interval = self.rate_window_seconds / limit
        pause = min(MAX_PACING_PAUSE, interval * (threshold - remaining))
        self._pacer.not_before = max(self._pacer.not_before, self._clock() + pause)

    def _wait_for_pacing(self) -> None:
        pause = self._pacer.not_before - self._clock()
        if pause > 0:
            log.info(
                "Lightspeed rate limit nearly used up (remaining %s): pacing %.1f s",
                self._pacer.last_remaining,
                pause,
            )
            self._pacer.pauses.append(pause)
            self._sleep(pause)
            self._pacer.not_before = 0.0


def _check_2xx(content: bytes, expect: Callable[[Any], str | None] | None) -> tuple[Any, str | None]:
    """(parsed body, None), or (None, what is wrong with it): not JSON, or not the endpoint's shape."""
    try:
        body = _loads(content)
    except ValueError:  # a cut-off body or an HTML page from the edge
        return None, f"the body is not JSON ({len(content)} bytes)"
    problem = expect(body) if expect is not None else None
    return (None, problem) if problem else (body, None)
