"""The order store's manifest, read without pyarrow: its format, its checks and the cursors.

Split out of `store` (which re-exports these names and builds its commits on them) so that a task
needing only a cursor (plan_sync comparing the live-customers file with the store, issue 17) reads
the manifest without importing pyarrow. `OrderStore.manifest()` is `read_manifest` of its root.
"""

from __future__ import annotations

import json
import os
from typing import Any

from include.tier_sync import fileio

SALES = "sales"
CUSTOMERS = "customers"
RESOURCES: tuple[str, ...] = (SALES, CUSTOMERS)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tier_sync.order_store/1"
RECOVERY = "trigger the DAG with full_refresh=true to rebuild the store from Lightspeed"


class StoreError(RuntimeError):
    """The store is unusable (bad manifest, unknown resource, a committed segment missing)."""


class ConcurrentWriteError(StoreError):
    """Another writer committed since this one read its cursor; committing now could lose its data."""


class StoreCorruptError(StoreError):
    """A manifest or committed segment that cannot be read; the message names it and the recovery."""


def store_root(root: str | os.PathLike[str]) -> str:
    """The store's root as every reader spells it: a local path made absolute, no trailing "/"."""
    text = os.fspath(root)
    if "://" not in text:
        text = os.path.abspath(text)
    return text.rstrip("/") or "/"


def manifest_url(root: str) -> str:
    return fileio.join(store_root(root), MANIFEST_NAME)


def empty_manifest(generation: int = 0, next_segment: int = 1) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "generation": generation,
        "next_segment": next_segment,
        "updated_at": None,
        "resources": {r: {"cursor": 0, "segments": []} for r in RESOURCES},
    }


def manifest_problem(data: Any) -> str | None:
    """Why parsed JSON is not a usable manifest, or None."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return f"is not an order-store manifest ({MANIFEST_FORMAT})"
    try:
        if int(data.get("generation", 0)) < 0 or int(data.get("next_segment", 1)) < 1:
            return "has a malformed header"
        for entry in data.setdefault("resources", {}).values():
            names = [s["name"] for s in entry["segments"]]
            if entry["cursor"] < 0 or not all(n.endswith(".parquet") and "/" not in n for n in names):
                return "names a malformed segment or cursor"
    except (AttributeError, KeyError, TypeError, ValueError):
        return "is malformed"
    return None


def read_manifest(root: str, *, tagged: bool = False) -> tuple[dict[str, Any], str | None]:
    """The committed manifest (empty for a new store) and, with `tagged`, its object ETag (S3).

    StoreCorruptError, naming the file and the recovery, when it is unreadable.
    """
    root = store_root(root)
    url = manifest_url(root)
    tag: str | None = None
    try:
        if tagged:
            raw, tag = fileio.read_bytes_tagged(url)
        else:
            raw = fileio.read_bytes(url)
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        data, tag = empty_manifest(), None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: a cut-off or overwritten file
        data = None
    problem = manifest_problem(data) if data is not None else "is not valid JSON (truncated?)"
    if problem:
        raise StoreCorruptError(
            f"order store manifest {url} {problem}: {RECOVERY}; that keeps the "
            f"damaged manifest and segments, moved to {root}/damaged-<UTC time>-<id>/"
        )
    for resource in RESOURCES:
        data["resources"].setdefault(resource, {"cursor": 0, "segments": []})
    return data, tag


def read_cursor(root: str, resource: str) -> int:
    """The version `resource` has been read up to (0: nothing stored), as `OrderStore.cursor`."""
    if resource not in RESOURCES:
        raise StoreError(f"unknown resource {resource!r}; known: {list(RESOURCES)}")
    return int(read_manifest(root)[0]["resources"][resource]["cursor"])
