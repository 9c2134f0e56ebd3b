"""Erasing one customer from the data dir (the data-dir part of README "Privacy: erasure").

`erase_customer(data_dir, customer_id)` removes every per-customer row of that customer:

- the master CSV and `tier_changes.csv` at the data dir root and in every run folder (its own and
  its `published/` copy; every folder under `runs/`, dated in the future or not);
- every JSON file under `runs/` (sync plan and batches, batch results, expected members, group
  check, sync logs, validation reports; gzip'd ones too: `live_customers.json.gz`) and the root `tier_sync_log.json` / `validation/latest.json` /
  `till_progress_state.json`:
  list items naming the customer (their id, or a dict whose `customer_id` / `Customer ID` / `id`
  is theirs, or one of their identifying values: code, email, phone, name) and keys equal to the id;
- the order store: every segment holding one of their customer versions or sales is rewritten
  without those rows and the manifest committed with the store's own compare-and-swap, so readers
  see the old or the new segments, never a mix; the replaced segment files are then deleted.

Aggregates stay as they are (`tier_history.csv`, `sync_history.csv`, the counts in sync logs): they
count customers, they name none. What the data dir cannot fix is reported under `needs_attention`:
git history, the Data Docs HTML, damaged store copies set aside by a full refresh. Every file is
computed in memory first and then written atomically (`fileio`); a failure part-way leaves each file
either old or new, and running the command again finishes the job.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from include.tier_sync import fileio, ledger, spreadsheet
from include.tier_sync.ledger import CHANGES_FILE, MASTER_FILE, RunPaths
from include.tier_sync.rules import ALL_TIERS

log = logging.getLogger(__name__)

ID_KEYS = ("customer_id", "Customer ID", "id")
IDENTIFYING_COLUMNS = ("Customer Code", "Email", "Phone", "Name")  # of the master
STORE_IDENTIFYING = ("customer_code", "email", "phone", "mobile", "name")  # of the store's customers
_CSV_NAMES = (MASTER_FILE, CHANGES_FILE)
_MAX_ID = 200


class CustomerNotFound(LookupError):
    """The id is in no file of the data dir and not in the order store: nothing was changed."""


def check_customer_id(raw: str) -> str:
    """The id as given, or ValueError: blank, surrounding whitespace, control characters, too long."""
    if not raw or raw != raw.strip() or any(ord(c) < 32 or ord(c) == 127 for c in raw) or len(raw) > _MAX_ID:
        raise ValueError(
            f"not a customer id: {raw!r} (it must be a Lightspeed customer id as in the master's "
            f"'Customer ID' column: no surrounding whitespace or control characters, at most {_MAX_ID} characters)"
        )
    return raw


@dataclass
class _Plan:
    """What erasing will write: url -> new bytes, and per url the rows/items it removes."""

    writes: dict[str, bytes] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    needles: set[str] = field(default_factory=set)


def erase_customer(data_dir: str, customer_id: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Remove one customer from the data dir (see the module doc); returns what it touched.

    Raises ValueError for a malformed id and CustomerNotFound when nothing holds it. With
    `dry_run` nothing is written; the report says what would be.
    """
    from include.tier_sync.store import OrderStore

    cid = check_customer_id(customer_id)
    if not fileio.exists(data_dir):
        raise ValueError(f"the data dir {data_dir} does not exist; give the folder the pipeline writes to")
    paths = RunPaths(data_dir, datetime(1970, 1, 1, tzinfo=UTC))  # only the data dir's own paths are used
    store = OrderStore(paths.store)
    with ledger.publishing(paths):  # no publish step rewrites the stable files meanwhile
        plan = _Plan(needles={cid})
        plan.needles |= _store_identifiers(store, cid)
        for url in _csv_files(paths):
            _plan_csv(plan, url, cid)
        plan.needles = {n for n in plan.needles if n == cid or (len(n) >= 3 and n not in ALL_TIERS)}
        for url in _json_files(paths):
            _plan_json(plan, url, cid)
        store_counts = _erase_from_store(store, cid, dry_run=True)
        if not plan.removed and not any(store_counts.values()):
            raise CustomerNotFound(
                f"customer {cid!r} is in no master, tier change, sync file or the order store under "
                f"{data_dir}; nothing was changed (check the id: it is the master's 'Customer ID')"
            )
        if not dry_run:
            for url, data in plan.writes.items():
                fileio.write_bytes(url, data)
            store_counts = _erase_from_store(store, cid, dry_run=False)
    report: dict[str, Any] = {
        "customer_id": cid,
        "data_dir": data_dir,
        "dry_run": dry_run,
        "files": [{"path": url, "removed": n} for url, n in sorted(plan.removed.items())],
        "store": store_counts,
        "needs_attention": _needs_attention(paths, plan.needles),
        "kept_aggregates": [paths.tier_history, paths.sync_history],
    }
    log.info(
        "erase_customer %s%s: %d files, store rows %s",
        cid,
        " (dry run)" if dry_run else "",
        len(report["files"]),
        store_counts,
    )
    return report


# -- CSVs -------------------------------------------------------------------------------------


def _csv_files(paths: RunPaths) -> list[str]:
    """The root master and changes, and every master / changes file anywhere under runs/."""
    out = [u for u in (paths.master_csv, paths.tier_changes) if fileio.exists(u)]
    for rel in fileio.walk_files(paths.runs_dir):
        if rel.rsplit("/", 1)[-1] in _CSV_NAMES:
            out.append(fileio.join(paths.runs_dir, rel))
    return out


