"""The "Loyalty tiers" page's view across runs: tiers over time, moves per run, one customer's changes.

Everything here comes from the run ledger (ledger.py): tier_history.csv (customers per tier per
run) and each run folder's tier_changes.csv, run.json, validation.json and sync log. Each file is
parsed once per version (dashboard_cache); the listing of runs/ is reused for a few seconds.
pandas is used only through the parsed frames: the Airflow plugin imports this module (through
dashboard.py) when the api-server starts.
"""

from __future__ import annotations

import json
from typing import Any

from include.tier_sync import fileio, ledger
from include.tier_sync.dashboard_cache import cached, read_csv, read_json, run_keys, signature
from include.tier_sync.ledger import (
    CHANGES_FILE,
    HISTORY_FILE,
    RUN_FILE,
    SYNC_HISTORY_FILE,
    SYNC_LOG_FILE,
    VALIDATION_FILE,
)
from include.tier_sync.rules import ALL_TIERS, TIER_RANK
from include.tier_sync.runtime import iso

# -- distribution over time ---------------------------------------------------------------------------


def history(data_dir: str, limit: int = 400) -> dict[str, Any]:
    """Customers per tier per run, from tier_history.csv (oldest first, at most `limit` runs)."""
    url = fileio.join(data_dir, HISTORY_FILE)
    sig = signature(url)
    if sig is None:
        return {"tiers": list(ALL_TIERS), "points": []}

    def load() -> list[dict[str, Any]]:
        df = read_csv(url)
        points: dict[str, dict[str, Any]] = {}
        for as_of, run_id, tier, count in df[["as_of", "run_id", "tier", "count"]].itertuples(index=False):
            point = points.setdefault(as_of, {"as_of": as_of, "run_id": run_id, "counts": {}})
            try:
                point["counts"][tier] = int(count)
            except ValueError:
                continue
        out = [points[k] for k in sorted(points)]
        for p in out:
            p["total"] = sum(p["counts"].values())
        return out

    points = cached("history", url, sig, load)
    limit = max(1, min(int(limit), 5000))
    return {"tiers": list(ALL_TIERS), "points": points[-limit:]}


# -- moves per run ------------------------------------------------------------------------------------


def classify_move(old: str, new: str) -> str:
    """'new' (first time seen), 'upgrade', 'downgrade' or 'other' (same rank / unknown tier)."""
    if old == "":
        return "new"
    a, b = TIER_RANK.get(old), TIER_RANK.get(new)
    if a is None or b is None or a == b:
        return "other"
    return "upgrade" if b > a else "downgrade"


def changes_frame(url: str) -> Any:
    """One run's tier_changes.csv indexed by Customer ID (parsed once per file version)."""
    sig = signature(url)
    if sig is None:
        return None

    def load() -> Any:
        df = read_csv(url, usecols=["Customer ID", "From", "To"])
        df["From"] = df["From"].astype("category")
        df["To"] = df["To"].astype("category")
        return df.set_index("Customer ID")

    return cached("changes", url, sig, load)


def _run_moves(data_dir: str, key: str) -> dict[str, Any]:
    run_dir = ledger.run_dir(data_dir, key)
    url = fileio.join(run_dir, CHANGES_FILE)
    counts = {"upgrades": 0, "downgrades": 0, "new": 0, "other": 0}
    transitions: dict[str, int] = {}
    frame = changes_frame(url)
    if frame is not None and len(frame):
        pairs = frame.groupby(["From", "To"], observed=True).size()
        for (old, new), n in pairs.items():
            kind = classify_move(str(old), str(new))
            counts["upgrades" if kind == "upgrade" else "downgrades" if kind == "downgrade" else kind] += int(
                n
            )
            transitions[f"{old or '(new)'} -> {new}"] = int(n)
    sync = read_json(fileio.join(run_dir, SYNC_LOG_FILE))
    run = read_json(fileio.join(run_dir, RUN_FILE))
    report = read_json(fileio.join(run_dir, VALIDATION_FILE))
    passed = report.get("summary", {}).get("success") if isinstance(report, dict) else None
    as_of = run.get("as_of") if isinstance(run, dict) else None
    if not as_of:
        as_of = iso(ledger.key_as_of(key))
    return {
        "key": key,
        "as_of": as_of,
        "run_id": run.get("run_id") if isinstance(run, dict) else None,
        "has_changes": frame is not None,
        **counts,
        "changes": sum(counts.values()),
        "top_transitions": dict(sorted(transitions.items(), key=lambda kv: -kv[1])[:8]),
        "validation_passed": passed,
        "synced_updates": sync.get("updated") if isinstance(sync, dict) else None,
        "sync_errors": sync.get("errors") if isinstance(sync, dict) else None,
    }


