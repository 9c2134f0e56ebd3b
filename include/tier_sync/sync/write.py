"""Writing one batch: the re-check against the live feed, membership calls, per-customer fallback.

This is the only code that changes the store's till, and it runs in each of up to 256 mapped
``sync_batch`` instances, so it loads only its batch file (and its progress file) and imports no
pandas, numpy or pyarrow, not even lazily (tests/unit/test_sync_write_imports.py proves it).
Besides those two files it reads and writes only the plan's newest feed view (below).

* **Current group is re-checked right before writing** against the customers version feed since
  the plan's cursor: anyone a person moved meanwhile is left alone (``changed_in_pos``). The
  feed is paged only from where the previous re-check of the same plan stopped (its saved view,
  ``sync_plan/feed-<plan_id>-<to>.json``), so N batches cost pages in proportion to the customers
  they move, not to N squared. An answer that cannot be the whole truth (see
  `read_customer_changes`) fails the batch before any write instead of letting every customer
  look unchanged.
* **A deleted target group fails the batch at once** (`GroupDeletedError`, no retries): a refused
  membership call is checked against the group with one GET, never turned into one failing GET +
  PUT per customer.
* **Idempotent writes**: adding a customer to a group is naturally idempotent; before each call the
  batch records the ids it is about to send (``.progress.json``), so a retried batch recognises its
  own earlier, possibly unacknowledged, writes in the feed and reports them as ``updated`` without
  a second write. A customer a person put in the target group counts as ``skipped``.
* Every batch writes its result file next to its batch file, ``failed`` included, so the sync log
  can be aggregated from files even when an XCom is missing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio
from include.tier_sync.lightspeed_errors import LightspeedError, LightspeedUnavailable
from include.tier_sync.sync.batches import (
    CALL_SIZE,
    chunks,
    plan_dir_of,
    progress_path,
    read_batch,
    read_latest_feed_view,
    ref_path,
    result_path,
    write_feed_view,
)
from include.tier_sync.sync.contracts import (
    FORMAT_VERSION,
    BatchFile,
    BatchMove,
    BatchResult,
    FeedRecord,
    FeedView,
    api_diff,
    api_stats,
    is_null,
    zero_api,
)
from include.tier_sync.sync.groups import is_placeholder

if TYPE_CHECKING:
    from include.tier_sync.lightspeed import LightspeedClient

log = logging.getLogger(__name__)


class RecheckUnreliable(LightspeedUnavailable):
    """The re-check's answer cannot be complete (an empty or cut page): nothing of the batch was written.

    Transient (a gateway's odd page), so Airflow retries the batch; written blindly instead, a
    customer a person moved meanwhile would be moved back.
    """


class GroupDeletedError(LightspeedError):
    """The batch's target group was deleted in the POS after the plan: a retry cannot help, a re-plan can.

    The DAG's retry policy (`retry_rules.py`) fails the task at once: no retry.
    """

    def __init__(self, group_name: str, group_id: str) -> None:
        super().__init__(
            f"group {group_name} ({group_id}) was deleted in the POS; re-plan (re-run the DAG)", 404
        )
        self.group_id = group_id
        self.group_name = group_name


def new_result(ref: str, batch: Mapping[str, Any]) -> BatchResult:
    """A batch's result before anything happened (also the base of a "never finished" result)."""
    return {
        "format_version": FORMAT_VERSION,
        "ref": ref,
        "plan_id": batch.get("plan_id"),
        "index": batch.get("index"),
        "tier": batch.get("tier"),
        "group_id": batch.get("group_id"),
        "size": len(batch.get("moves") or []),
        "status": "running",
        "written": False,
        "updated": 0,
        "skipped": 0,
        "changed_in_pos": 0,
        "errors": 0,
        "skip_reasons": {},
        "moves_applied": {},
        "changed_in_pos_ids": [],
        "deleted_ids": [],
        "already_in_target_ids": [],
        "error_details": [],
        "api": zero_api(),
    }


def read_customer_changes(
    client: LightspeedClient,
    customers_cursor: int,
    *,
    plan_dir: str | None = None,
    plan_id: str | None = None,
    consequence: str = "nothing of this batch was written",
) -> FeedView:
    """The newest record of every customer changed since the plan's cursor (deleted included).

    The feed is read from where the newest saved view of the same plan ends (another batch's
    re-check, `batches.read_latest_feed_view`), or from the plan's cursor when there is none, and
    the result is saved as the plan's newest view (when ``plan_dir`` and ``plan_id`` are given).
    So each reader pages only what changed since the last one: a batch's re-check costs pages in
    proportion to the writes made since (its own batch and the ones running beside it), not to
    every customer the run has moved so far. A view is the whole range's answer on its own, so
    merging it with the pages after it gives exactly what one pass from the cursor would.

    The pass starts one version below where it resumes: the record whose version was that point
    is then always in a truthful answer (at that version, or later if changed since; deleted ones
    too), and an answer without any record at or past it raises `RecheckUnreliable` (an empty
    or cut page would make everyone look unchanged). From cursor 0 the whole feed is read.
    """
    start = int(customers_cursor)
    base = read_latest_feed_view(plan_dir, plan_id, start) if plan_dir and plan_id else None
    after = base["to"] if base is not None else start
    records: dict[str, FeedRecord] = dict(base["records"]) if base is not None else {}
    anchored = False
    top = after
    for page in client.iter_pages("/customers", after=max(after - 1, 0), params={"deleted": "true"}):
        for record in page.data:
            version = int(record.get("version") or 0)
            anchored = anchored or version >= after
            top = max(top, version)
            cid = str(record.get("id"))
            known = records.get(cid)
            if known is None or version >= int(known["version"]):
                records[cid] = _feed_record(record, version)
    if after > 0 and not anchored:
        where = "the plan's cursor" if base is None else "the last saved view of the feed"
        raise RecheckUnreliable(
            f"the customers feed looks empty or cut (no record at or past {where}, {after}, which a "
            f"whole answer always holds): customers moved in the POS meanwhile cannot be told apart, "
            f"so {consequence}; retry later"
        )
    view: FeedView = {"plan_id": str(plan_id), "start": start, "to": top, "records": records}
    if plan_dir and plan_id:
        write_feed_view(plan_dir, view)
    log.info(
        "Customers feed since cursor %s: %s changed customers (%s from a saved view, read on from %s)",
        start,
        len(records),
        len(base["records"]) if base is not None else 0,
        after,
    )
    return view


def _feed_record(record: Mapping[str, Any], version: int) -> FeedRecord:
    group, deleted = record.get("customer_group_id"), record.get("deleted_at")
    return {
        "version": version,
        "customer_group_id": None if is_null(group) else str(group),
        "deleted_at": None if is_null(deleted) else str(deleted),
    }


def recheck_customers(
    client: LightspeedClient,
    ids: Iterable[str],
    customers_cursor: int,
    *,
    plan_dir: str | None = None,
    plan_id: str | None = None,
) -> dict[str, FeedRecord]:
    """Newest state of ``ids`` among customers changed since the plan's cursor (deleted included).

    The version feed (`read_customer_changes`): cheap (only what changed since the extraction,
    and with a plan folder only what changed since the previous batch's re-check), complete
    (unlike search), and it sees our own earlier writes as well as a person's. A customer of the
    batch absent from it has not changed since the plan, *if* the answer is whole; an answer that
    cannot be raises `RecheckUnreliable` before anything is written (Airflow retries the batch;
    the alternative, one GET per customer, costs ~500 requests a batch). From cursor 0 (nothing
    extracted) the whole feed is read, so every customer of the batch must be in it.
    """
    wanted = set(ids)
    cursor = int(customers_cursor)
    view = read_customer_changes(client, cursor, plan_dir=plan_dir, plan_id=plan_id)
    seen = {cid: view["records"][cid] for cid in wanted if cid in view["records"]}
    absent = len(wanted - seen.keys())
    if cursor <= 0 and absent:
        raise RecheckUnreliable(
            f"the pre-write re-check of the customers feed looks empty or cut ({absent} of the batch's "
            f"{len(wanted)} customers absent from the whole feed): customers moved in the POS meanwhile "
            "cannot be told apart, so nothing of this batch was written; retry later"
        )
    return seen


def sync_batch(
    ref: Mapping[str, Any] | str, client: LightspeedClient, *, writes_allowed: bool
) -> BatchResult:
    """Write one batch (`ref`: a `BatchRef` or the batch file's path): re-check, then membership calls.

    Per customer of the batch (``from`` = planned from-group, ``to`` = target):

    * not changed since the plan, or changed but still in ``from`` -> written;
    * now in ``to``: ``updated`` when an earlier attempt of this batch sent it (a retry after an
      unacknowledged write), else ``skipped`` (a person did it); no second write. A force_resync
      re-assert (``from == to``) is written again unless an earlier attempt sent it;
    * in any other group -> ``changed_in_pos``, left alone;
    * deleted meanwhile -> ``skipped``.

    A re-check answer that cannot be whole raises `RecheckUnreliable` before any write (retried).
    A membership call refused with a 4xx other than 429 falls back to GET + PUT per customer of
    that call: a 404 or a refused PUT becomes an ``error_details`` entry and the others go on.
    But first, on a 404 of the call (or the first refused PUT), one GET of the target group: when
    it was deleted in the POS the batch raises `GroupDeletedError` at once (no per-customer
    requests; the task fails without retries: only a new plan can help).
    5xx, resets and 429 are the client's to retry; when it gives up (or auth fails) this raises,
    after writing a ``failed`` result file, so Airflow retries the batch, idempotently.
    With ``writes_allowed=False`` nothing is sent at all (zero requests): every move is ``skipped``.
    """
    path = ref_path(ref)
    batch = read_batch(path)
    group_id = str(batch["group_id"])
    moves = list(batch["moves"])
    result = new_result(path, batch)
    stats_before = api_stats(client)
    try:
        if not writes_allowed:
            result["skipped"] = len(moves)
            result["skip_reasons"] = {"writes_not_allowed": len(moves)}
            result["written"] = False
        else:
            if is_placeholder(group_id):
                raise ValueError(f"batch {path} targets a group that does not exist ({group_id})")
            _write_batch(client, batch, moves, result, path)
            result["written"] = True
        result["status"] = "done"
    except Exception as exc:
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["api"] = api_diff(api_stats(client), stats_before)
        fileio.write_json(result_path(path), result)
        raise
    result["api"] = api_diff(api_stats(client), stats_before)
    fileio.write_json(result_path(path), result)
    log.info(
        "Batch %s of %s (%s, %s customers): %s updated, %s skipped, %s changed in POS, %s errors; %s requests",
        batch.get("index"),
        batch.get("of", "?"),
        batch.get("tier"),
        len(moves),
        result["updated"],
        result["skipped"],
        result["changed_in_pos"],
        result["errors"],
        result["api"]["requests"],
    )
    return result


@dataclass
class _Tally:
    """What one batch did so far; folded into its BatchResult at the end."""

    group_id: str
    group_name: str
    tier: str
    result: BatchResult
    group_checked: bool = False  # the target group was looked up after a refused write
    applied: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)

    def applied_move(self, move: BatchMove) -> None:
        self.applied[f"{move['from']}->{self.tier}"] += 1

    def deleted(self, cid: str) -> None:
        self.skip_reasons["deleted"] += 1
        self.result["deleted_ids"].append(cid)

    def fold(self) -> None:
        result = self.result
        result["moves_applied"] = dict(sorted(self.applied.items()))
        result["updated"] = sum(self.applied.values())
        result["skip_reasons"] = dict(sorted(self.skip_reasons.items()))
        result["skipped"] = sum(self.skip_reasons.values())
        result["changed_in_pos"] = len(result["changed_in_pos_ids"])
        result["errors"] = len(result["error_details"])


