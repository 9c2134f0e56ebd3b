"""What the "Loyalty tiers" page in the Airflow UI shows, computed from the files the pipeline writes.

This is the page's public API: the Airflow plugin (plugins/loyalty_tiers/app.py) calls only this
module. Pure functions over a data dir (a local folder or any fsspec URL): no Airflow, no writes.
The page must stay fast with 200,000 customers, so the API only ever returns aggregates, one page
of a list, or the few customers a search matched. This module holds the endpoints that combine
the parts (the summary at the top of the page, the at-risk page, search, one customer, Data Docs)
and re-exports the rest; each job has its own module:

- dashboard_cache: file signatures and the parse-once-per-file-version cache;
- dashboard_master: the parsed latest master CSV and looking customers up in it;
- dashboard_at_risk: which customers drop a tier if they buy nothing, and when (the order store);
- dashboard_runs: tiers over time, moves per run, one customer's tier changes (the run ledger).

Heavy modules (pandas, numpy, pyarrow) are imported inside the functions that need them: the
Airflow plugin imports this module when the api-server starts.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import posixpath
from datetime import UTC, datetime, timedelta
from typing import Any

from include.tier_sync import fileio, ledger
from include.tier_sync.customer_access import mask_email
from include.tier_sync.dashboard_at_risk import STORE_BATCH_ROWS as STORE_BATCH_ROWS
from include.tier_sync.dashboard_at_risk import at_risk_all, parse_iso
from include.tier_sync.dashboard_cache import LISTING_TTL_S as LISTING_TTL_S
from include.tier_sync.dashboard_cache import SETTINGS_TTL_S as SETTINGS_TTL_S
from include.tier_sync.dashboard_cache import clear_cache as clear_cache
from include.tier_sync.dashboard_cache import read_csv, read_json, signature, variable
from include.tier_sync.dashboard_master import Master as Master
from include.tier_sync.dashboard_master import customer_row, find_rows, latest_run, load_master, money
from include.tier_sync.dashboard_runs import classify_move as classify_move
from include.tier_sync.dashboard_runs import history as history
from include.tier_sync.dashboard_runs import moves as moves
from include.tier_sync.dashboard_runs import tier_history_of
from include.tier_sync.ledger import CHANGES_FILE as CHANGES_FILE
from include.tier_sync.ledger import HISTORY_FILE as HISTORY_FILE
from include.tier_sync.ledger import LATEST_FILE, SYNC_LOG_FILE
from include.tier_sync.ledger import MASTER_FILE as MASTER_FILE
from include.tier_sync.ledger import RUN_FILE as RUN_FILE
from include.tier_sync.ledger import STORE_DIR as STORE_DIR
from include.tier_sync.ledger import VALIDATION_FILE as VALIDATION_FILE
from include.tier_sync.rules import SPROUT, TIER_RANK, TierRules
from include.tier_sync.settings import VAR_DATA_DIR, VAR_RULES

log = logging.getLogger(__name__)

# The old private name of dashboard_cache.read_csv, for callers that read a pipeline CSV through it
# (load_master reads through dashboard_master's own import: patch that one to change what it reads).
_read_csv = read_csv

# The data dir's layout is the run ledger's (ledger.py); these are its names as seen from the top.
VALIDATION_LATEST = f"{ledger.VALIDATION_DIR}/{LATEST_FILE}"
DATA_DOCS_DIR = f"{ledger.VALIDATION_DIR}/{ledger.DATA_DOCS_DIR}"

MAX_PAGE = 200  # the most rows any list endpoint returns at once
MAX_SEARCH = 25


# -- configuration -----------------------------------------------------------------------------------


def resolve_data_dir() -> str:
    """The pipeline's data dir, as the api-server sees it: the cached Variable, checked by the same
    validator as the tasks' (settings.check_data_dir; ValueError when refused)."""
    from include.tier_sync import settings

    return settings.check_data_dir(variable(VAR_DATA_DIR))


def resolve_rules() -> TierRules:
    raw = variable(VAR_RULES)
    if not raw:
        return TierRules()
    try:
        return TierRules.from_mapping(json.loads(raw))
    except (ValueError, TypeError) as exc:
        log.warning("Variable %s is not usable (%s); the dashboard uses the default rules", VAR_RULES, exc)
        return TierRules()


def warm_up(data_dir: str, rules: TierRules | None = None) -> None:
    """Parse the master and compute the at-risk dates now (e.g. in a background thread), so the
    first person to open the page after a run does not wait for them."""
    try:
        at_risk_all(data_dir, rules or TierRules())
    except Exception:  # a half-written or unreadable data dir: the request will report it
        log.exception("Dashboard: warm-up of %s failed", data_dir)


# -- summary ----------------------------------------------------------------------------------------


