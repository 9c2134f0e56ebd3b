"""The page's "at risk, in full" and "growing" lists (issue 18), each entry saying which kind it is.

At risk (docs/tier-rules.md "At risk"), three kinds:

- `streak`: the tier is held only by the purchases in the 30-day window and drops once they leave
  it (dashboard_at_risk's table, the page's original list);
- `next_run`: of those, the ones whose streak ends before the next scheduled run's as_of (the next
  `settings.SCHEDULE_AT` after the latest as_of): nothing else happening, that run downgrades them;
- `return`: a purchase still inside the store's return window (Variable
  `tier_sync_return_window_days`, default 30; a purchase at d can be returned while
  `as_of <= d + window`, the same edge as the tier window) is at least the smallest return that
  lowers the tier (`explain.drops`); the entry names that purchase and the tier a return of it
  gives.

Growing, two kinds:

- `moved_up`: the customer's newest tier change within the newest N published runs (their
  tier_changes.csv, dashboard_runs) is an upgrade (`classify_move`; a first tier is "new", not up);
- `near_next`: the spend to the next tier (`explain.next_up`) is at most the Variable
  `tier_sync_growing_distance` (default $50.00).

Every tier decision is `explain` / `rules`' own: this module only picks candidates (a cheap superset
read off the master) and the purchases they need from the order store (one scan, through
`dashboard_at_risk.purchases`). Tables are cached per version of the files and the settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from include.tier_sync import fileio, ledger, settings
from include.tier_sync.dashboard_at_risk import at_risk_all, iso_us, parse_iso, purchases
from include.tier_sync.dashboard_cache import cached, run_keys, signature, variable
from include.tier_sync.dashboard_master import Master, latest_run, load_master, money
from include.tier_sync.dashboard_runs import changes_frame, classify_move
from include.tier_sync.ledger import CHANGES_FILE, MASTER_FILE, STORE_DIR, RunPaths
from include.tier_sync.rules import ALL_TIERS, US_PER_DAY, TierRules
from include.tier_sync.runtime import iso

log = logging.getLogger(__name__)

STREAK, NEXT_RUN, RETURN = "streak", "next_run", "return"
MOVED_UP, NEAR_NEXT = "moved_up", "near_next"
RISK_KINDS = (NEXT_RUN, RETURN, STREAK)
GROWTH_KINDS = (MOVED_UP, NEAR_NEXT)
GROWING_RUNS_DEFAULT = 7
MAX_GROWING_RUNS = 90


@dataclass(frozen=True)
class Options:
    """The page's settings for these lists (Variables, validated by settings.check_*)."""

    return_window_days: int = settings.RETURN_WINDOW_DAYS_DEFAULT
    distance_cents: int = settings.check_growing_distance(None)


def load_options() -> Options:
    """The Variables as the api-server sees them; a bad one raises ValueError naming it."""
    return Options(
        return_window_days=settings.check_return_window_days(variable(settings.VAR_RETURN_WINDOW_DAYS)),
        distance_cents=settings.check_growing_distance(variable(settings.VAR_GROWING_DISTANCE)),
    )


def next_run_as_of(as_of: datetime) -> datetime:
    """The as_of of the next scheduled run: the next SCHEDULE_AT (UTC) strictly after `as_of`."""
    at = settings.SCHEDULE_AT
    same_day = as_of.astimezone(UTC).replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return same_day if same_day > as_of else same_day + timedelta(days=1)


def _us(when: datetime) -> int:
    return int((when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1))


def _customer(master: Master, r: int, kind: str) -> dict[str, Any]:
    df = master.df
    return {
        "kind": kind,
        "customer_id": str(df["Customer ID"].iat[r]),
        "customer_code": str(df["Customer Code"].iat[r]),
        "name": str(df["Name"].iat[r]),
        "tier": str(df["Tier"].iat[r]),
        "lifetime_value": money(int(master.ltv_cents[r])),
    }


def _latest(data_dir: str) -> tuple[Master, datetime] | None:
    master = load_master(data_dir)
    if master is None:
        return None
    as_of = parse_iso(latest_run(data_dir, master).get("as_of"))
    return None if as_of is None else (master, as_of)


