"""include/tier_sync/dashboard_run.py (a DAG run's "Tier sync" tab) on planted run folders.

Each run folder is written with the pipeline's own writers (tier changes CSV, plan.json, the
approval records of approval.py, the sync log of sync/log.py, run.json, retention's pruning), and
every figure the tab returns is checked against what was planted. The plugin's external view is
checked against Airflow's own plugin loading (plugins_manager and the REST API's serializer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync import dashboard_cache, dashboard_run, fileio, retention
from include.tier_sync.approval import APPLY_ALL, UPGRADES_ONLY, asking, decision_record, request_record
from include.tier_sync.artifacts import write_run_manifest
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import CHANGES_COLUMNS, to_csv_bytes
from include.tier_sync.runtime import iso
from include.tier_sync.sync.batches import write_plan_doc
from include.tier_sync.sync.log import build_sync_log, write_sync_log
from tests.unit.test_clv import AS_OF, DAY

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DAG = "customer_tier_sync"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    dashboard_cache.clear_cache()


def run_id(as_of: datetime, kind: str = "scheduled") -> str:
    return f"{kind}__{iso(as_of)}"


def identity(as_of: datetime, kind: str = "scheduled") -> dict[str, Any]:
    return {"dag_id": DAG, "run_id": run_id(as_of, kind), "run_type": kind, "as_of": iso(as_of),
            "logical_date": iso(as_of - DAY)}  # fmt: skip


# Tier changes of the planted runs: (customer, from, to); "" = first time seen.
CHANGES = [
    ("c1", "Bloom", "Evergreen"),
    ("c2", "Sprout", "Bloom"),
    ("c3", "Sprout", "Bloom"),
    ("c4", "Bloom", "Sprout"),
    ("c5", "", "Seed"),
    ("c6", "", "First Time Buyer"),
    ("c7", "", "Seed"),
]
# The plan's group moves ("from->to": customers) and what they are.
PLAN_MOVES = {"Bloom->Evergreen": 1, "Sprout->Bloom": 2, "Bloom->Sprout": 1, "All Customers->Seed": 2,
              "All Customers->First Time Buyer": 1}  # fmt: skip


def plant_changes(paths: RunPaths) -> None:
    df = pd.DataFrame([(c, f, t, iso(paths.as_of)) for c, f, t in CHANGES], columns=list(CHANGES_COLUMNS))
    fileio.write_bytes(paths.run_tier_changes, to_csv_bytes(df))


def plant_validation(paths: RunPaths, failed: list[dict[str, Any]] | None = None) -> None:
    failed = failed or []
    summary = {"success": not failed, "evaluated": 12, "successful": 12 - len(failed),
               "failed": [d["expectation"] for d in failed], "failed_details": failed, "warnings": [],
               "row_count": 7, "run_key": paths.key}  # fmt: skip
    fileio.write_json(paths.run_validation_json, {"summary": summary})


def breaker(tripped: bool, allowed: bool = False) -> dict[str, Any]:
    status = {"tripped": tripped, "reasons": ["7 of 7 managed customers (100.0%) change group"] if tripped else [],
              "changes": 7, "managed": 7, "change_fraction": 1.0, "max_move_fraction": 0.2, "downgrades": 1,
              "max_downgrades": 500}  # fmt: skip
    if allowed:
        status["allowed_by_param"] = True
    return status


def plant_plan(paths: RunPaths, *, moves: dict[str, int], dry_run: bool = False, **extra: Any) -> dict[str, Any]:
    summary = {"total_customers": 9, "managed": 7, "planned_moves": sum(moves.values()), "changes": 7,
               "downgrades": 1, "protected": 2, "moves": moves, "circuit_breaker": breaker(False)}  # fmt: skip
    summary.update(extra.pop("summary", {}))
    doc = {"format": "tier_sync_plan", "plan_id": f"p-{paths.key}", "as_of": iso(paths.as_of), "customers_cursor": 5,
           "refs": [{"ref": "b0"}, {"ref": "b1"}], "summary": summary, "groups": None, "dispatched": True,
           "dry_run": dry_run, "writes_allowed": not dry_run, "skipped_reason": "dry run" if dry_run else None,
           **extra}  # fmt: skip
    write_plan_doc(paths, doc)
    return doc


def plant_sync_log(paths: RunPaths, plan: dict[str, Any] | None, results: list[dict[str, Any]], **kw: Any) -> None:
    summary = (plan or {}).get("summary")
    log = build_sync_log(identity(paths.as_of), summary, results, None, None, started_at=paths.as_of,
                         approval=(plan or {}).get("approval"), **kw)  # fmt: skip
    write_sync_log(log, paths)


def batch(ref: str, *, updated: int, skipped: dict[str, int], changed: list[str], errors: list[str]) -> dict[str, Any]:
    return {"ref": ref, "plan_id": "p", "status": "done", "size": updated + sum(skipped.values()) + len(changed) + len(errors),
            "written": updated > 0, "updated": updated, "skip_reasons": skipped, "moves_applied": {},
            "changed_in_pos_ids": changed, "deleted_ids": [],
            "error_details": [{"customer_id": c, "error": "HTTP 404 customer not found"} for c in errors],
            "errors": len(errors), "api": {"requests": 3, "rate_limited": 0, "retries": 0}}  # fmt: skip


def view(data_dir: str, as_of: datetime, kind: str = "scheduled", *, known: bool = True) -> dict[str, Any]:
    return dashboard_run.run_view(data_dir, DAG, run_id(as_of, kind), as_of if known else None)


# -- a normal run ---------------------------------------------------------------------------------


def test_a_normal_run_shows_plan_moves_sync_and_validation(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    plant_changes(paths)
    plant_validation(paths)
    plan = plant_plan(paths, moves=PLAN_MOVES)
    results = [batch("b0", updated=3, skipped={"already_there": 1}, changed=["c9"], errors=[]),
               batch("b1", updated=2, skipped={}, changed=[], errors=["c8", "c10"])]  # fmt: skip
    plant_sync_log(paths, plan, results, dry_run=False, synced=True, skipped_reason=None)
    write_run_manifest(paths, identity(AS_OF))

    got = view(data, AS_OF, known=False)  # found by its run id in run.json alone
    assert (got["found"], got["key"], got["as_of"], got["message"]) == ("folder", paths.key, iso(AS_OF), None)
    assert got["run_type"] == "scheduled"
    plan_v = got["plan"]
    assert plan_v["state"] == "ok" and plan_v["planned_moves"] == 7 and plan_v["batches"] == 2
    assert plan_v["by_direction"] == {"upgrade": 3, "downgrade": 1, "new tier": 3, "re-assert": 0}
    assert {r["tier"]: (r["upgrade"], r["downgrade"], r["new tier"]) for r in plan_v["by_tier"]} == {
        "Evergreen": (1, 0, 0), "Bloom": (2, 0, 0), "Sprout": (0, 1, 0), "Seed": (0, 0, 2),
        "First Time Buyer": (0, 0, 1),
    }  # fmt: skip
    assert [r["tier"] for r in plan_v["by_tier"]] == ["Evergreen", "Bloom", "Sprout", "Seed", "First Time Buyer"]
    assert plan_v["circuit_breaker"]["tripped"] is False
    moves = got["moves"]
    assert moves["changes"] == len(CHANGES)
    assert moves["by_direction"] == {"upgrade": 3, "downgrade": 1, "new": 3, "other": 0}
    assert {r["tier"]: r["new"] for r in moves["by_tier"]} == {"Evergreen": 0, "Bloom": 0, "Sprout": 0, "Seed": 2,
                                                             "First Time Buyer": 1}  # fmt: skip
    sync = got["sync"]
    assert (sync["written"], sync["failed"], sync["changed_in_pos"], sync["protected"]) == (5, 2, 1, 2)
    assert sync["skipped"] == 1 and sync["skip_reasons"] == {"already_there": 1}
    assert sync["synced"] is True and sync["dry_run"] is False and sync["failures_total"] == 2
    assert [f["customer_id"] for f in sync["failures"]] == ["c10", "c8"]
    assert sync["failures"][0]["error"] == "HTTP 404 customer not found"
    assert got["validation"] == {"state": "ok", "success": True, "evaluated": 12, "successful": 12, "failed": [],
                                 "failed_details": [], "warnings": [], "row_count": 7}  # fmt: skip
    assert got["approval"] == {"state": "ok", "status": "not_needed", "reason": "the circuit breaker did not trip"}


def test_a_dry_run_says_nothing_was_written_and_never_asked(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    plant_changes(paths)
    plant_validation(paths)
    plan = plant_plan(paths, moves=PLAN_MOVES, dry_run=True, dispatched=False,
                      summary={"circuit_breaker": breaker(True)})  # fmt: skip
    plant_sync_log(paths, plan, [], dry_run=True, synced=False, skipped_reason="dry run")
    write_run_manifest(paths, identity(AS_OF, "manual"))

    got = view(data, AS_OF, "manual")
    assert got["found"] == "folder"
    assert got["plan"]["dry_run"] is True and got["plan"]["dispatched"] is False
    assert got["plan"]["circuit_breaker"]["tripped"] is True  # the verdict is shown even for a dry run
    assert got["sync"]["dry_run"] is True and got["sync"]["written"] == 0 and got["sync"]["failed"] == 0
    assert got["sync"]["skipped"] == 7 and got["sync"]["skip_reasons"] == {"not_written": 7}
    assert got["approval"]["status"] == "not_needed"
    assert got["approval"]["reason"] == "a dry run writes nothing, so it never asks"


def test_a_run_held_for_approval_then_approved_upgrades_only(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    plant_changes(paths)
    plant_validation(paths)
    asked_at = AS_OF + timedelta(hours=1)
    requested = asking(request_record([], asked_at), deadline=AS_OF + DAY / 2, approvers=["ops"])
    # While it waits: the plan is held, the tab says who may answer and until when.
    held = plant_plan(paths, moves=PLAN_MOVES, dispatched=False, skipped_reason="circuit_breaker",
                      approval=requested, summary={"circuit_breaker": breaker(True)})  # fmt: skip
    waiting = view(data, AS_OF)
    assert waiting["found"] == "folder" and waiting["message"] is not None  # no run.json yet
    assert waiting["approval"]["status"] == "requested"
    assert waiting["approval"]["deadline"] == iso(AS_OF + DAY / 2) and waiting["approval"]["approvers"] == ["ops"]
    assert waiting["sync"]["state"] == "missing" and "write_sync_log" in waiting["sync"]["reason"]

    event = {"chosen_options": [UPGRADES_ONLY], "responded_by_user": {"id": "ops", "name": "Olive Ops"},
             "responded_at": AS_OF + DAY / 4, "params_input": {"comment": "downgrades after the sale"}}  # fmt: skip
    decision = decision_record(event, requested=requested, decided_at=AS_OF + DAY / 4)
    upgrades = {k: v for k, v in PLAN_MOVES.items() if k != "Bloom->Sprout"}
    left_out = {"reason": "approved: upgrades only", "downgrades": 1, "reasserts": 0, "moves": {"Bloom->Sprout": 1}}
    plan = plant_plan(paths, moves=upgrades, approval=decision,
                      summary={"circuit_breaker": breaker(True, allowed=True), "left_out_by_approval": left_out})  # fmt: skip
    assert held["approval"]["status"] == "requested"
    plant_sync_log(paths, plan, [batch("b0", updated=6, skipped={}, changed=[], errors=[])], dry_run=False,
                   synced=True, skipped_reason=None)  # fmt: skip
    write_run_manifest(paths, identity(AS_OF))

    got = view(data, AS_OF)
    assert got["message"] is None
    approval = got["approval"]
    assert (approval["status"], approval["option"], approval["responded_by"]) == (
        "approved_upgrades_only", UPGRADES_ONLY, "Olive Ops")  # fmt: skip
    assert approval["comment"] == "downgrades after the sale" and approval["responded_at"] == iso(AS_OF + DAY / 4)
    assert approval["requested_at"] == iso(asked_at) and approval["deadline"] == iso(AS_OF + DAY / 2)
    assert got["plan"]["planned_moves"] == 6 and got["plan"]["by_direction"]["downgrade"] == 0
    assert got["plan"]["left_out_by_approval"] == left_out
    assert got["sync"]["written"] == 6 and got["sync"]["failed"] == 0


def test_aborted_and_timed_out_approvals_are_shown_as_decided(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    requested = asking(request_record([], AS_OF), deadline=AS_OF + DAY / 2, approvers=[])
    timeout = decision_record({"error": "no answer", "error_type": "timeout"}, requested=requested,
                              decided_at=AS_OF + DAY / 2)  # fmt: skip
    plant_plan(paths, moves=PLAN_MOVES, dispatched=False, skipped_reason="approval timed_out", approval=timeout)
    got = view(data, AS_OF)["approval"]
    assert got["status"] == "timed_out" and got["deadline"] == iso(AS_OF + DAY / 2) and got["option"] is None
    assert got["reason"] == "no answer"
    applied = decision_record({"chosen_options": [APPLY_ALL], "responded_by_user": {"id": "a", "name": "Al"}},
                              requested=requested, decided_at=AS_OF + DAY / 8)  # fmt: skip
    plant_plan(paths, moves=PLAN_MOVES, approval=applied)
    dashboard_cache.clear_cache()
    got = view(data, AS_OF)["approval"]
    assert (got["status"], got["option"], got["responded_by"], got["comment"]) == ("approved_all", APPLY_ALL, "Al", None)


# -- a failed validation ----------------------------------------------------------------------------


def test_a_run_whose_validation_failed_lists_the_failed_expectations(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    plant_changes(paths)
    failed = [
        {"expectation": "row_count_not_dropped", "unexpected_count": 40, "message": "rows dropped", "examples": ["c1"]},
        {"expectation": "tier_consistent_with_rule", "unexpected_count": 2, "column": "Tier"},
    ]
    plant_validation(paths, failed)
    reason = "validation failed (row_count_not_dropped, tier_consistent_with_rule); nothing was committed or synced"
    plant_sync_log(paths, None, [], dry_run=False, synced=False, skipped_reason=reason)
    write_run_manifest(paths, identity(AS_OF))

    got = view(data, AS_OF, known=False)
    v = got["validation"]
    assert v["success"] is False and v["evaluated"] == 12 and v["successful"] == 10
    assert v["failed"] == ["row_count_not_dropped", "tier_consistent_with_rule"]
    assert v["failed_details"][0] == {"expectation": "row_count_not_dropped", "unexpected_count": 40,
                                      "message": "rows dropped"}  # no example customers on the tab  # fmt: skip
    for section in ("plan", "approval"):
        assert got[section] == {"state": "missing", "reason": f"no sync plan: {reason}"}
    assert got["sync"]["synced"] is False and got["sync"]["planned_moves"] == 0 and got["sync"]["written"] == 0
    assert got["moves"]["changes"] == len(CHANGES)


def test_a_run_that_stopped_early_says_so_per_section(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    fileio.makedirs(paths.run_dir)
    plant_changes(paths)
    got = view(data, AS_OF)
    assert got["found"] == "folder" and "run.json is not written yet" in got["message"]
    assert got["moves"]["state"] == "ok"
    for section in ("plan", "sync", "validation", "approval"):
        assert got[section]["state"] == "missing" and got[section]["reason"], section
        assert set(got[section]) == {"state", "reason"}  # no figure at all, never a 0


# -- a pruned run -----------------------------------------------------------------------------------


def test_a_pruned_run_shows_the_counts_retention_kept_and_says_what_is_gone(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    old = RunPaths(data, AS_OF - 30 * DAY)
    plant_changes(old)
    plant_validation(old)
    plan = plant_plan(old, moves=PLAN_MOVES)
    plant_sync_log(old, plan, [batch("b0", updated=4, skipped={"already_there": 2}, changed=["c9"], errors=["c8"])],
                   dry_run=False, synced=True, skipped_reason=None)  # fmt: skip
    write_run_manifest(old, identity(old.as_of))
    new = RunPaths(data, AS_OF)
    fileio.makedirs(new.run_dir)
    report = retention.prune_runs(new, 7, now=AS_OF + DAY)
    assert report["pruned"] == [old.key] and not os.path.exists(old.run_dir)

    got = view(data, old.as_of)
    assert got["found"] == "pruned" and got["key"] == old.key and "pruned" in got["message"]
    assert got["moves"]["state"] == "pruned" and got["moves"]["changes"] == len(CHANGES)
    assert got["moves"]["by_direction"] == {"upgrade": 3, "downgrade": 1, "new": 3, "other": 0}
    assert {r["tier"]: r["upgrade"] for r in got["moves"]["by_tier"]}["Bloom"] == 2
    sync = got["sync"]
    assert (sync["written"], sync["failed"], sync["skipped"], sync["changed_in_pos"], sync["protected"]) == (4, 1, 2, 1, 2)
    assert "failures are not kept" in sync["reason"] and "failures" not in sync
    assert got["validation"]["success"] is True and got["validation"]["state"] == "pruned"
    for section in ("plan", "approval"):
        assert got[section]["state"] == "pruned" and "sync_history.csv" in got[section]["reason"]


# -- which run ----------------------------------------------------------------------------------------


def test_another_dags_run_is_not_a_tier_sync_run(tmp_path: Path) -> None:
    nothing = dashboard_run.run_view(str(tmp_path / "data"), DAG, "manual__nope")
    assert (nothing["found"], nothing["key"], nothing["as_of"]) == ("not_found", None, None)
    got = dashboard_run.run_view(str(tmp_path), "daily_report", "manual__2026-11-25T02:00:00+00:00")
    assert got["tier_sync_run"] is False and got["found"] == "other_dag"
    assert "not a tier-sync run" in got["message"] and "plan" not in got


def test_a_folder_rewritten_by_another_run_of_the_same_day_is_not_shown_as_this_one(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = RunPaths(data, AS_OF)
    plant_changes(paths)
    write_run_manifest(paths, identity(AS_OF, "manual"))
    got = view(data, AS_OF, "scheduled")
    assert got["found"] == "other_run" and run_id(AS_OF, "manual") in got["message"] and "sync" not in got
    unknown = view(data, AS_OF - DAY, known=True)
    assert unknown["found"] == "not_found" and unknown["key"] == RunPaths(data, AS_OF - DAY).key
    assert f"runs/{RunPaths(data, AS_OF - DAY).key}/ does not exist" in unknown["message"]


# -- the plugin, as Airflow loads it ------------------------------------------------------------------

PLUGIN_CHECK = """
import json
from airflow import plugins_manager
from airflow.api_fastapi.core_api.datamodels.plugins import PluginResponse
views, _ = plugins_manager._get_ui_plugins()
info = next(p for p in plugins_manager.get_plugin_info() if p["name"] == "loyalty_tiers")
served = PluginResponse.model_validate(info).model_dump(mode="json")
print(json.dumps({"ui": views, "served": served["external_views"]}))
"""


def test_the_plugin_registers_the_run_tab_as_airflow_loads_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    for views in (loaded["ui"], loaded["served"]):
        tab = next(v for v in views if v.get("url_route") == "tier-sync-run")
        assert tab["destination"] == "dag_run" and tab["name"] == "Tier sync"
        assert tab["href"] == "/loyalty-tiers/run?dag_id={DAG_ID}&run_id={RUN_ID}"
    assert {v["url_route"] for v in loaded["ui"]} >= {"loyalty-tiers", "tier-sync-run"}  # neither route dropped