def _current_group(record: Mapping[str, Any]) -> str | None:
    value = record.get("customer_group_id")
    return None if is_null(value) else str(value)


def _attempted_before(progress_file: str, plan_id: str | None) -> set[str]:
    """Ids an earlier attempt of this batch (same plan) was about to send."""
    progress = fileio.read_json(progress_file) or {}
    return set(progress.get("attempted") or []) if progress.get("plan_id") == plan_id else set()


def _triage(
    moves: Sequence[BatchMove], live: Mapping[str, Mapping[str, Any]], attempted: set[str], tally: _Tally
) -> list[BatchMove]:
    """The moves still to write, after the re-check; the others are tallied here."""
    to_write: list[BatchMove] = []
    for move in moves:
        cid = str(move["customer_id"])
        record = live.get(cid)
        if record is None:
            to_write.append(move)
            continue
        if not is_null(record.get("deleted_at")):
            tally.deleted(cid)
            continue
        now_group = _current_group(record)
        if now_group == tally.group_id and cid in attempted:
            tally.applied_move(move)  # our earlier, unacknowledged write landed
        elif now_group == tally.group_id and move.get("from_group_id") != tally.group_id:
            tally.skip_reasons["already_in_target"] += 1
            tally.result["already_in_target_ids"].append(cid)
        elif now_group == move.get("from_group_id"):
            to_write.append(move)
        else:
            tally.result["changed_in_pos_ids"].append(cid)
    return to_write


