"""The run's ``sync_plan/`` folder: batch files, ``plan.json``, ``expected_members.json``,
``left_alone.json``.

Batches are files; XCom carries only small refs (`BatchRef`). One batch targets one group and
holds up to ``calls_per_batch`` membership calls of <= 100 ids; the batch size grows so that a
run never maps more than ``max_batches`` (256, far below Airflow's ``max_map_length`` of 1024)
instances at any store size. Every batch's result (and its in-flight progress) is a file next to
the batch file, so the sync log can be aggregated from files even when an XCom is missing.

The folder itself is `ledger.RunPaths.run_sync_plan_dir`; the names of the files inside it are
spelled here, and only here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from include.tier_sync import fileio
from include.tier_sync.rules import TIERS
from include.tier_sync.runtime import iso
from include.tier_sync.sync.contracts import (
    FORMAT_VERSION,
    BatchFile,
    BatchRef,
    ExpectedMembers,
    FeedView,
    LeftAlone,
    LeftAloneEntry,
    PlanDoc,
    PlanGroupMembers,
    batch_file_from_json,
    expected_members_from_json,
    expected_members_to_json,
    feed_view_from_json,
    left_alone_from_json,
    plan_doc_from_json,
    plan_group_members_from_json,
)
from include.tier_sync.sync.groups import GroupMap

if TYPE_CHECKING:
    from include.tier_sync.ledger import RunPaths
    from include.tier_sync.sync.plan import Move, Plan

log = logging.getLogger(__name__)

CALL_SIZE = 100  # Decision 4: at most 100 customer ids per membership call.
MAX_BATCHES = 256  # well under Airflow's max_map_length (1024)
CALLS_PER_BATCH = 5
BATCH_FORMAT = "tier-sync-batch/1"
PLAN_FORMAT = "tier-sync-plan/1"

# -- file names inside runs/<key>/sync_plan/ (the only place they are spelled) -----------------
PLAN_FILE = "plan.json"
EXPECTED_MEMBERS_FILE = "expected_members.json"
GROUP_MEMBERS_FILE = "tier_group_members.json"
LEFT_ALONE_FILE = "left_alone.json"
FEED_VIEW_PATTERN = "feed-{plan_id}-{to:020d}.json"  # the newest per plan is the one read
BATCH_FILE_PATTERN = "batch-{index:04d}.json"
BATCH_SUFFIX = ".json"
RESULT_SUFFIX = ".result.json"
PROGRESS_SUFFIX = ".progress.json"

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- paths -------------------------------------------------------------------------------------


def plan_path(paths: RunPaths) -> str:
    return fileio.join(paths.run_sync_plan_dir, PLAN_FILE)


def expected_members_path(paths: RunPaths) -> str:
    return fileio.join(paths.run_sync_plan_dir, EXPECTED_MEMBERS_FILE)


def group_members_path(paths: RunPaths) -> str:
    return fileio.join(paths.run_sync_plan_dir, GROUP_MEMBERS_FILE)


def left_alone_path(paths: RunPaths) -> str:
    return fileio.join(paths.run_sync_plan_dir, LEFT_ALONE_FILE)


def plan_dir_of(ref: str) -> str:
    """The ``sync_plan/`` folder a batch file lies in."""
    return ref.rsplit("/", 1)[0] if "/" in ref else "."


def feed_view_path(plan_dir: str, plan_id: str, to: int) -> str:
    return fileio.join(plan_dir, FEED_VIEW_PATTERN.format(plan_id=plan_id, to=to))


def batch_path(paths: RunPaths, index: int) -> str:
    return fileio.join(paths.run_sync_plan_dir, BATCH_FILE_PATTERN.format(index=index))


def _beside(ref: str, suffix: str) -> str:
    return ref[: -len(BATCH_SUFFIX)] + suffix if ref.endswith(BATCH_SUFFIX) else ref + suffix


def result_path(ref: str) -> str:
    """The result file next to a batch file."""
    return _beside(ref, RESULT_SUFFIX)


def progress_path(ref: str) -> str:
    """The "ids about to be sent" file next to a batch file (what makes a retry idempotent)."""
    return _beside(ref, PROGRESS_SUFFIX)


def ref_path(ref: Mapping[str, Any] | str) -> str:
    """The batch file of a `BatchRef` (or of a bare path)."""
    return ref if isinstance(ref, str) else str(ref["ref"])


# -- sizing ------------------------------------------------------------------------------------


def _batch_count(sizes: Iterable[int], calls_per_batch: int) -> int:
    return sum(math.ceil(math.ceil(n / CALL_SIZE) / calls_per_batch) for n in sizes if n)


def batch_calls_needed(sizes: Sequence[int], *, max_batches: int, calls_per_batch: int) -> int:
    """Smallest calls-per-batch >= ``calls_per_batch`` that keeps the batch count <= ``max_batches``."""
    targets = sum(1 for n in sizes if n)
    if targets > max_batches:
        raise ValueError(f"max_batches={max_batches} is below the number of target groups ({targets})")
    cpb = max(1, calls_per_batch)
    while _batch_count(sizes, cpb) > max_batches:
        total_calls = sum(math.ceil(n / CALL_SIZE) for n in sizes)
        cpb = max(cpb + 1, math.ceil(total_calls / max(1, max_batches - targets)))
    return cpb


# -- writing -----------------------------------------------------------------------------------


def _write_batch_file(
    paths: RunPaths,
    chunk: Sequence[Move],
    *,
    index: int,
    total: int,
    plan_id: str,
    customers_cursor: int,
    groups: GroupMap | None,
) -> BatchRef:
    tier = chunk[0].tier
    group_id = chunk[0].to_group_id
    path = batch_path(paths, index)
    batch: BatchFile = {
        "format_version": FORMAT_VERSION,
        "format": BATCH_FORMAT,
        "plan_id": plan_id,
        "index": index,
        "of": total,
        "tier": tier,
        "group_id": group_id,
        "group_name": groups.names.get(group_id) if groups is not None else None,
        "customers_cursor": int(customers_cursor),
        "as_of": iso(paths.as_of),
        "moves": [m.as_dict() for m in chunk],
    }
    fileio.write_json(path, batch)
    return {
        "ref": path,
        "tier": tier,
        "group_id": group_id,
        "size": len(chunk),
        "batch": f"batch {index}/{total}: {tier} ({len(chunk)})",
    }


def write_batches(
    plan: Plan,
    paths: RunPaths,
    *,
    customers_cursor: int,
    max_batches: int = MAX_BATCHES,
    calls_per_batch: int = CALLS_PER_BATCH,
    groups: GroupMap | None = None,
    plan_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[BatchRef]:
    """Write one JSON file per batch plus ``plan.json`` and return the small refs for XCom.

    A batch targets one group and holds up to ``calls_per_batch`` calls of <= 100 ids (grown when
    needed to stay within ``max_batches``). ``plan.json`` lists exactly this plan's refs under a
    fresh ``plan_id``; result files of an older plan of the same run (a cleared, re-run task) carry
    another ``plan_id`` and are ignored by the log. ``extra`` is merged into ``plan.json``.
    """
    plan_id = plan_id or uuid.uuid4().hex
    by_tier: dict[str, list[Move]] = {t: [] for t in TIERS}
    for move in plan.moves:
        by_tier[move.tier].append(move)
    cpb = batch_calls_needed(
        [len(v) for v in by_tier.values()], max_batches=max_batches, calls_per_batch=calls_per_batch
    )
    per_batch = cpb * CALL_SIZE
    total = sum(math.ceil(len(v) / per_batch) for v in by_tier.values())
    refs: list[BatchRef] = []
    for tier in TIERS:
        for chunk in chunks(by_tier[tier], per_batch):
            refs.append(
                _write_batch_file(
                    paths,
                    chunk,
                    index=len(refs) + 1,
                    total=total,
                    plan_id=plan_id,
                    customers_cursor=customers_cursor,
                    groups=groups,
                )
            )
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "plan_id": plan_id,
        "as_of": iso(paths.as_of),
        "customers_cursor": int(customers_cursor),
        "calls_per_batch": cpb,
        "summary": plan.summary(),
        "groups": groups.as_dict() if groups is not None else None,
        "refs": refs,
        "dispatched": True,
    }
    if extra:
        doc.update(extra)
    write_plan_doc(paths, doc)
    log.info(
        "Sync plan %s: %s moves in %s batches (<= %s calls each)", plan_id, len(plan.moves), len(refs), cpb
    )
    return refs


def write_plan_doc(paths: RunPaths, doc: Mapping[str, Any]) -> str:
    """Write ``sync_plan/plan.json`` (the commit point the sync log aggregates from)."""
    target = plan_path(paths)
    fileio.write_json(target, {**doc, "format_version": FORMAT_VERSION})
    return target


def write_expected_members(plan: Plan, paths: RunPaths) -> str:
    """Tier -> customer ids the tier group should hold (for verify_group_counts), next to plan.json."""
    target = expected_members_path(paths)
    fileio.write_json(target, expected_members_to_json(plan.expected_members))
    return target


def write_left_alone(plan: Plan, paths: RunPaths, plan_id: str, groups: GroupMap) -> str:
    """Who the plan leaves alone and why (protected, deleted, ...), ids only, next to plan.json."""
    target = left_alone_path(paths)
    customers: dict[str, LeftAloneEntry] = {
        cid: {"why": why, "group_id": gid, "group": groups.label(gid) if gid is not None else None}
        for cid, (why, gid) in sorted(plan.left_alone.items())
    }
    doc: LeftAlone = {"format_version": FORMAT_VERSION, "plan_id": plan_id, "customers": customers}
    fileio.write_json(target, doc)
    return target


def read_left_alone(paths: RunPaths) -> LeftAlone | None:
    """`left_alone.json`, or None for a plan written before it existed."""
    target = left_alone_path(paths)
    return left_alone_from_json(fileio.read_json(target), target)


def write_group_members(
    paths: RunPaths, plan_id: str, customers_cursor: int, members: Mapping[str, Iterable[str]]
) -> str:
    """Each tier group's live members at the plan's cursor (the group check's starting state)."""
    target = group_members_path(paths)
    doc: PlanGroupMembers = {
        "format_version": FORMAT_VERSION,
        "plan_id": plan_id,
        "customers_cursor": int(customers_cursor),
        "members": {str(g): sorted(str(c) for c in ids) for g, ids in members.items()},
    }
    fileio.write_json(target, doc)
    return target


def write_feed_view(plan_dir: str, view: FeedView) -> str:
    """Save a feed view under its ``to``, then remove the same plan's older (now redundant) views.

    Each file is written whole and atomically, and a view is complete for its range on its own,
    so concurrent batches never need a lock: the newest one is as good as any, and a reader whose
    pick was removed meanwhile looks again (`read_latest_feed_view`).
    """
    target = feed_view_path(plan_dir, view["plan_id"], view["to"])
    fileio.write_json(target, {**view, "format_version": FORMAT_VERSION})
    for name, to in _feed_views(plan_dir, view["plan_id"]):
        if to < view["to"]:
            _remove_file(fileio.join(plan_dir, name))
    return target


def _feed_views(plan_dir: str, plan_id: str) -> list[tuple[str, int]]:
    """(file name, to) of a plan's feed views, newest first."""
    prefix, suffix = f"feed-{plan_id}-", ".json"
    out = []
    for name in fileio.listdir(plan_dir):
        middle = name[len(prefix) : -len(suffix)]
        if name.startswith(prefix) and name.endswith(suffix) and middle.isdigit():
            out.append((name, int(middle)))
    return sorted(out, key=lambda item: item[1], reverse=True)


def _remove_file(url: str) -> None:
    if fileio.is_local(url):
        with contextlib.suppress(FileNotFoundError):
            os.remove(fileio.local_path(url))
        return
    fs, path = fileio.filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


# -- reading -----------------------------------------------------------------------------------


def read_group_members(paths: RunPaths) -> PlanGroupMembers | None:
    """`tier_group_members.json`, or None for a plan written before it existed."""
    target = group_members_path(paths)
    return plan_group_members_from_json(fileio.read_json(target), target)


def read_latest_feed_view(plan_dir: str, plan_id: str, start: int) -> FeedView | None:
    """The newest feed view of this plan (None when there is none yet).

    A view removed between the listing and the read (a newer one replaced it) sends the reader
    back to the listing, a few times at most; a view that does not start at the plan's cursor
    is an error, never silently used.
    """
    for _attempt in range(5):
        views = _feed_views(plan_dir, plan_id)
        if not views:
            return None
        target = fileio.join(plan_dir, views[0][0])
        try:
            raw = json.loads(fileio.read_text(target))
        except FileNotFoundError:
            continue
        view = feed_view_from_json(raw, target)
        if view["plan_id"] != plan_id or view["start"] != int(start):
            raise ValueError(
                f"{target} does not belong to plan {plan_id} from cursor {start} "
                f"(it says plan {view['plan_id']} from {view['start']})"
            )
        return view
    log.info(
        "Feed views of plan %s kept changing while read; reading the feed from the plan's cursor", plan_id
    )
    return None


def read_plan_doc(paths: RunPaths) -> PlanDoc | None:
    target = plan_path(paths)
    return plan_doc_from_json(fileio.read_json(target), target)


def read_batch(ref: Mapping[str, Any] | str) -> BatchFile:
    """The batch file a ref points at (ValueError when it is not one)."""
    path = ref_path(ref)
    return batch_file_from_json(fileio.read_json(path), path, BATCH_FORMAT)


def read_expected_members(paths: RunPaths) -> ExpectedMembers | None:
    target = expected_members_path(paths)
    return expected_members_from_json(fileio.read_json(target), target)


def groups_from_plan(paths: RunPaths) -> GroupMap | None:
    """The GroupMap plan_sync resolved (so verify_group_counts needs no second lookup)."""
    doc = read_plan_doc(paths)
    groups = doc.get("groups") if doc else None
    return GroupMap.from_dict(groups) if groups else None