def _count(value: Any) -> int | None:
    text = str(value if value is not None else "").strip()
    return int(float(text)) if text else None


def _pruned_moves(row: dict[str, Any]) -> dict[str, Any]:
    """A pruned run's row of sync_history.csv (retention.py) in the shape of `_run_moves`."""
    counts = {k: _count(row.get(k)) or 0 for k in ("upgrades", "downgrades", "new", "other")}
    transitions = json.loads(row.get("transitions") or "{}")
    passed = str(row.get("validation_passed") or "").lower()
    return {
        "key": row["key"],
        "as_of": row.get("as_of") or iso(ledger.key_as_of(row["key"])),
        "run_id": row.get("run_id") or None,
        "has_changes": True,
        **counts,
        "changes": _count(row.get("changes")) or sum(counts.values()),
        "top_transitions": dict(sorted(transitions.items(), key=lambda kv: -kv[1])[:8]),
        "validation_passed": {"true": True, "false": False}.get(passed),
        "synced_updates": _count(row.get("updated")),
        "sync_errors": _count(row.get("errors")),
        "pruned": True,
    }


def _pruned_runs(data_dir: str) -> list[dict[str, Any]]:
    """The counts kept for runs whose folders retention removed, parsed once per file version."""
    from include.tier_sync.retention import read_sync_history

    url = fileio.join(data_dir, SYNC_HISTORY_FILE)
    sig = signature(url)
    if sig is None:
        return []
    return cached("sync_history", url, sig, lambda: [_pruned_moves(r) for r in read_sync_history(data_dir)])


def moves(data_dir: str, limit: int = 60) -> dict[str, Any]:
    """Upgrades / downgrades / new customers per run (newest `limit` runs, oldest first): from the
    run folders, and for runs already pruned (retention) from the counts kept in sync_history.csv."""
    limit = max(1, min(int(limit), 1000))
    keys = run_keys(data_dir)
    live = set(keys)
    pruned = {r["key"]: r for r in _pruned_runs(data_dir) if r["key"] not in live}
    wanted = sorted([*keys, *pruned])[-limit:]
    return {"runs": [pruned[k] if k in pruned else _run_moves(data_dir, k) for k in wanted]}


# -- one customer ---------------------------------------------------------------------------------------


def tier_history_of(data_dir: str, customer_id: str, limit_runs: int = 400) -> list[dict[str, Any]]:
    """The customer's tier changes over the runs, oldest first (from runs/<key>/tier_changes.csv)."""
    out = []
    for key in run_keys(data_dir)[-limit_runs:]:
        frame = changes_frame(fileio.join(ledger.run_dir(data_dir, key), CHANGES_FILE))
        if frame is None or customer_id not in frame.index:
            continue
        hit = frame.loc[[customer_id]].iloc[-1]
        old, new = str(hit["From"]), str(hit["To"])
        out.append(
            {
                "run_key": key,
                "as_of": iso(ledger.key_as_of(key)),
                "from": old or None,
                "to": new,
                "kind": classify_move(old, new),
            }
        )
    return out
