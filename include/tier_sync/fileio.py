"""Atomic file I/O over a local folder or any fsspec URL (the data dir may be object storage).

Readers must never see a half-written file: locally we write a temp file beside the target and
rename it (atomic on one file system); on object storage a single PUT of the whole object is
atomic by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


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
    """The fsspec file system and in-filesystem path of a URL or local path."""
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


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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


@contextlib.contextmanager
def exclusive_lock(url: str) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `url` of a local folder (other processes and other
    open()s in this one wait); on object storage there is no portable lock, so this holds nothing
    and callers rely on Airflow serialising their task."""
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
