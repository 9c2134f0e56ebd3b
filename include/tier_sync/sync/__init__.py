"""Sync of loyalty tiers to Lightspeed customer groups, one module per job.

This is the only code that changes the store's till, so it is built to be exact, idempotent and
hard to turn into a mass mistake (docs/contracts.md, "The sync"):

| module         | job                                                                           |
|----------------|-------------------------------------------------------------------------------|
| `contracts`    | the typed files and payloads between the steps, their `format_version`        |
| `groups`       | tier groups and the default group of the store (`GroupMap`, `resolve_groups`) |
| `plan`         | who moves where (`plan_moves`) and the circuit breaker                        |
| `batches`      | the run's `sync_plan/` folder: batch files, `plan.json`, expected members     |
| `write`        | `sync_batch`: re-check, membership calls, per-customer fallback (no pandas)   |
| `verify`       | the group-count check                                                         |
| `log`          | collecting batch results into the sync log                                    |
| `prepare`      | the plan_sync step: `decide_writes`, `prepare_sync`                           |
| `live`         | the live customers at the store's cursor (`runs/<key>/live_customers.json.gz`) |

This package re-exports what callers have always imported from `include.tier_sync.sync`.
Importing it imports no pandas, numpy or pyarrow, and neither do the tasks from plan_sync on: the
plan takes the master's columns and the live customers (`live`); DataFrames are still accepted
(`live.as_live` imports pandas for those only). Each mapped `sync_batch` loads only its batch
file, its progress file, plan.json and the plan's newest feed view.
"""

from __future__ import annotations

from include.tier_sync.sync.batches import (
    _batch_count,
    batch_calls_needed,
    groups_from_plan,
    read_expected_members,
    read_plan_doc,
    result_path,
    write_batches,
)
from include.tier_sync.sync.groups import GroupMap, is_placeholder, resolve_groups
from include.tier_sync.sync.log import (
    SyncFailed,
    build_sync_log,
    finish_sync,
    left_alone_ids,
    load_batch_results,
    raise_for_sync_errors,
    write_sync_log,
)
from include.tier_sync.sync.plan import MassChangeError, Move, Plan, check_circuit, plan_moves
from include.tier_sync.sync.prepare import decide_writes, prepare_sync
from include.tier_sync.sync.verify import verify_group_counts
from include.tier_sync.sync.write import new_result as _new_result
from include.tier_sync.sync.write import sync_batch

__all__ = [
    "GroupMap",
    "MassChangeError",
    "Move",
    "Plan",
    "SyncFailed",
    "_batch_count",
    "_new_result",
    "batch_calls_needed",
    "build_sync_log",
    "check_circuit",
    "decide_writes",
    "finish_sync",
    "groups_from_plan",
    "is_placeholder",
    "left_alone_ids",
    "load_batch_results",
    "plan_moves",
    "prepare_sync",
    "raise_for_sync_errors",
    "read_expected_members",
    "read_plan_doc",
    "resolve_groups",
    "result_path",
    "sync_batch",
    "verify_group_counts",
    "write_batches",
    "write_sync_log",
]