def _sync_summary(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict):
        return None
    api: dict[str, Any] = doc["api"] if isinstance(doc.get("api"), dict) else {}
    groups = []
    for tier, g in sorted((doc.get("group_counts") or {}).items(), key=lambda kv: -TIER_RANK.get(kv[0], -1)):
        if isinstance(g, dict):
            groups.append(
                {
                    "tier": tier,
                    "expected": g.get("expected"),
                    "actual": g.get("actual"),
                    "missing": g.get("missing"),
                    "unexpected": g.get("unexpected"),
                    "match": g.get("match"),
                }
            )
    breaker: dict[str, Any] = doc["circuit_breaker"] if isinstance(doc.get("circuit_breaker"), dict) else {}
    return {
        "as_of": doc.get("as_of"),
        "run_id": doc.get("run_id"),
        "started_at": doc.get("started_at"),
        "finished_at": doc.get("finished_at"),
        "synced": doc.get("synced"),
        "dry_run": doc.get("dry_run"),
        "skipped_reason": doc.get("skipped_reason"),
        "planned_moves": doc.get("planned_moves"),
        "updated": doc.get("updated"),
        "unchanged": doc.get("unchanged"),
        "protected": doc.get("protected"),
        "skipped": doc.get("skipped"),
        "changed_in_pos": doc.get("changed_in_pos"),
        "deferred_by_limit": doc.get("deferred_by_limit"),
        "errors": doc.get("errors"),
        "failed_batches": doc.get("failed_batches"),
        "error_details": list(doc.get("error_details") or [])[:10],
        "api_requests": api.get("requests"),
        "rate_limited": api.get("rate_limited"),
        "retries": api.get("retries"),
        "group_counts_match": doc.get("group_counts_match"),
        "group_counts": groups,
        "moves": doc.get("moves") or {},
        "circuit_breaker_tripped": breaker.get("tripped"),
        "circuit_breaker_reasons": breaker.get("reasons") or [],
    }


def check_note(item: Any) -> dict[str, Any]:
    """A failed check or warning, without its example rows (the page shows what, not who)."""
    if not isinstance(item, dict):
        return {"message": str(item)}
    keep = ("expectation", "message", "description", "column", "unexpected_count")
    return {k: item[k] for k in keep if item.get(k) is not None}


def _validation_summary(data_dir: str) -> dict[str, Any] | None:
    doc = read_json(fileio.join(data_dir, VALIDATION_LATEST))
    if not isinstance(doc, dict):
        return None
    summary: dict[str, Any] = doc["summary"] if isinstance(doc.get("summary"), dict) else {}
    has_docs = fileio.exists(fileio.join(data_dir, DATA_DOCS_DIR, "index.html"))
    return {
        "success": summary.get("success"),
        "run_key": summary.get("run_key"),
        "evaluated": summary.get("evaluated"),
        "successful": summary.get("successful"),
        "failed": summary.get("failed") or [],
        "failed_details": [check_note(d) for d in list(summary.get("failed_details") or [])[:20]],
        "warnings": [check_note(w) for w in list(summary.get("warnings") or [])[:20]],
        "notes": summary.get("notes") or [],
        "row_count": summary.get("row_count"),
        "data_docs": has_docs,
    }


def summary(data_dir: str) -> dict[str, Any]:
    """Everything on the top of the page: latest run, tier distribution, last sync, last data-quality."""
    master = load_master(data_dir)
    latest = latest_run(data_dir, master)
    sync = _sync_summary(read_json(fileio.join(data_dir, SYNC_LOG_FILE)))
    validation = _validation_summary(data_dir)
    distribution = []
    total = 0
    if master is not None:
        total = master.size
        for tier, count in master.tier_counts.items():
            distribution.append(
                {
                    "tier": tier,
                    "count": count,
                    "share": (count / total) if total else 0.0,
                    "lifetime_value": money(master.tier_ltv_cents.get(tier, 0)),
                }
            )
    return {
        "has_data": master is not None or sync is not None or validation is not None,
        "has_master": master is not None,
        "data_dir": data_dir,
        "as_of": latest.get("as_of"),
        "run_id": latest.get("run_id"),
        "total_customers": total,
        "distribution": distribution,
        "sync": sync,
        "validation": validation,
    }


# -- at-risk customers --------------------------------------------------------------------------------