def _write_batch(
    client: LightspeedClient,
    batch: BatchFile,
    moves: list[BatchMove],
    result: BatchResult,
    ref: str,
) -> None:
    from include.tier_sync.lightspeed import LightspeedClientError, LightspeedNotFound

    tally = _Tally(
        group_id=str(batch["group_id"]),
        group_name=str(batch.get("group_name") or batch["tier"]),
        tier=str(batch["tier"]),
        result=result,
    )
    plan_id = batch.get("plan_id")
    progress_file = progress_path(ref)
    attempted = _attempted_before(progress_file, plan_id)
    live = recheck_customers(
        client,
        (m["customer_id"] for m in moves),
        int(batch["customers_cursor"]),
        plan_dir=plan_dir_of(ref),
        plan_id=str(plan_id) if plan_id else None,
    )
    to_write = _triage(moves, live, attempted, tally)

    for call in chunks(to_write, CALL_SIZE):
        ids = [str(m["customer_id"]) for m in call]
        attempted.update(ids)
        fileio.write_json(progress_file, {"plan_id": plan_id, "attempted": sorted(attempted)})
        try:
            client.add_customers_to_group(tally.group_id, ids)
        except (LightspeedClientError, LightspeedNotFound) as exc:
            status = getattr(exc, "status", 404)
            if isinstance(exc, LightspeedNotFound):
                _raise_if_group_gone(client, tally)  # a 404 is most likely the group itself
            log.warning(
                "Membership call for %s customers refused (HTTP %s); falling back to one PUT each",
                len(ids),
                status,
            )
            _fallback_per_customer(client, call, tally)
            continue
        for move in call:
            tally.applied_move(move)
    tally.fold()


