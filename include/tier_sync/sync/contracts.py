"""The files and payloads passed between the sync's steps, as typed contracts.

| contract         | where it lives                                   | written by            | read by                     |
|------------------|--------------------------------------------------|-----------------------|-----------------------------|
| `PlanDoc`        | `runs/<key>/sync_plan/plan.json`                 | plan_sync             | sync_batch, verify, sync log |
| `BatchFile`      | `runs/<key>/sync_plan/batch-NNNN.json`           | plan_sync             | sync_batch, sync log        |
| `BatchRef`       | XCom of plan_sync (and `PlanDoc.refs`)           | plan_sync             | mapped sync_batch           |
| `BatchResult`    | `batch-NNNN.result.json` and sync_batch's XCom   | sync_batch            | sync log, group check       |
| `ExpectedMembers`| `runs/<key>/sync_plan/expected_members.json`     | plan_sync             | verify_group_counts         |
| `LeftAlone`      | `runs/<key>/sync_plan/left_alone.json`           | plan_sync             | the page's customer view    |
| `GroupCheck`     | `runs/<key>/group_check.json` and its XCom       | verify_group_counts   | write_sync_log              |
| `SyncLog`        | `runs/<key>/tier_sync_log.json` (+ the latest)   | write_sync_log        | people, the dashboard       |
| `LiveCustomersDoc`| `runs/<key>/live_customers.json.gz`             | extract_orders        | plan_sync, plan_progress    |

Every file carries `format_version` (`FORMAT_VERSION`). On read, a file without one is a legacy
version 1 file (the same keys, written before the field existed) and is accepted; a file of a
newer version than this code knows raises `UnsupportedFormatVersion`. The keys on disk are
exactly today's plus `format_version`.

Nothing here imports pandas (the write path imports this module).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NotRequired, TypedDict, cast

FORMAT_VERSION = 1
LEGACY_VERSION = 1  # what a file without `format_version` is
API_KEYS = ("requests", "rate_limited", "retries")


class UnsupportedFormatVersion(ValueError):
    """A sync file written by a newer (or unknown) format than this code understands."""


def format_version_of(doc: Mapping[str, Any], where: str) -> int:
    """The file's format version: missing means legacy v1; a newer or malformed one is an error."""
    version = doc.get("format_version", LEGACY_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnsupportedFormatVersion(f"{where}: format_version {version!r} is not a valid version")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatVersion(
            f"{where}: format_version {version} is newer than this code understands "
            f"(<= {FORMAT_VERSION}); it was written by a newer release of customer-tier-sync. "
            "Deploy that release on every worker, or re-run the whole sync with this one."
        )
    return version


def is_null(value: Any) -> bool:
    """A JSON value that means "no value": None, a blank string, NaN (no pandas needed)."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, float):
        return value != value  # NaN
    if isinstance(value, Decimal):
        return value.is_nan()
    return False


# -- API accounting ----------------------------------------------------------------------------


class ApiCounts(TypedDict):
    requests: int
    rate_limited: int
    retries: int


def zero_api() -> ApiCounts:
    return {"requests": 0, "rate_limited": 0, "retries": 0}


def api_stats(client: Any) -> ApiCounts:
    """The client's request counters now (zeros for a client without stats)."""
    stats = getattr(client, "stats", None)
    raw = stats.as_dict() if stats is not None else {}
    return sum_api(raw)


def api_diff(after: Mapping[str, Any], before: Mapping[str, Any]) -> ApiCounts:
    return {
        "requests": int(after.get("requests", 0)) - int(before.get("requests", 0)),
        "rate_limited": int(after.get("rate_limited", 0)) - int(before.get("rate_limited", 0)),
        "retries": int(after.get("retries", 0)) - int(before.get("retries", 0)),
    }


def sum_api(*parts: Mapping[str, Any] | None) -> ApiCounts:
    """Key-wise sum of API counters; a missing part or key counts as zero."""
    total = zero_api()
    for part in parts:
        if not part:
            continue
        total["requests"] += int(part.get("requests") or 0)
        total["rate_limited"] += int(part.get("rate_limited") or 0)
        total["retries"] += int(part.get("retries") or 0)
    return total


# -- plan_sync -> sync_batch -------------------------------------------------------------------

# One move of a batch file. "from" is the planned from-group's label (a Python keyword, hence
# the functional form).
BatchMove = TypedDict("BatchMove", {"customer_id": str, "from_group_id": str | None, "from": str})


class BatchFile(TypedDict):
    """`sync_plan/batch-NNNN.json`: one target group and up to calls_per_batch x 100 moves."""

    format_version: NotRequired[int]
    format: str  # batches.BATCH_FORMAT
    plan_id: str
    index: int
    of: int
    tier: str
    group_id: str
    group_name: str | None
    customers_cursor: int
    as_of: str
    moves: list[BatchMove]


class BatchRef(TypedDict):
    """What plan_sync returns per batch (XCom, mapped over); also listed in `PlanDoc.refs`."""

    ref: str  # path of the batch file
    tier: str
    group_id: str
    size: int
    batch: str  # "batch 2/5: Seed (100)", the mapped task's label
    # Whether this run may write to the POS (the plan's decision), so a mapped instance needs no
    # file read for it; absent in refs listed inside plan.json.
    writes_allowed: NotRequired[bool]


class GroupMapDoc(TypedDict):
    tier_groups: dict[str, str]
    default_group_id: str | None
    aliases: dict[str, str]
    created: list[str]
    missing: list[str]


class CircuitStatus(TypedDict):
    tripped: bool
    reasons: list[str]
    changes: int
    managed: int
    change_fraction: float
    max_move_fraction: float
    downgrades: int
    max_downgrades: int
    allowed_by_param: NotRequired[bool]


class PlanSummary(TypedDict, total=False):
    """Counts of a plan (no customer ids); what plan.json and the sync log carry."""

    total_customers: int
    managed: int
    planned_moves: int
    changes: int
    reasserts: int
    downgrades: int
    protected: int
    deleted: int
    no_tier: int
    missing: int
    unchanged: int
    deferred_by_limit: int
    force_resync: bool
    limit: int | None
    tier_breakdown: dict[str, int]
    moves: dict[str, int]
    circuit_breaker: CircuitStatus
    groups_created: list[str]
    left_out_by_approval: dict[str, Any]  # Plan.upgrades_only: what an approval left out


class PlanDoc(TypedDict):
    """`sync_plan/plan.json`: the commit point of plan_sync that the sync log aggregates from."""

    format_version: NotRequired[int]
    format: str  # batches.PLAN_FORMAT
    plan_id: str
    as_of: str
    customers_cursor: int
    refs: list[BatchRef]
    summary: PlanSummary
    groups: GroupMapDoc | None
    dispatched: NotRequired[bool]  # legacy files without it were dispatched
    calls_per_batch: NotRequired[int]  # absent when the breaker stopped the run before batching
    started_at: NotRequired[str]
    dry_run: NotRequired[bool]
    writes_allowed: NotRequired[bool]
    skipped_reason: NotRequired[str | None]
    api: NotRequired[ApiCounts]
    approval: NotRequired[dict[str, Any]]  # include/tier_sync/approval.py: request and decision


def plan_doc_from_json(raw: Any, where: str) -> PlanDoc | None:
    """A plan.json read from disk (None when absent or not an object)."""
    if not isinstance(raw, dict):
        return None
    format_version_of(raw, where)
    return cast("PlanDoc", raw)


def batch_file_from_json(raw: Any, where: str, expected_format: str) -> BatchFile:
    if not isinstance(raw, dict) or raw.get("format") != expected_format:
        raise ValueError(f"{where} is not a sync batch file")
    format_version_of(raw, where)
    return cast("BatchFile", raw)


# -- sync_batch -> sync log --------------------------------------------------------------------


class ErrorDetail(TypedDict):
    customer_id: str
    error: str


class BatchResult(TypedDict):
    """`batch-NNNN.result.json`, and sync_batch's XCom: the outcome of one batch."""

    format_version: NotRequired[int]
    ref: str
    plan_id: str | None
    index: int | None
    tier: str | None
    group_id: str | None
    size: int
    status: str  # "running" | "done" | "failed"
    written: bool
    updated: int
    skipped: int
    changed_in_pos: int
    errors: int
    skip_reasons: dict[str, int]
    moves_applied: dict[str, int]
    changed_in_pos_ids: list[str]
    deleted_ids: list[str]
    # skipped because already in the target group (a person did it); absent in older files, which
    # only counted them (skip_reasons["already_in_target"])
    already_in_target_ids: list[str]
    error_details: list[ErrorDetail]
    api: ApiCounts
    error: NotRequired[str]


def batch_result_from_json(raw: Mapping[str, Any], where: str) -> BatchResult:
    """A result from a file or an XCom, with every count present.

    A missing or empty field reads as its empty value (0, [], {}), and a missing status as
    "done", exactly as the sync log has always read partial results. `where` names the source
    in errors (and stands in for a missing `ref`).
    """
    format_version_of(raw, where)
    out: dict[str, Any] = dict(raw)
    out.setdefault("ref", where)
    for key in ("plan_id", "index", "tier", "group_id"):
        out.setdefault(key, None)
    out["status"] = str(raw.get("status", "done"))
    out["written"] = bool(raw.get("written"))
    for key in ("size", "updated", "skipped", "changed_in_pos", "errors"):
        out[key] = int(raw.get(key) or 0)
    for key in ("skip_reasons", "moves_applied"):
        out[key] = dict(raw.get(key) or {})
    for key in ("changed_in_pos_ids", "deleted_ids", "already_in_target_ids", "error_details"):
        out[key] = list(raw.get(key) or [])
    out["api"] = sum_api(raw.get("api"))
    return cast("BatchResult", out)


# -- plan_sync -> verify_group_counts -> write_sync_log ----------------------------------------

# `expected_members.json`: tier -> the customer ids that tier's group should hold after a complete
# sync. On disk the tiers are top-level keys next to `format_version`.
ExpectedMembers = dict[str, list[str]]


def expected_members_to_json(members: Mapping[str, list[str]]) -> dict[str, Any]:
    return {**{tier: list(ids) for tier, ids in members.items()}, "format_version": FORMAT_VERSION}


def expected_members_from_json(raw: Any, where: str) -> ExpectedMembers | None:
    if not isinstance(raw, dict):
        return None
    format_version_of(raw, where)
    return {str(tier): [str(c) for c in ids] for tier, ids in raw.items() if tier != "format_version"}


class LeftAloneEntry(TypedDict):
    why: str  # protected | deleted | missing | deferred_by_limit | left_out_by_approval
    group_id: str | None  # the customer's live group at plan time
    group: str | None  # its label (GroupMap.label: a tier, or the group's name such as "Staff")


class LeftAlone(TypedDict):
    """`sync_plan/left_alone.json`: the customers the plan left alone for a reason the master
    cannot tell (no_tier and unchanged customers are not listed), read by the page's customer view."""

    format_version: NotRequired[int]
    plan_id: str
    customers: dict[str, LeftAloneEntry]  # customer id -> why


def left_alone_from_json(raw: Any, where: str) -> LeftAlone | None:
    if not isinstance(raw, dict):
        return None
    format_version_of(raw, where)
    customers = raw.get("customers")
    if not isinstance(customers, dict) or not all(isinstance(v, dict) and "why" in v for v in customers.values()):
        raise ValueError(f"{where} is not a left-alone file (customers: {{id: {{why, group_id, group}}}} needed)")
    return cast("LeftAlone", {**raw, "plan_id": str(raw.get("plan_id"))})


class LiveCustomersDoc(TypedDict):
    """`runs/<key>/live_customers.json.gz` (gzip'd JSON, `sync/live.py`): what the plan needs of the
    order store's customers, so plan_sync and plan_progress read no Parquet (issue 17).

    ``customers``: customer id -> [customer_group_id or null, deleted, version] of the newest
    extracted version; valid only while the store's customers cursor is ``customers_cursor``.
    """

    format_version: NotRequired[int]
    customers_cursor: int
    customers: dict[str, list[Any]]  # [group id | None, deleted: bool, version: int]


class PlanGroupMembers(TypedDict):
    """`sync_plan/tier_group_members.json`: each tier group's live members at the plan's cursor.

    The state the group check starts from: with the customers feed since ``customers_cursor`` it
    gives every tier group's members now without listing any group (verify.py).
    """

    format_version: NotRequired[int]
    plan_id: str
    customers_cursor: int
    members: dict[str, list[str]]  # tier group id -> customer ids


def plan_group_members_from_json(raw: Any, where: str) -> PlanGroupMembers | None:
    if not isinstance(raw, dict):
        return None
    format_version_of(raw, where)
    members = raw.get("members")
    cursor = raw.get("customers_cursor")
    if not isinstance(members, dict) or isinstance(cursor, bool) or not isinstance(cursor, int):
        raise ValueError(f"{where} is not a tier-group members file (members and customers_cursor needed)")
    return {
        "plan_id": str(raw.get("plan_id")),
        "customers_cursor": cursor,
        "members": {str(g): [str(c) for c in ids] for g, ids in members.items()},
    }


class FeedRecord(TypedDict):
    """One customer's newest state in a feed view: all a re-check or the group check needs (no names)."""

    version: int
    customer_group_id: str | None
    deleted_at: str | None


class FeedView(TypedDict):
    """`sync_plan/feed-<plan_id>-<to>.json`: the customers feed from the plan's cursor up to ``to``.

    ``records``: the newest record of every customer changed in (``start`` - 1, ``to``], as one
    re-check read it (``to`` is the highest version it saw, a real record's, so the next reader
    can page on from there and check that its answer is anchored). Written by sync_batch, read by
    later batches of the same plan and by the group check, so each pages only what is newer.
    """

    format_version: NotRequired[int]
    plan_id: str
    start: int
    to: int
    records: dict[str, FeedRecord]


def feed_view_from_json(raw: Any, where: str) -> FeedView:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not a feed view")
    format_version_of(raw, where)
    start, to, records = raw.get("start"), raw.get("to"), raw.get("records")
    if not isinstance(start, int) or not isinstance(to, int) or to < start or not isinstance(records, dict):
        raise ValueError(f"{where} is not a feed view (start, to and records needed, to >= start)")
    return cast("FeedView", {**raw, "plan_id": str(raw.get("plan_id"))})


class TierGroupCount(TypedDict):
    group_id: str | None
    expected: int
    actual: int
    members: int
    other_members: int
    missing: int
    unexpected: int
    match: bool
    # which customers disagree with the CSV (ids only): expected here but not in the group, and
    # managed customers in the group that belong elsewhere
    missing_ids: NotRequired[list[str]]
    unexpected_ids: NotRequired[list[str]]


class GroupCheck(TypedDict):
    """`runs/<key>/group_check.json`: verify_group_counts' result (or why it did not check)."""

    format_version: NotRequired[int]
    checked: NotRequired[bool]
    reason: NotRequired[str]
    group_counts: NotRequired[dict[str, TierGroupCount]]
    group_counts_match: NotRequired[bool]
    api: NotRequired[ApiCounts]
    # how the members were known: "feed" (the plan's state plus the customers feed since its
    # cursor, with the groups in `listed_groups` listed to confirm writes) or "listing" (every
    # tier group listed: a plan without tier_group_members.json)
    method: NotRequired[str]
    listed_groups: NotRequired[list[str]]


def group_check_from_json(raw: Any, where: str) -> GroupCheck | None:
    if not isinstance(raw, dict):
        return None
    format_version_of(raw, where)
    return cast("GroupCheck", raw)


class SyncLog(TypedDict):
    """`tier_sync_log.json`: one run's whole sync, customer ids only (no names, emails, tokens)."""

    format_version: int
    dag_id: Any
    run_id: Any
    run_type: Any
    logical_date: str | None
    as_of: str | None
    started_at: str | None
    finished_at: str
    dry_run: bool
    synced: bool
    skipped_reason: str | None
    total_customers: int
    managed: int
    planned_moves: int
    updated: int
    skipped: int
    skip_reasons: dict[str, int]
    protected: int
    deleted: int
    no_tier: int
    missing: int
    unchanged: int
    deferred_by_limit: int
    force_resync: bool
    limit: int | None
    changed_in_pos: int
    changed_in_pos_ids: list[str]
    errors: int
    failed_batches: int
    batches: int
    tier_breakdown: dict[str, int]
    moves: dict[str, int]
    moves_applied: dict[str, int]
    error_details: list[ErrorDetail]
    api: ApiCounts
    circuit_breaker: NotRequired[CircuitStatus]
    approval: NotRequired[dict[str, Any]]
    left_out_by_approval: NotRequired[dict[str, Any]]
    group_counts_match: NotRequired[bool | None]
    group_counts: NotRequired[dict[str, TierGroupCount] | None]
    progress: NotRequired[dict[str, Any]]  # progress at the till (sync/progress.py)