# -- from the order store: returns and the distance to the next tier ---------------------------------


def _agrees(master: Master, rules: TierRules) -> Any:
    """Rows whose CSV tier is the one the rules give (a changed rule set would make others wrong)."""
    from include.tier_sync.rules import assign_tiers

    now = assign_tiers(master.ltv_cents, master.orders, master.p30, master.loyal, rules)
    return master.df["Tier"].to_numpy() == now


def _candidates(master: Master, as_of: datetime, rules: TierRules, opts: Options) -> tuple[Any, Any]:
    """Rows worth asking explain about (a superset): a recent-enough last order and a lifetime value
    at a threshold (returns); a threshold within the distance above the lifetime value (near next)."""
    import numpy as np
    import pandas as pd

    ltv = master.ltv_cents
    agrees = _agrees(master, rules)
    last = pd.to_datetime(master.df["Last Order"], utc=True, errors="coerce", format="ISO8601")
    since = pd.Timestamp(as_of - timedelta(days=opts.return_window_days))
    recent = (last >= since).to_numpy(dtype=bool) & (opts.return_window_days > 0)
    returns = agrees & recent & (ltv >= rules.sprout_min_cents)
    near = np.zeros(master.size, dtype=bool)
    for threshold in (rules.sprout_min_cents, rules.bloom_min_cents, rules.evergreen_min_cents):
        near |= (threshold > ltv) & (threshold - ltv <= opts.distance_cents)
    return np.flatnonzero(returns), np.flatnonzero(near & agrees)


def _return_entry(master: Master, r: int, bought: list[tuple[int, int]], f: Any, cut: int,
                  rules: TierRules, opts: Options) -> dict[str, Any] | None:
    from include.tier_sync import explain

    found = explain.drops(f, rules)
    if found is None:
        return None
    start = cut - opts.return_window_days * US_PER_DAY
    deciding = [(c, d) for d, c in bought if start <= d < cut and c >= found["return_cents"]]
    if not deciding:
        return None
    cents, when = max(deciding)  # the biggest (then newest) returnable purchase: the deepest drop
    window = len(f.in_window(rules))
    to = explain.tier_of(f.ltv_cents - cents, f.order_count, window, f.loyalty, rules)
    return {
        **_customer(master, r, RETURN),
        "purchase": {"amount": money(cents), "date": iso_us(when)},
        "return_needed": money(found["return_cents"]),
        "returnable_until": iso_us(when + opts.return_window_days * US_PER_DAY),
        "purchases_that_would": len(deciding),
        "drops_to": to,
    }


def _near_entry(master: Master, r: int, f: Any, rules: TierRules, opts: Options) -> dict[str, Any] | None:
    from include.tier_sync import explain

    spend = next((s for s in explain.next_up(f, rules) if s["kind"] == "spend"), None)
    if spend is None or spend["amount_cents"] > opts.distance_cents:
        return None
    return {**_customer(master, r, NEAR_NEXT), "next_tier": spend["tier"], "amount_needed": money(spend["amount_cents"])}


def _store_table(data_dir: str, master: Master, as_of: datetime, rules: TierRules, opts: Options) -> dict[str, Any]:
    """The return risks and the customers near their next tier, or `store_readable: False`."""
    from include.tier_sync import explain

    ret_rows, near_rows = _candidates(master, as_of, rules, opts)
    rows = sorted(set(ret_rows.tolist()) | set(near_rows.tolist()))
    ids = [str(master.df["Customer ID"].iat[r]) for r in rows]
    bought = purchases(data_dir, ids, as_of, rules) if ids else {}
    if bought is None:
        return {"store_readable": False, RETURN: [], NEAR_NEXT: []}
    cut = _us(as_of)
    mine = dict(zip(rows, ids, strict=True))
    figures = {
        r: explain.figures(int(master.ltv_cents[r]), int(master.orders[r]), [d for d, _ in bought[cid]],
                           bool(master.loyal[r]), as_of)
        for r, cid in mine.items()
    }
    returns = [e for r in ret_rows.tolist() if (e := _return_entry(master, r, bought[mine[r]], figures[r], cut, rules, opts))]
    near = [e for r in near_rows.tolist() if (e := _near_entry(master, r, figures[r], rules, opts))]
    returns.sort(key=lambda e: (e["returnable_until"], e["customer_id"]))
    near.sort(key=lambda e: (e["amount_needed"]["cents"], e["customer_id"]))
    return {"store_readable": True, RETURN: returns, NEAR_NEXT: near}