def at_risk(
    data_dir: str, rules: TierRules | None = None, within_days: int = 30, limit: int = 50, offset: int = 0
) -> dict[str, Any]:
    """One page of the customers whose tier drops within `within_days` if they buy nothing."""
    rules = rules or TierRules()
    within_days = max(0, min(int(within_days), 3650))
    limit = max(1, min(int(limit), MAX_PAGE))
    offset = max(0, int(offset))
    table, as_of = at_risk_all(data_dir, rules)
    if as_of is not None:
        horizon = parse_iso(as_of)
        assert horizon is not None
        horizon_us = (
            int((horizon + timedelta(days=within_days) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
            * 1_000_000
        )
        selected = [e for e in table if e["drop_after_us"] <= horizon_us]
    else:
        selected = []
    by_day: dict[int, int] = {}
    for e in selected:
        by_day[e["days_left"]] = by_day.get(e["days_left"], 0) + 1
    return {
        "as_of": as_of,
        "within_days": within_days,
        "rule": {
            "tier": SPROUT,
            "min_purchases": rules.sprout_min_purchases_in_window,
            "window_days": rules.window_days,
            "below_lifetime_value": money(rules.sprout_min_cents),
        },
        "total": len(selected),
        "exact": sum(1 for e in selected if e["method"] == "exact"),
        "by_days_left": [{"days_left": d, "count": n} for d, n in sorted(by_day.items())],
        "offset": offset,
        "limit": limit,
        "customers": [
            {k: v for k, v in e.items() if k != "drop_after_us"} for e in selected[offset : offset + limit]
        ],
    }


# -- search and one customer ---------------------------------------------------------------------------


def search(data_dir: str, query: str, limit: int = 10, rules: TierRules | None = None) -> dict[str, Any]:
    """Customers whose email, code or id is `query` (case-insensitive); prefix matches if none is
    exact. Emails come masked (customer_access.mask_email): `customer` is the one full record."""
    q = (query or "").strip().lower()
    limit = max(1, min(int(limit), MAX_SEARCH))
    master = load_master(data_dir)
    if master is None or len(q) < 2:
        return {"query": query, "match": "none", "total": 0, "customers": []}
    match, hits = find_rows(master, q)
    if not len(hits):
        return {"query": query, "match": "none", "total": 0, "customers": []}
    customers = [customer_row(master, int(r)) for r in hits[:limit]]
    for c in customers:  # a list of candidates: the full address is on the customer's own view
        c["email"] = mask_email(c["email"])
    if len(customers) <= 3:  # few enough to show each one's history and drop date
        risk = {e["customer_id"]: e for e in at_risk_all(data_dir, rules or TierRules())[0]}
        for c in customers:
            c["tier_history"] = tier_history_of(data_dir, c["customer_id"])
            entry = risk.get(c["customer_id"])
            c["at_risk"] = (
                {k: entry[k] for k in ("drops_after", "drops_to", "days_left", "method")} if entry else None
            )
    return {"query": query, "match": match, "total": len(hits), "customers": customers}


def customer(data_dir: str, customer_id: str, rules: TierRules | None = None) -> dict[str, Any] | None:
    master = load_master(data_dir)
    if master is None:
        return None
    r = master.position.get(customer_id)
    if r is None:
        return None
    out = customer_row(master, r)
    out["tier_history"] = tier_history_of(data_dir, customer_id)
    rules = rules or TierRules()
    entry = {e["customer_id"]: e for e in at_risk_all(data_dir, rules)[0]}.get(customer_id)
    out["at_risk"] = (
        {k: entry[k] for k in ("drops_after", "drops_to", "days_left", "method")} if entry else None
    )
    out["explanation"] = _explanation(data_dir, master, r, rules)
    from include.tier_sync.dashboard_customer_runs import customer_runs

    out["runs"] = customer_runs(data_dir, customer_id, out["tier"])
    return out


def _explanation(data_dir: str, master: Any, r: int, rules: TierRules) -> dict[str, Any] | None:
    """Why this tier and what would change it (explain.py), from the master row and the customer's
    purchase dates in the order store; None when there is no as-of or the store cannot be read."""
    from include.tier_sync.dashboard_at_risk import purchase_dates
    from include.tier_sync.explain import explain, figures
    from include.tier_sync.runtime import iso

    as_of = parse_iso(latest_run(data_dir, master).get("as_of"))
    if as_of is None:
        return None
    cid = str(master.df["Customer ID"].iloc[r])
    dates = purchase_dates(data_dir, [cid], as_of, rules)
    if dates is None:
        return None
    found = figures(int(master.ltv_cents[r]), int(master.orders[r]), dates[cid], bool(master.loyal[r]), as_of)
    result = explain(found, rules)
    result["as_of"] = iso(as_of)
    return result


# -- Data Docs -----------------------------------------------------------------------------------------


def data_docs_file(data_dir: str, path: str) -> tuple[bytes, str] | None:
    """A file of the Data Docs site (bytes, content type); None if absent or outside the site."""
    clean = posixpath.normpath("/" + (path or "index.html")).lstrip("/")
    if not clean or clean.startswith("..") or "\\" in clean:
        return None
    url = fileio.join(data_dir, DATA_DOCS_DIR, clean)
    if signature(url) is None:
        return None
    ctype = mimetypes.guess_type(clean)[0] or "application/octet-stream"
    return fileio.read_bytes(url), ctype
