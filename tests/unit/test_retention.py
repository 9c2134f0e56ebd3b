"""Retention: prune_runs removes old run folders (judged by their as_of, never the clock), never the
current or latest run, and keeps the tier history and each pruned run's counts."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from include.tier_sync import fileio, ledger, retention, settings
from include.tier_sync.artifacts import write_run_manifest
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import read_csv_str
from tests.unit.test_clv import AS_OF, DAY, customer, customers_df, sale, sales_df
from tests.unit.test_ledger import NOW, good_store
from tests.unit.test_master_csv import FakeStore, identity, run

pytestmark = pytest.mark.unit

# Offsets (days before AS_OF) of the runs laid out by `lay_out`; retention 90 cuts at AS_OF - 90 days.
OLD_FINISHED = 120
OLD_UNFINISHED = 100  # no sync log: in progress or never finished
OLD_FAILED = 95  # failed validation: never published, still pruned
RECENT = 10


def data_dir(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "data") if kind == "local" else f"memory://retention-{uuid.uuid4().hex}"


def sync_log(paths: RunPaths, **counts: int) -> None:
    doc = {"run_id": f"scheduled__{paths.key}", "synced": True, "dry_run": False, **counts}
    fileio.write_json(paths.run_sync_log, doc)


def store_for(as_of: datetime, n: int) -> FakeStore:
    """n customers, each with sales before `as_of`; customer i buys (i + n) % 8 * $250 + $20."""
    customers = [customer(f"c{i:03d}") for i in range(40)]
    sales = [sale(f"s{i:03d}", f"c{i:03d}", f"{((i + n) % 8) * 250 + 20}.00", as_of - 20 * DAY) for i in range(n)]
    return FakeStore(sales_df(*sales), customers_df(*customers))


def lay_out(root: str) -> dict[int, RunPaths]:
    """Runs at AS_OF - offset days (oldest first) and the current run at AS_OF, as the DAG leaves them."""
    out: dict[int, RunPaths] = {}
    for offset in (OLD_FINISHED, OLD_UNFINISHED, OLD_FAILED, RECENT, 0):
        as_of = AS_OF - offset * DAY
        paths = RunPaths(root, as_of)
        # A different store each time, so some customers change tier between runs.
        run(Path(root) if fileio.is_local(root) else root, store_for(as_of, 20 + offset // 10), as_of,  # type: ignore[arg-type]
            validated=offset != OLD_FAILED)
        if offset != OLD_UNFINISHED:
            sync_log(paths, updated=offset + 1, errors=offset % 3, protected=7, planned_moves=offset + 2)
        write_run_manifest(paths, identity(as_of))
        out[offset] = paths
    return out


def history_days(root: str) -> set[str]:
    return set(read_csv_str(fileio.join(root, ledger.HISTORY_FILE))["as_of"])


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_prune_removes_old_finished_runs_and_keeps_their_counts(kind: str, tmp_path: Path) -> None:
    root = data_dir(kind, tmp_path)
    runs = lay_out(root)
    fileio.write_text(fileio.join(root, ledger.RUNS_DIR, "notes", "keep.txt"), "not a run folder\n")
    days_before = history_days(root)
    changes_120 = read_csv_str(runs[OLD_FINISHED].run_tier_changes)

    report = retention.prune_runs(runs[0], 90, now=NOW)

    assert report["pruned"] == [runs[OLD_FINISHED].key, runs[OLD_FAILED].key]
    assert report["kept_old"] == {runs[OLD_UNFINISHED].key: "no sync log: the run is in progress or never finished"}
    assert report["cutoff"] == "2026-08-27T02:00:00Z"  # AS_OF (2026-11-25T02:00Z) - 90 days
    assert report["kept"] == 3
    assert ledger.list_run_keys(root, NOW) == [runs[k].key for k in (OLD_UNFINISHED, RECENT, 0)]
    assert fileio.exists(fileio.join(root, ledger.RUNS_DIR, "notes", "keep.txt"))
    for offset in (OLD_FINISHED, OLD_FAILED):
        assert not fileio.exists(runs[offset].run_dir)
    # The tier history keeps every published day, pruned ones included.
    assert history_days(root) == days_before
    assert ledger.iso(runs[OLD_FINISHED].as_of) in days_before
    # The counts of the pruned runs are kept, in a spreadsheet-safe CSV at the data dir root.
    assert report["sync_history"] == fileio.join(root, ledger.SYNC_HISTORY_FILE)
    assert fileio.read_bytes(report["sync_history"]).startswith("\ufeff".encode())
    rows = {r["key"]: r for r in retention.read_sync_history(root)}
    assert list(rows) == [runs[OLD_FINISHED].key, runs[OLD_FAILED].key]
    kept = rows[runs[OLD_FINISHED].key]
    assert (kept["updated"], kept["errors"], kept["protected"], kept["planned_moves"]) == ("121", "0", "7", "122")
    assert (kept["validation_passed"], kept["published"], kept["synced"]) == ("true", "true", "true")
    assert kept["changes"] == str(len(changes_120)) and int(kept["changes"]) > 0
    assert sum(int(kept[k]) for k in retention.MOVE_KINDS) == len(changes_120)
    failed = rows[runs[OLD_FAILED].key]
    assert (failed["validation_passed"], failed["published"], failed["errors"]) == ("false", "false", "2")


def test_the_page_shows_the_same_moves_per_run_after_pruning(tmp_path: Path) -> None:
    from include.tier_sync import dashboard

    root = data_dir("local", tmp_path)
    runs = lay_out(root)
    dashboard.clear_cache()
    before = {r["key"]: r for r in dashboard.moves(root)["runs"]}
    retention.prune_runs(runs[0], 90, now=NOW)
    dashboard.clear_cache()
    after = {r["key"]: r for r in dashboard.moves(root)["runs"]}
    assert list(after) == list(before)  # pruned runs still listed, in order
    same = ("as_of", "upgrades", "downgrades", "new", "other", "changes", "top_transitions",
            "validation_passed", "synced_updates", "sync_errors")  # fmt: skip
    for offset in (OLD_FINISHED, OLD_FAILED):
        key = runs[offset].key
        assert after[key]["pruned"] is True and "pruned" not in before[key]
        assert {k: after[key][k] for k in same} == {k: before[key][k] for k in same}, key
    assert after[runs[RECENT].key] == before[runs[RECENT].key]


def test_pruning_twice_removes_nothing_more_and_keeps_the_rows(tmp_path: Path) -> None:
    root = data_dir("local", tmp_path)
    runs = lay_out(root)
    first = retention.prune_runs(runs[0], 90, now=NOW)
    before = fileio.read_bytes(first["sync_history"])
    again = retention.prune_runs(runs[0], 90, now=NOW)
    assert again["pruned"] == [] and again["sync_history"] is None
    assert fileio.read_bytes(first["sync_history"]) == before
    # A longer setting keeps more: nothing recent goes with 365 days.
    assert retention.prune_runs(runs[0], 365, now=NOW)["pruned"] == []


def test_age_is_counted_from_the_run_s_as_of_not_the_clock(tmp_path: Path) -> None:
    """A back-fill of an old day prunes relative to its own day: runs within 90 days of it stay."""
    root = data_dir("local", tmp_path)
    runs = lay_out(root)
    backfill = RunPaths(root, AS_OF - 100 * DAY)  # the unfinished run's own day
    report = retention.prune_runs(backfill, 90, now=NOW)
    assert report["pruned"] == []
    assert len(ledger.list_run_keys(root, NOW)) == len(runs)


def test_the_latest_published_run_and_the_current_run_are_never_pruned(tmp_path: Path) -> None:
    root = data_dir("local", tmp_path)
    old = AS_OF - 200 * DAY
    run(Path(root), good_store(), old)
    sync_log(RunPaths(root, old), updated=1)
    # Today's run failed validation: the latest published run is still the one 200 days ago.
    today = RunPaths(root, AS_OF)
    run(Path(root), good_store(), AS_OF, validated=False)
    sync_log(today, updated=0)
    report = retention.prune_runs(today, 90, now=NOW)
    assert report["pruned"] == []
    assert report["kept_old"] == {ledger.run_key(old): "the latest published run"}
    assert fileio.exists(RunPaths(root, old).run_master_csv)


def test_a_missing_tier_history_day_is_restored_before_its_folder_goes(tmp_path: Path) -> None:
    root = data_dir("local", tmp_path)
    runs = lay_out(root)
    day = ledger.iso(runs[OLD_FINISHED].as_of)
    history = read_csv_str(runs[0].tier_history)
    expected = history.loc[history["as_of"] == day, ["tier", "count"]].values.tolist()
    from include.tier_sync.master_csv import to_csv_bytes

    fileio.write_bytes(runs[0].tier_history, to_csv_bytes(history.loc[history["as_of"] != day]))

    report = retention.prune_runs(runs[0], 90, now=NOW)

    assert report["tier_history_restored"] == [runs[OLD_FINISHED].key]
    after = read_csv_str(runs[0].tier_history)
    assert after.loc[after["as_of"] == day, ["tier", "count"]].values.tolist() == expected


def test_decide_prune_keeps_a_folder_whose_manifest_names_another_day() -> None:
    ref = datetime(2026, 11, 25, 2, tzinfo=AS_OF.tzinfo)
    keys = [ledger.run_key(ref - timedelta(days=d)) for d in (200, 150, 100, 1)]
    decision = retention.decide_prune(
        keys,
        reference=ref,
        retention_days=90,
        protected={keys[3]: "the current run"},
        finished=keys,
        manifest_as_of={keys[0]: "2026-11-24T02:00:00Z", keys[1]: None, keys[2]: ledger.iso(ledger.key_as_of(keys[2]))},
    )
    assert decision.prune == [keys[1], keys[2]]
    assert list(decision.kept_old) == [keys[0]]
    assert "run.json names as_of 2026-11-24T02:00:00Z" in decision.kept_old[keys[0]]
    with pytest.raises(ValueError, match="retention_days"):
        retention.decide_prune(keys, reference=ref, retention_days=0, protected={}, finished=[], manifest_as_of={})


# -- the settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "days"), [(None, 90), ("", 90), ("  ", 90), ("7", 7), (" 365 ", 365)])
def test_retention_days_setting(raw: str | None, days: int) -> None:
    assert settings.check_retention_days(raw) == days


@pytest.mark.parametrize("raw", ["0", "-5", "6", "off", "90.5", "ninety", "+30", "1e3", "٣٠"])
def test_a_bad_retention_setting_is_an_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="Variable tier_sync_retention_days must be a whole number of days >= 7"):
        settings.check_retention_days(raw)


def test_retention_days_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS", "30")
    assert settings.retention_days() == 30
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS", "0")
    with pytest.raises(ValueError, match="tier_sync_retention_days"):
        settings.retention_days()


@pytest.mark.parametrize(("raw", "value"), [(None, False), ("", False), ("false", False), ("TRUE", True), (" true ", True)])
def test_boolean_setting(raw: str | None, value: bool) -> None:
    assert settings.check_flag("tier_sync_git_without_contacts", raw) is value


@pytest.mark.parametrize("raw", ["yes", "1", "on", "tru"])
def test_a_bad_boolean_setting_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="Variable tier_sync_git_without_contacts must be true or false"):
        settings.check_flag("tier_sync_git_without_contacts", raw)


def test_the_task_reads_the_variable_and_a_bad_value_fails_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from include.tier_sync.tasks import prune_runs_task

    root = data_dir("local", tmp_path)
    runs = lay_out(root)
    context = {"data_interval_start": AS_OF - DAY, "data_interval_end": AS_OF}
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", root)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS", "off")
    with pytest.raises(AirflowFailException, match="tier_sync_retention_days"):
        prune_runs_task(context)
    assert len(ledger.list_run_keys(root, NOW)) == len(runs)  # nothing was removed
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS", "100")
    assert prune_runs_task(context)["pruned"] == [runs[OLD_FINISHED].key]


def test_make_up_shows_the_setting_of_airflow_settings_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.up import UpError, retention_setting

    monkeypatch.delenv("AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS", raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert retention_setting(repo / "airflow_settings.yaml") == 90
    bad = tmp_path / "settings.yaml"
    bad.write_text("airflow:\n  variables:\n    - variable_name: tier_sync_retention_days\n      variable_value: '0'\n")
    with pytest.raises(UpError, match="tier_sync_retention_days must be a whole number"):
        retention_setting(bad)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RETENTION_DAYS", "30")  # the environment wins, as in Airflow
    assert retention_setting(bad) == 30


def test_a_removal_cut_short_is_finished_and_its_first_counts_are_kept(tmp_path: Path) -> None:
    """On object storage a folder is removed file by file: if that stops half way (the sync log
    gone, the rest still there), the next prune finishes it and keeps the counts written first."""
    root = data_dir("memory", tmp_path)
    runs = lay_out(root)
    first = retention.prune_runs(runs[0], 90, now=NOW)
    rows = fileio.read_bytes(first["sync_history"])
    # Put back part of a pruned folder, as an interrupted delete would leave it (no sync log).
    leftover = runs[OLD_FINISHED]
    fileio.write_text(leftover.run_tier_changes, "\ufeffCustomer ID,From,To,as_of\n")
    write_run_manifest(leftover, identity(leftover.as_of))
    again = retention.prune_runs(runs[0], 90, now=NOW)
    assert again["pruned"] == [leftover.key]
    assert not fileio.exists(leftover.run_dir)
    assert fileio.read_bytes(first["sync_history"]) == rows  # the counts written first are kept


def test_a_manifest_with_an_unreadable_as_of_keeps_the_folder() -> None:
    ref = datetime(2026, 11, 25, 2, tzinfo=AS_OF.tzinfo)
    key = ledger.run_key(ref - timedelta(days=200))
    decision = retention.decide_prune(
        [key], reference=ref, retention_days=90, protected={}, finished=[key], manifest_as_of={key: "yesterday"}
    )
    assert decision.prune == [] and "run.json names as_of yesterday" in decision.kept_old[key]