def _fallback_per_customer(client: LightspeedClient, call: Sequence[BatchMove], tally: _Tally) -> None:
    """Decision 4: GET the customer, change customer_group_id, PUT the whole object back.

    The GET doubles as a last re-check: a customer who is no longer in the planned from-group
    (and not already in the target) is left alone. The first refusal of the batch looks the
    target group up once: gone, the batch fails at once instead of refusing customer after customer.
    """
    from include.tier_sync.lightspeed import LightspeedClientError, LightspeedNotFound

    errors = tally.result["error_details"]
    for move in call:
        cid = str(move["customer_id"])
        try:
            _put_one(client, move, tally)
        except LightspeedNotFound:
            errors.append({"customer_id": cid, "error": "not found (HTTP 404)"})
        except LightspeedClientError as exc:
            _raise_if_group_gone(client, tally)
            status = getattr(exc, "status", None)
            errors.append({"customer_id": cid, "error": f"refused (HTTP {status})"})


def _raise_if_group_gone(client: LightspeedClient, tally: _Tally) -> None:
    """After a refused write, one GET of the target group (once a batch): unknown (404) or
    soft-deleted raises `GroupDeletedError`; a live group lets the caller go on."""
    from include.tier_sync.lightspeed import LightspeedNotFound

    if tally.group_checked:
        return
    tally.group_checked = True
    try:
        group = client.get_customer_group(tally.group_id)  # envelope-checked like every call
    except LightspeedNotFound as exc:
        raise GroupDeletedError(tally.group_name, tally.group_id) from exc
    if not is_null(group.get("deleted_at")):
        raise GroupDeletedError(tally.group_name, tally.group_id)
    log.info(
        "Target group %s (%s) is live; the refused write was about the customers",
        tally.group_name,
        tally.group_id,
    )


def _put_one(client: LightspeedClient, move: BatchMove, tally: _Tally) -> None:
    cid = str(move["customer_id"])
    customer = dict(client.get_customer(cid))
    if not is_null(customer.get("deleted_at")):
        tally.deleted(cid)
        return
    now_group = _current_group(customer)
    if now_group == tally.group_id and move.get("from_group_id") != tally.group_id:
        tally.applied_move(move)  # the refused call may have applied it
        return
    if now_group != move.get("from_group_id"):
        tally.result["changed_in_pos_ids"].append(cid)
        return
    customer["customer_group_id"] = tally.group_id
    client.put_customer(cid, customer)
    tally.applied_move(move)