def _plan_csv(plan: _Plan, url: str, cid: str) -> None:
    from include.tier_sync.master_csv import to_csv_bytes

    frame = spreadsheet.read_raw_csv(fileio.read_bytes(url))
    if "Customer ID" not in frame.columns:
        return
    hit = frame["Customer ID"] == cid
    if not hit.any():
        return
    for name in IDENTIFYING_COLUMNS:
        if name in frame.columns:
            plan.needles |= {v for v in frame.loc[hit, name] if v}
    plan.writes[url] = to_csv_bytes(frame.loc[~hit].reset_index(drop=True))
    plan.removed[url] = int(hit.sum())


# -- JSON -------------------------------------------------------------------------------------


def _json_files(paths: RunPaths) -> list[str]:
    from include.tier_sync.sync.progress import state_file  # progress at the till: id -> text

    out = [u for u in (paths.sync_log, paths.latest_validation_json, state_file(paths)) if fileio.exists(u)]
    out += [fileio.join(paths.runs_dir, r) for r in fileio.walk_files(paths.runs_dir) if r.endswith((".json", ".json.gz"))]
    return out


def _plan_json(plan: _Plan, url: str, cid: str) -> None:
    gzipped = url.endswith(".gz")
    raw = fileio.read_bytes(url)
    try:
        doc = json.loads((gzip.decompress(raw) if gzipped else raw).decode("utf-8"))
    except (ValueError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{url} is not readable JSON ({exc}); fix or remove it, then run the erasure again") from exc
    cleaned, removed = scrub(doc, cid, frozenset(plan.needles))
    if removed:
        data = (json.dumps(cleaned, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
        plan.writes[url] = gzip.compress(data, mtime=0) if gzipped else data
        plan.removed[url] = removed


def scrub(obj: Any, customer_id: str, needles: frozenset[str]) -> tuple[Any, int]:
    """`obj` without list items that name the customer (a needle, or a dict whose id key is the
    customer's) and without dict keys equal to the id; returns it and how many it removed."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        n = 0
        for key, value in obj.items():
            if key == customer_id:
                n += 1
                continue
            out[key], m = scrub(value, customer_id, needles)
            n += m
        return out, n
    if isinstance(obj, list):
        items: list[Any] = []
        n = 0
        for item in obj:
            if _names_customer(item, customer_id, needles):
                n += 1
                continue
            cleaned, m = scrub(item, customer_id, needles)
            items.append(cleaned)
            n += m
        return items, n
    return obj, 0


def _names_customer(item: Any, customer_id: str, needles: frozenset[str]) -> bool:
    if isinstance(item, str):
        return item in needles
    if isinstance(item, dict):
        return any(str(item.get(k)) == customer_id for k in ID_KEYS if item.get(k) is not None)
    return False


# -- the order store ----------------------------------------------------------------------------


def _store_identifiers(store: Any, cid: str) -> set[str]:
    """The customer's identifying values in the store (to find them in validation samples)."""
    import pyarrow.compute as pc

    from include.tier_sync.store import CUSTOMERS

    if not fileio.exists(store.manifest_url):
        return set()
    table = store.read_table(CUSTOMERS)
    rows = table.filter(pc.fill_null(pc.equal(table.column("id"), cid), False))
    return {str(v) for name in STORE_IDENTIFYING for v in rows.column(name).to_pylist() if v}


def _erase_from_store(store: Any, cid: str, *, dry_run: bool) -> dict[str, int]:
    """Rewrite the segments holding the customer (their versions, their sales) without them
    (`OrderStore.drop_rows`: committed with the store's compare-and-swap, so a concurrent
    extraction makes it fail loudly: run again once extract_orders has finished)."""
    from include.tier_sync.store import CUSTOMERS, SALES

    if not fileio.exists(store.manifest_url):
        return {"customers": 0, "sales": 0, "segments_rewritten": 0}
    counts: dict[str, int] = store.drop_rows({CUSTOMERS: "id", SALES: "customer_id"}, cid, dry_run=dry_run)
    return counts


# -- what the data dir cannot fix -----------------------------------------------------------------


def _needs_attention(paths: RunPaths, needles: Iterable[str]) -> list[str]:
    out = []
    if fileio.exists(paths.git_dir):
        out.append(
            f"{paths.git_dir}: the git working copy / default remote hold every committed master; "
            "rewrite their history (README: Privacy, erasure) or commit without contacts from now on"
        )
    docs = paths.data_docs_dir
    wanted = [n.encode() for n in needles if n]
    hits = [r for r in fileio.walk_files(docs) if any(w in fileio.read_bytes(fileio.join(docs, r)) for w in wanted)]
    if hits:
        out.append(
            f"{docs}: {len(hits)} Data Docs page(s) mention the customer (e.g. {hits[0]}); delete the folder, "
            "the next validation rebuilds it"
        )
    damaged = [n for n in fileio.listdir(paths.store) if n.startswith("damaged-")]
    if damaged:
        out.append(f"{paths.store}: damaged copies set aside by a full refresh ({', '.join(damaged)}) may hold "
                   "the customer; delete them once they are no longer needed")
    return out
