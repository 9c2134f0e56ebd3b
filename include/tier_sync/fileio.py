"""Atomic file I/O over a local folder or any fsspec URL (the data dir may be object storage).

Readers must never see a half-written file: locally we write a temp file beside the target and
rename it (atomic on one file system); on object storage a single PUT of the whole object is
atomic by itself.

A read-modify-write that must not lose a concurrent writer's update (the order store's manifest)
needs more: locally `exclusive_lock`; on S3 a conditional PUT (`read_bytes_tagged` gives the ETag
of exactly the bytes read, `write_bytes_if` writes only while the object still has it). The other
object-storage schemes (gs, az/abfs, memory) have neither here: `has_conditional_write` says which.

An object-storage URL may name an Airflow connection the way Airflow's ObjectStoragePath does,
`s3://aws_default@bucket/prefix`: the file system then comes from `airflow.sdk.io.get_fs` with that
connection's credentials and endpoint (`storage_connection`), never from the process environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


# Schemes whose fsspec file system here makes a PUT conditional on the object's ETag (s3fs:
# PutObject with If-Match / If-None-Match). gcsfs and adlfs have generation / lease mechanisms
# that this module does not use, and memory:// (the tests' stand-in) has none.
CONDITIONAL_WRITE_SCHEMES = ("s3", "s3a")
# S3's answers to a conditional PUT that lost: 412 (the ETag no longer matches, or the object
# exists for If-None-Match) and 409 (a concurrent conditional write to the same key is under way).
_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict")
_TAGGED_READ_ATTEMPTS = 5


class WriteConflict(Exception):
    """A conditional write refused: the object changed, or appeared, since it was read."""


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """Strip a file:// scheme; other URLs are returned unchanged."""
    return url.removeprefix("file://") if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URLs alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system and in-filesystem path of a URL or local path (for a URL naming an
    Airflow connection, the connection's file system: see `storage_connection`)."""
    from include.tier_sync import storage_connection

    conn_id, plain = storage_connection.split(url)
    if conn_id is not None:
        fs = storage_connection.connection_filesystem(plain.split("://", 1)[0], conn_id)
        return fs, str(fs._strip_protocol(plain))
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    return fs, path


def write_bytes(url: str, data: bytes) -> None:
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def has_conditional_write(url: str) -> bool:
    """True when `write_bytes_if` works for `url` (S3); False locally and on gs, az, memory."""
    return not is_local(url) and url.split("://", 1)[0] in CONDITIONAL_WRITE_SCHEMES


def read_bytes_tagged(url: str) -> tuple[bytes, str]:
    """An S3 object's bytes and the ETag of exactly those bytes; FileNotFoundError when absent.

    The ETag comes from a fresh HEAD (never s3fs's listing cache) and the GET is made with
    If-Match on it, so a write in between cannot pair new bytes with an old ETag: that read is
    retried. Only for URLs where `has_conditional_write` holds.
    """
    fs, path = filesystem(url)
    for attempt in range(_TAGGED_READ_ATTEMPTS):
        fs.invalidate_cache(path)
        try:
            with fs.open(path, "rb") as fh:
                tag = str(fh.details["ETag"])
                data: bytes = fh.read()
            return data, tag
        except FileNotFoundError:
            raise
        except OSError as exc:
            if not _is_conflict(exc) or attempt == _TAGGED_READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def write_bytes_if(url: str, data: bytes, *, etag: str | None) -> str:
    """Write `data` in one PUT only while the object is still the one read with ETag `etag`
    (If-Match), or with `etag=None` only while there is no object yet (If-None-Match: '*').

    Returns the new object's ETag; raises WriteConflict when the store refused the condition
    (another writer got there first), so two writers from the same read can never both land.
    """
    if not has_conditional_write(url):
        raise ValueError(f"no conditional write for {url.split('://', 1)[0]}:// here (only S3)")
    fs, path = filesystem(url)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        out = fs.pipe_file(path, data, **condition)
    except OSError as exc:
        # FileExistsError: If-None-Match on an object that exists; FileNotFoundError on If-Match:
        # the object was deleted since it was read (without a condition it is a missing bucket).
        lost = isinstance(exc, FileExistsError) or (etag is not None and isinstance(exc, FileNotFoundError))
        if lost or _is_conflict(exc):
            raise WriteConflict(f"{url} changed since it was read ({_describe(condition)})") from None
        raise
    return str((out or {}).get("ETag", ""))


def _describe(condition: dict[str, str]) -> str:
    return (
        "it exists already" if "IfNoneMatch" in condition else f"its ETag is no longer {condition['IfMatch']}"
    )


def _is_conflict(exc: BaseException) -> bool:
    """Whether an s3fs error is S3 refusing a condition (its botocore ClientError is the cause), or
    s3fs's FileExpired: the object's ETag changed while it was being read."""
    if type(exc).__name__ == "FileExpired":
        return True
    response = getattr(exc.__cause__, "response", None)
    if not isinstance(response, dict):
        return False
    return response.get("Error", {}).get("Code") in _CONFLICT_CODES


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """How every JSON file here is written: indented, sorted keys, one trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json_bytes(obj))


def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(local_path(url), "rb") as fh:
            return fh.read()
    fs, path = filesystem(url)
    data: bytes = fs.cat_file(path)
    return data


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str, default: Any = None) -> Any:
    if not exists(url):
        return default
    return json.loads(read_text(url))


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under a folder; [] when it does not exist."""
    if is_local(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def copy(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


def remove_tree(url: str) -> None:
    """Delete a folder and everything under it (nothing when it does not exist).

    Locally the folder is first renamed to a hidden sibling (`.removing-<name>-<id>`), so a reader
    listing its parent never sees it half deleted; on object storage the prefix is removed.
    """
    if is_local(url):
        path = local_path(url).rstrip("/")
        if not os.path.isdir(path):
            return
        hidden = os.path.join(os.path.dirname(path), f".removing-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
        os.rename(path, hidden)
        shutil.rmtree(hidden)
        return
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def walk_files(url: str) -> list[str]:
    """Every file under a folder, as paths relative to it ('/'-separated, sorted); [] when absent."""
    if is_local(url):
        root = local_path(url)
        out = [
            os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            for folder, _dirs, names in os.walk(root)
            for name in names
        ]
        return sorted(out)
    fs, root = filesystem(url)
    if not fs.exists(root):
        return []
    return sorted(full[len(root.rstrip("/")) + 1 :] for full in fs.find(root))


@contextlib.contextmanager
def exclusive_lock(url: str) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `url` of a local folder (other processes and other
    open()s in this one wait); on object storage there is no portable lock, so this holds nothing:
    callers commit with `write_bytes_if` where `has_conditional_write` (S3), and elsewhere rely on
    Airflow serialising their task."""
    if not is_local(url):
        yield
        return
    path = local_path(url)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