def _rules_key(rules: TierRules) -> tuple[int, ...]:
    return (rules.evergreen_min_cents, rules.bloom_min_cents, rules.sprout_min_cents,
            rules.sprout_min_purchases_in_window, rules.window_days, rules.max_sale_amount_cents)


def store_table(data_dir: str, rules: TierRules, opts: Options) -> dict[str, Any] | None:
    """`_store_table` of the latest master, cached per master, store manifest and settings."""
    latest = _latest(data_dir)
    if latest is None:
        return None
    master, as_of = latest
    key = (signature(fileio.join(data_dir, MASTER_FILE)), signature(fileio.join(data_dir, STORE_DIR, "manifest.json")),
           iso(as_of), _rules_key(rules), opts)
    return cached("growth_store", data_dir, key, lambda: _store_table(data_dir, master, as_of, rules, opts))


# -- at risk, in full -----------------------------------------------------------------------------------


def _streak_entries(table: list[dict[str, Any]], as_of: datetime, within_days: int) -> list[dict[str, Any]]:
    horizon = _us(as_of + timedelta(days=within_days))
    keep = ("customer_id", "customer_code", "name", "tier", "lifetime_value", "drops_to", "drops_after",
            "days_left", "purchases_last_30_days", "method")
    return [{"kind": STREAK, **{k: e[k] for k in keep}} for e in table if e["drop_after_us"] <= horizon]


def _next_run_entries(table: list[dict[str, Any]], as_of: datetime, rules: TierRules) -> list[dict[str, Any]]:
    """The streaks that end before the next run: their deciding purchase (the one leaving the window)
    is older than the next as_of minus the window."""
    upcoming = next_run_as_of(as_of)
    keep = ("customer_id", "customer_code", "name", "tier", "lifetime_value", "drops_to", "drops_after", "method")
    return [
        {"kind": NEXT_RUN, **{k: e[k] for k in keep}, "next_run_as_of": iso(upcoming),
         "leaves_window": iso_us(e["drop_after_us"] - rules.window_us)}
        for e in table
        if e["drop_after_us"] < _us(upcoming)
    ]


def risk_entries(data_dir: str, rules: TierRules, opts: Options, within_days: int = 30) -> dict[str, Any]:
    """Every at-risk entry of every kind (next run, return, streak within `within_days`) and the
    facts they rest on; `as_of` None without a master or an as-of."""
    latest = _latest(data_dir)
    meta: dict[str, Any] = {"as_of": None, "next_run_as_of": None, "return_window_days": opts.return_window_days,
                            "within_days": within_days, "window_days": rules.window_days, "notes": []}
    if latest is None:
        return {**meta, "entries": []}
    _, as_of = latest
    table, _ = at_risk_all(data_dir, rules)
    store = store_table(data_dir, rules, opts) or {"store_readable": False, RETURN: []}
    if not store["store_readable"]:
        meta["notes"].append("The order store could not be read: returns that would drop a tier are not listed.")
    entries = [*_next_run_entries(table, as_of, rules), *store[RETURN], *_streak_entries(table, as_of, within_days)]
    meta.update(as_of=iso(as_of), next_run_as_of=iso(next_run_as_of(as_of)))
    return {**meta, "store_readable": store["store_readable"], "entries": entries}


# -- growing --------------------------------------------------------------------------------------------


def published_keys(data_dir: str, as_of: datetime, runs: int) -> list[str]:
    """The newest `runs` published runs up to `as_of` (ledger.published_master), oldest first."""
    paths = RunPaths(data_dir, as_of)
    out: list[str] = []
    for key in reversed(run_keys(data_dir)):
        if key <= paths.key and ledger.published_master(paths, key) is not None:
            out.append(key)
            if len(out) == runs:
                break
    return out[::-1]


