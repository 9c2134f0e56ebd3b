"""Writing one batch of progress texts (the mapped `progress_batch` task; see progress.py).

Per customer: GET the record (fresh: deleted? protected? what the field holds now), and only
when the field differs, set it and PUT the whole record back: right whether the POS merges a
PUT or replaces the record (docs/lightspeed-x-series-api.md §4.1), and whether it answers
`{"data": customer}` or the bare customer. An answer that shows another text than the one sent
(the POS redacts what looks like card data) is a failure of that customer, never a success.

Idempotent: a retried batch GETs again and finds its earlier writes in place (counted `written`
when this batch had sent them, from its ``.progress.json``), so a customer is PUT at most once
per needed change plus the client's own retries of one request. 404s and refused PUTs fail that
customer and the batch goes on; 5xx, timeouts and resets the client retries, then the batch
raises (after its result file is written) and Airflow retries it. Imports no pandas.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio
from include.tier_sync.sync.contracts import FORMAT_VERSION, api_diff, api_stats, format_version_of, is_null
from include.tier_sync.sync.groups import GroupMap
from include.tier_sync.sync.progress import PROGRESS_SUFFIX, RESULT_SUFFIX, beside

if TYPE_CHECKING:
    from include.tier_sync.lightspeed import LightspeedClient

log = logging.getLogger(__name__)


def _new_result(ref: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "ref": ref, "plan_id": batch.get("plan_id"),
            "index": batch.get("index"), "size": len(batch.get("items") or []), "status": "running",
            "written": 0, "unchanged": 0, "skipped_protected": 0, "skipped_deleted": 0, "failed": 0,
            "failed_details": [], "versions": {}, "done_ids": []}


def _read_batch(ref: str) -> dict[str, Any]:
    raw = fileio.read_json(ref)
    if not isinstance(raw, dict) or not isinstance(raw.get("items"), list) or not raw.get("field"):
        raise ValueError(f"{ref} is not a progress batch file")
    format_version_of(raw, ref)
    return raw


def write_progress_batch(ref: Mapping[str, Any] | str, client: LightspeedClient, *,
                         writes_allowed: bool) -> dict[str, Any]:
    """Write one batch's texts (`ref`: the plan's ref or the batch file's path); returns its result
    without the per-customer lists (those stay in the result file)."""
    path = str(ref["ref"]) if isinstance(ref, Mapping) else str(ref)
    batch = _read_batch(path)
    result = _new_result(path, batch)
    before = api_stats(client)
    try:
        if not writes_allowed:
            raise ValueError(f"{path}: this run may not write to the POS, yet a progress batch was dispatched")
        _write_items(client, batch, result, beside(path, PROGRESS_SUFFIX))
        result["status"] = "done"
    except Exception as exc:
        result["status"], result["error"] = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result["api"] = api_diff(api_stats(client), before)
        fileio.write_json(beside(path, RESULT_SUFFIX), result)
    log.info("Progress batch %s/%s: %s written, %s unchanged, %s protected, %s deleted, %s failed; %s requests",
             batch.get("index"), batch.get("of"), result["written"], result["unchanged"],
             result["skipped_protected"], result["skipped_deleted"], result["failed"], result["api"]["requests"])
    return {k: v for k, v in result.items() if k not in ("versions", "done_ids")}  # the XCom: counts only


def _attempted(progress_file: str, plan_id: Any) -> set[str]:
    raw = fileio.read_json(progress_file) or {}
    return set(raw.get("attempted") or []) if raw.get("plan_id") == plan_id else set()


@dataclass
class _Sent:
    """The ids this batch PUT (or was about to), kept in its ``.progress.json`` before each PUT."""

    path: str
    plan_id: Any
    earlier: set[str]  # sent by an earlier attempt: found already right, they count as written
    ids: set[str]

    def add(self, cid: str) -> None:
        self.ids.add(cid)
        fileio.write_json(self.path, {"plan_id": self.plan_id, "attempted": sorted(self.ids)})


def _write_items(client: LightspeedClient, batch: Mapping[str, Any], result: dict[str, Any],
                 progress_file: str) -> None:
    field, groups = str(batch["field"]), GroupMap.from_dict(batch["groups"])
    earlier = _attempted(progress_file, batch.get("plan_id"))
    sent = _Sent(progress_file, batch.get("plan_id"), earlier, set(earlier))
    for item in batch["items"]:
        _write_one(client, str(item["customer_id"]), str(item["text"]), field, groups, sent, result)
        result["done_ids"].append(str(item["customer_id"]))  # whatever the outcome: finished


def _write_one(client: LightspeedClient, cid: str, text: str, field: str, groups: GroupMap,
               sent: _Sent, result: dict[str, Any]) -> None:
    from include.tier_sync.lightspeed import LightspeedClientError, LightspeedNotFound

    try:
        customer = dict(client.get_customer(cid))
        if not is_null(customer.get("deleted_at")):
            result["skipped_deleted"] += 1
            return
        group = customer.get("customer_group_id")
        if not groups.is_managed(None if is_null(group) else str(group)):
            result["skipped_protected"] += 1  # a person put them in Staff / Wholesale meanwhile
            return
        if customer.get(field) == text:
            result["written" if cid in sent.earlier else "unchanged"] += 1  # ours landed before a retry
            result["versions"][cid] = {"text": text, "version": customer.get("version")}
            return
        customer[field] = text
        sent.add(cid)
        answer = client.put_customer(cid, customer)
    except LightspeedNotFound:
        _fail(result, cid, "not found (HTTP 404)")
        return
    except LightspeedClientError as exc:
        _fail(result, cid, f"refused (HTTP {getattr(exc, 'status', None)})")
        return
    if field in answer and answer.get(field) != text:
        _fail(result, cid, f"the POS kept another text in {field} than the one sent (redacted?)")
        return
    result["written"] += 1
    result["versions"][cid] = {"text": text, "version": answer.get("version")}


def _fail(result: dict[str, Any], cid: str, error: str) -> None:
    result["failed"] += 1
    result["failed_details"].append({"customer_id": cid, "error": error})
