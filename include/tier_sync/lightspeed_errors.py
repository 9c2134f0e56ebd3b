"""The errors the Lightspeed client raises, in a module of their own.

They exist apart from the client so the transport (`lightspeed_http`) and the API calls
(`lightspeed`) raise the same classes without importing each other; callers catch them from
`include.tier_sync.lightspeed`, which re-exports them as part of the client's API. Every message
names the method, path (never a query string) and connection id: never the token, a header, a URL
with credentials or a response body. The same facts are attributes (`method`, `path`, `status`) so
callers never parse a message.
"""

from __future__ import annotations


class LightspeedError(Exception):
    """Base of every error this client raises."""

    def __init__(
        self, message: str, status: int | None = None, *, method: str | None = None, path: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.method = method
        self.path = path


class LightspeedConfigError(LightspeedError):
    """The connection cannot be used as configured (plain http to a remote host, credentials in the
    URL, a bad setting). No request was sent; fixing the connection is the only cure."""


class LightspeedAuthError(LightspeedError):
    """401/403, or a token that cannot be sent (empty, whitespace or control characters inside).

    Never retried: retrying cannot help.
    """

    def __init__(
        self, message: str, status: int | None, *, method: str | None = None, path: str | None = None
    ) -> None:
        super().__init__(message, status, method=method, path=path)


class LightspeedNotFound(LightspeedError):
    """404: the record does not exist (a single customer: report it and go on)."""

    def __init__(
        self, message: str, status: int = 404, *, method: str | None = None, path: str | None = None
    ) -> None:
        super().__init__(message, status, method=method, path=path)


class LightspeedClientError(LightspeedError):
    """Any other 4xx (not 429): the request itself was refused; retrying the same request cannot help."""

    def __init__(
        self, message: str, status: int, *, method: str | None = None, path: str | None = None
    ) -> None:
        super().__init__(message, status, method=method, path=path)


class LightspeedUnavailable(LightspeedError):
    """5xx, network errors, timeouts, 429 or unusable 2xx bodies that outlasted the bounded retries."""


class LightspeedRateLimited(LightspeedUnavailable):
    """Still 429 after every wait the client allows: the rate-limit window is spent (by us or another
    caller of the same app). The task's retry policy waits one full window before trying again."""


class LightspeedTimeout(LightspeedUnavailable):
    """No complete answer in time: a socket read timed out or the request's wall-clock deadline passed
    (a server trickling its body). Transient: retried like a 5xx."""


class LightspeedProtocolError(LightspeedUnavailable):
    """A 2xx whose body is not what the endpoint answers (no `data` list on a page, not JSON, an
    error object behind a 200 from a misbehaving gateway). Transient: retried like a 5xx, because
    reading it as "no data" would end a feed silently part-way."""


class LightspeedFeedError(LightspeedError):
    """A version-cursor feed that misbehaves across pages (the cursor stops or creeps while the same
    records come back, far too many pages). Not retried in-process: re-reading cannot fix a server
    that does not honour `after`; the extraction fails and keeps what it committed."""
