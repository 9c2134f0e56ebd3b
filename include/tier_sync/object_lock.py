"""An exclusive lock on S3 from conditional writes: the publish lock of an object-storage data dir.

Why: on a local data dir `fileio.exclusive_lock` is an flock; on object storage there was none, and
publishing relied on Airflow running `publish_run` one instance at a time. That does not cover
`airflow dags test`, the erasure tool, or two deployments sharing a bucket. S3's conditional PUT
gives a real lock:

- **Acquire**: create the lock object with If-None-Match '*'; exactly one writer succeeds.
- **Hold**: a lease. The holder rewrites the object (If-Match its own ETag) every LEASE/4 seconds.
- **Stale**: a waiter that sees the *same* ETag for longer than LEASE (timed on its own monotonic
  clock, so no two hosts' clocks are compared) takes the lock over with If-Match that ETag: the
  holder crashed. Only one waiter can win that write.
- **Release**: delete the object if it is still ours.

A holder that loses its lease (it stalled longer than LEASE) learns it when it next renews and
raises `LockLost` when its block ends, so its task fails instead of passing silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from include.tier_sync import fileio

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
WAIT_SECONDS = 1800.0  # a publish takes seconds; half an hour of waiting means something is wrong


class LockTimeout(TimeoutError):
    """The lock stayed held (and renewed) by someone else for longer than we may wait."""


class LockLost(RuntimeError):
    """Our lease ran out while we held the lock and another process took it over."""


def _body(token: str, beat: int) -> bytes:
    holder = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "beat": beat, "at": time.time()}
    return json.dumps(holder, sort_keys=True).encode()


def _holder(data: bytes) -> str:
    try:
        doc = json.loads(data)
        return f"{doc.get('host')} pid {doc.get('pid')}"
    except (ValueError, AttributeError):
        return "an unreadable lock object"


def _acquire(url: str, token: str, lease: float, wait: float, poll: float) -> str:
    """Take the lock; returns the ETag of our lock object."""
    started = time.monotonic()
    seen: tuple[str, float] | None = None  # (ETag, when we first saw it)
    while True:
        try:
            return fileio.write_bytes_if(url, _body(token, 0), etag=None)
        except fileio.WriteConflict:
            pass
        try:
            data, tag = fileio.read_bytes_tagged(url)
        except FileNotFoundError:  # released between our write and our read: try again at once
            continue
        now = time.monotonic()
        if seen is None or seen[0] != tag:
            seen = (tag, now)
        elif now - seen[1] > lease:
            try:
                etag = fileio.write_bytes_if(url, _body(token, 0), etag=tag)
            except fileio.WriteConflict:  # another waiter took it over, or the holder renewed
                seen = None
                continue
            log.warning("Took over the lock %s from %s: it was not renewed for %.0f s", url, _holder(data), lease)
            return etag
        if now - started > wait:
            raise LockTimeout(f"{url} has been held by {_holder(data)} for over {wait:.0f} s; is a publish stuck?")
        time.sleep(poll)


@contextlib.contextmanager
def s3_lock(
    url: str, *, lease: float = LEASE_SECONDS, wait: float = WAIT_SECONDS, poll: float = 0.25
) -> Iterator[None]:
    """Hold the lock object `url` (an S3 URL: `fileio.has_conditional_write`) for the block."""
    token = uuid.uuid4().hex
    etag = _acquire(url, token, lease, wait, poll)
    state = {"etag": etag, "lost": False}
    stop = threading.Event()

    def renew() -> None:
        beat = 0
        while not stop.wait(lease / 4):
            beat += 1
            try:
                state["etag"] = fileio.write_bytes_if(url, _body(token, beat), etag=str(state["etag"]))
            except fileio.WriteConflict:
                state["lost"] = True
                log.error("Lost the lock %s: the lease ran out and another process took it over", url)
                return
            except Exception:  # a transient S3 error: the next beat tries again within the lease
                log.warning("Could not renew the lock %s; retrying", url, exc_info=True)

    renewer = threading.Thread(target=renew, name="s3-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if not state["lost"]:
            _release(url, token)
    if state["lost"]:
        raise LockLost(f"lost {url} while holding it: a longer stall than the {lease:.0f} s lease")


def _release(url: str, token: str) -> None:
    try:
        data, _tag = fileio.read_bytes_tagged(url)
    except FileNotFoundError:
        return
    try:
        ours = json.loads(data).get("token") == token
    except (ValueError, AttributeError):
        ours = False
    if ours:
        fs, path = fileio.filesystem(url)
        fs.rm_file(path)
