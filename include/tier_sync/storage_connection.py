"""Object storage through an Airflow connection: `s3://<conn_id>@bucket/prefix`.

The same URL form as Airflow's ObjectStoragePath. The credentials, region and endpoint come from
the named connection (Admin -> Connections, a secrets backend, or AIRFLOW_CONN_*), resolved by the
provider's file system (`airflow.sdk.io.get_fs`; S3: apache-airflow-providers-amazon). Nothing
falls back silently: a connection that does not exist, or one that yields no credentials (which
the provider would turn into anonymous access), is an error naming the Variable, never the URL.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# Schemes whose URLs may carry a connection id, and the provider that serves them here.
CONNECTION_SCHEMES = {"s3": "apache-airflow-providers-amazon", "s3a": "apache-airflow-providers-amazon"}
# What an Airflow connection id may look like (no ':' so no "user:password@", no '/').
CONN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}\Z")
# AWS access key ids: a key pasted where a connection id belongs must not be taken for one.
_AWS_KEY_ID = re.compile(r"(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\Z")
_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<user>[^/@?#]*)@(?P<rest>[^@]*)\Z")


class StorageConnectionError(ValueError):
    """The connection named in the data dir URL cannot give a file system."""


def split(url: str) -> tuple[str | None, str]:
    """(connection id, the URL without it) for `scheme://conn@bucket/...` of CONNECTION_SCHEMES;
    (None, url) for every other URL or path (Azure's `container@account...` stays as it is)."""
    match = _URL.match(url)
    if match is None or match["scheme"] not in CONNECTION_SCHEMES:
        return None, url
    return match["user"], f"{match['scheme']}://{match['rest']}"


def connection_id_problem(scheme: str, user: str) -> str | None:
    """Why `user` (the part of a data dir URL before '@') is not a usable connection id, or None.
    The reason never quotes it: it may be a secret pasted in the wrong place."""
    if scheme not in CONNECTION_SCHEMES:
        names = ", ".join(f"{s}://" for s in CONNECTION_SCHEMES)
        return (
            f"the {scheme}:// URL carries user info before '@'; an Airflow connection can be named "
            f"that way for {names} only, and credentials never belong in the Variable"
        )
    if not CONN_ID.match(user) or _AWS_KEY_ID.match(user):
        return (
            f"the part of the {scheme}:// URL before '@' must be an Airflow connection id "
            f"({scheme}://<conn_id>@bucket/prefix); it looks like a credential or is malformed: "
            "credentials belong in the connection, never in the Variable"
        )
    return None


@functools.lru_cache(maxsize=8)
def connection_filesystem(scheme: str, conn_id: str) -> AbstractFileSystem:
    """The provider's file system for `conn_id` (one per process and connection)."""
    from include.tier_sync.settings import VAR_DATA_DIR

    where = f"the Airflow connection named in Variable {VAR_DATA_DIR} (before '@')"
    _require_connection(conn_id, where)
    try:
        from airflow.sdk.io.fs import get_fs

        fs = get_fs(scheme, conn_id=conn_id)
    except (ImportError, ValueError) as exc:
        raise StorageConnectionError(
            f"no file system for {scheme}:// with {where}: install {CONNECTION_SCHEMES[scheme]} "
            f"with s3fs ({type(exc).__name__})"
        ) from None
    if getattr(fs, "anon", False):
        raise StorageConnectionError(
            f"{where} gives no credentials, so {scheme}:// would be read anonymously; set its "
            "login/password (access key), a role, or a profile in its extras"
        )
    return fs


def _require_connection(conn_id: str, where: str) -> None:
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
    except Exception as exc:  # AirflowNotFoundException, or no way to reach connections at all
        raise StorageConnectionError(f"{where} is not defined ({type(exc).__name__})") from None