def _moved_up(data_dir: str, master: Master, keys: list[str]) -> list[dict[str, Any]]:
    import pandas as pd

    frames = []
    for key in keys:
        frame = changes_frame(fileio.join(ledger.run_dir(data_dir, key), CHANGES_FILE))
        if frame is not None and len(frame):
            part = frame.reset_index()[["Customer ID", "From", "To"]].astype(str)
            part["key"] = key
            frames.append(part)
    if not frames:
        return []
    last = pd.concat(frames, ignore_index=True).drop_duplicates("Customer ID", keep="last")
    out = []
    for cid, old, new, key in last[last["From"] != ""].itertuples(index=False):
        r = master.position.get(cid)
        if r is None or classify_move(old, new) != "upgrade":
            continue  # not moved up, or no longer a customer of the latest master
        out.append({**_customer(master, r, MOVED_UP), "from": old, "to": new,
                    "moved_at": iso(ledger.key_as_of(key)), "run_key": key})
    out.sort(key=lambda e: (e["run_key"], e["customer_id"]), reverse=True)
    return out


def growth_entries(data_dir: str, rules: TierRules, opts: Options, runs: int = GROWING_RUNS_DEFAULT) -> dict[str, Any]:
    """Every growing entry (moved up in the newest `runs` published runs, near the next tier)."""
    latest = _latest(data_dir)
    meta: dict[str, Any] = {"as_of": None, "runs_asked": runs, "runs": [], "runs_without_changes": [],
                            "distance": money(opts.distance_cents), "notes": []}
    if latest is None:
        return {**meta, "entries": []}
    master, as_of = latest
    keys = published_keys(data_dir, as_of, runs)
    urls = [fileio.join(ledger.run_dir(data_dir, k), CHANGES_FILE) for k in keys]
    sigs = tuple((k, signature(u)) for k, u in zip(keys, urls, strict=True))
    key = (signature(fileio.join(data_dir, MASTER_FILE)), sigs)
    moved = cached(f"growth_moved_{runs}", data_dir, key, lambda: _moved_up(data_dir, master, keys))
    missing = [k for k, sig in sigs if sig is None]
    if len(keys) < runs:
        meta["notes"].append(f"Only {len(keys)} published run(s) so far: moved up covers those.")
    if missing:
        meta["notes"].append(f"{len(missing)} of those runs have no tier_changes.csv: their moves are not counted.")
    store = store_table(data_dir, rules, opts) or {"store_readable": False, NEAR_NEXT: []}
    if not store["store_readable"]:
        meta["notes"].append("The order store could not be read: customers near the next tier are not listed.")
    meta.update(as_of=iso(as_of), runs=[{"key": k, "as_of": iso(ledger.key_as_of(k))} for k in keys],
                runs_without_changes=missing)
    return {**meta, "store_readable": store["store_readable"], "entries": [*moved, *store[NEAR_NEXT]]}


# -- what the page shows: counts for everyone, one page of entries ----------------------------------------


def counts(entries: list[dict[str, Any]], kinds: tuple[str, ...]) -> dict[str, Any]:
    """Entries per kind, per kind and tier (every tier listed), and distinct customers."""
    by_tier = {k: dict.fromkeys(ALL_TIERS, 0) for k in kinds}
    for e in entries:
        tiers = by_tier[e["kind"]]
        tiers[e["tier"]] = tiers.get(e["tier"], 0) + 1
    return {
        "by_kind": {k: sum(t.values()) for k, t in by_tier.items()},
        "by_tier": by_tier,
        "customers": len({e["customer_id"] for e in entries}),
    }


def overview(found: dict[str, Any], kinds: tuple[str, ...], kind: str | None, limit: int, offset: int) -> dict[str, Any]:
    """`risk_entries` / `growth_entries` as the page's JSON: counts and one page (of one kind)."""
    entries = found.pop("entries")
    chosen = [e for e in entries if kind is None or e["kind"] == kind]
    return {**found, "kinds": list(kinds), "kind": kind, "counts": counts(entries, kinds), "total": len(chosen),
            "offset": offset, "limit": limit, "customers": chosen[offset : offset + limit]}
