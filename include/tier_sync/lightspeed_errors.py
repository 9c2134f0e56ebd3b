"""The errors the Lightspeed client raises, in a module of their own.

They exist apart from the client so the transport (`lightspeed_http`) and the API calls
(`lightspeed`) raise the same classes without importing each other; callers catch them from
`include.tier_sync.lightspeed`, which re-exports them as part of the client's API. Every message
names the method, path and connection id: never the token, never a response body.
"""

from __future__ import annotations


class LightspeedError(Exception):
    """Base of every error this client raises."""


class LightspeedAuthError(LightspeedError):
    """401/403: the token is wrong, expired or lacks a scope. Never retried: retrying cannot help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LightspeedNotFound(LightspeedError):
    """404: the record does not exist (a single customer: report it and go on)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


class LightspeedClientError(LightspeedError):
    """Any other 4xx (not 429): the request itself was refused; retrying the same request cannot help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LightspeedUnavailable(LightspeedError):
    """5xx, network errors, timeouts or 429 that outlasted the bounded retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
