"""The run ledger: future dates, baseline (same-day re-runs included), latest, serialized publishing."""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from include.tier_sync import fileio, ledger
from include.tier_sync.ledger import FutureRunError, RunPaths
from include.tier_sync.master_csv import publish_run
from include.tier_sync.rules import TierRules
from include.tier_sync.runtime import iso
from include.tier_sync.validation import DataQualityError, validate_master
from tests.unit.test_clv import AS_OF, DAY, customer, customers_df, sale, sales_df
from tests.unit.test_master_csv import FakeStore, identity, run

pytestmark = pytest.mark.unit

NOW = AS_OF + timedelta(hours=3)  # every test's "now": a few hours after the fixed as_of


def good_store(n: int = 40) -> FakeStore:
    """n customers, each with one sale of a different size (a mix of tiers)."""
    customers = [customer(f"c{i:03d}") for i in range(n)]
    sales = [sale(f"s{i:03d}", f"c{i:03d}", f"{(i % 8) * 250 + 20}.00", AS_OF - 40 * DAY) for i in range(n)]
    return FakeStore(sales_df(*sales), customers_df(*customers))


def history_days(data_dir: Path | str) -> list[str]:
    """The days tier_history.csv holds, for a local data dir or an object-storage URL."""
    text = fileio.read_text(fileio.join(str(data_dir), ledger.HISTORY_FILE)).lstrip("\ufeff")
    return sorted({row["as_of"] for row in csv.DictReader(io.StringIO(text))})


# -- future dates -------------------------------------------------------------------------------


def test_a_run_dated_in_the_future_is_refused_naming_the_date() -> None:
    with pytest.raises(FutureRunError, match="2099-01-01T02:00:00Z") as info:
        ledger.refuse_future(datetime(2099, 1, 1, 2, tzinfo=AS_OF.tzinfo), now=NOW)
    assert "nothing was read or written" in str(info.value)
    ledger.refuse_future(AS_OF, now=NOW)  # the past is fine
    ledger.refuse_future(NOW + ledger.CLOCK_SKEW, now=NOW)  # so is a little clock skew


def test_future_dates_in_the_data_dir_are_ignored_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run(tmp_path, good_store(), AS_OF)
    future = RunPaths(str(tmp_path), datetime(2062, 11, 25, 2, tzinfo=AS_OF.tzinfo))
    fileio.makedirs(future.run_dir)
    fileio.write_json(str(tmp_path / ledger.LATEST_FILE), {"as_of": "2062-11-25T02:00:00Z"})
    paths = RunPaths(str(tmp_path), AS_OF + DAY)
    with caplog.at_level(logging.WARNING, logger="include.tier_sync.ledger"):
        assert ledger.run_keys(paths, now=NOW + DAY) == [ledger.run_key(AS_OF)]
        # latest.json says 2062: not obeyed; the newest published run folder stands in.
        assert ledger.newest_published_as_of(paths, now=NOW + DAY) == iso(AS_OF)
        assert ledger.is_newest_run(paths, now=NOW + DAY)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "2062-11-25T02:00:00Z lies in the future" in messages
    assert "20621125T020000Z" in messages and "dated in the future" in messages


def test_the_next_real_run_publishes_after_a_future_latest_json(tmp_path: Path) -> None:
    run(tmp_path, good_store(), AS_OF)
    (tmp_path / ledger.LATEST_FILE).write_text(json.dumps({"as_of": "2099-01-01T00:00:00Z"}))
    out = run(tmp_path, good_store(), AS_OF + DAY)
    assert out["latest"] is True
    assert json.loads((tmp_path / ledger.LATEST_FILE).read_text())["as_of"] == iso(AS_OF + DAY)


# -- baseline and previous run ------------------------------------------------------------------


def test_baseline_includes_a_published_run_of_the_same_day_previous_run_does_not(tmp_path: Path) -> None:
    run(tmp_path, good_store(), AS_OF)
    paths = RunPaths(str(tmp_path), AS_OF)
    assert ledger.baseline(paths, now=NOW) == (paths.key, paths.published_master_for(paths.key))
    assert ledger.previous_run(paths, now=NOW) is None
    nxt = RunPaths(str(tmp_path), AS_OF + DAY)
    assert ledger.previous_run(nxt, now=NOW + DAY) == (paths.key, paths.published_master_for(paths.key))


def test_a_same_day_rerun_of_a_wiped_extraction_fails_the_gate_and_publishes_nothing(tmp_path: Path) -> None:
    run(tmp_path, good_store(), AS_OF)  # a good day, validated and published
    published = (tmp_path / ledger.MASTER_FILE).read_bytes()
    history = (tmp_path / ledger.HISTORY_FILE).read_bytes()
    paths = RunPaths(str(tmp_path), AS_OF)
    kept = paths.published_master_for(paths.key)
    kept_bytes = Path(kept).read_bytes()

    # The same day again, after most customers vanished from the extraction.
    wiped = FakeStore(
        sales_df(sale("s000", "c000", "20.00", AS_OF - 40 * DAY)), customers_df(customer("c000"), customer("c001"))
    )
    run(tmp_path, wiped, AS_OF, validated=False)  # compute_tiers rewrote the run folder's master
    with pytest.raises(DataQualityError) as info:
        validate_master(paths, TierRules())
    summary = info.value.summary
    assert summary["previous_run"] == paths.key  # compared with what that day published
    assert any("row_count" in name for name in summary["failed"]), summary["failed"]
    # Nothing was published: the stable master, the history and the day's published copy stand.
    assert (tmp_path / ledger.MASTER_FILE).read_bytes() == published
    assert (tmp_path / ledger.HISTORY_FILE).read_bytes() == history
    assert Path(kept).read_bytes() == kept_bytes


# -- publishing ---------------------------------------------------------------------------------


def test_concurrent_backfills_keep_every_day_in_the_history_and_the_newest_as_latest(tmp_path: Path) -> None:
    days = [AS_OF + i * DAY for i in range(6)]
    store = good_store()
    computed = {}
    for day in days:  # compute in parallel runs' folders first (compute_tiers touches nothing shared)
        computed[day] = run(tmp_path, store, day, validated=False)
        fileio.write_json(RunPaths(str(tmp_path), day).run_validation_json, {"summary": {"success": True}})
    start = threading.Barrier(len(days))

    def publish(day: datetime) -> bool:
        start.wait()
        return publish_run(RunPaths(str(tmp_path), day), identity(day), computed[day]["tier_breakdown"])

    with ThreadPoolExecutor(len(days)) as pool:
        list(pool.map(publish, reversed(days)))
    assert history_days(tmp_path) == [iso(d) for d in days]
    assert json.loads((tmp_path / ledger.LATEST_FILE).read_text())["as_of"] == iso(days[-1])
    assert all(fileio.exists(RunPaths(str(tmp_path), d).published_json_for(ledger.run_key(d))) for d in days)


def test_publishing_is_one_writer_at_a_time(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), AS_OF)
    inside = 0
    most = 0
    guard = threading.Lock()

    def hold() -> None:
        nonlocal inside, most
        with ledger.publishing(paths), ledger.publishing(paths):  # re-entrant in one thread
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(0.02)
            with guard:
                inside -= 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: hold(), range(8)))
    assert most == 1


def test_write_latest_keeps_the_newer_days_copy(tmp_path: Path) -> None:
    run(tmp_path, good_store(), AS_OF + DAY)
    older = RunPaths(str(tmp_path), AS_OF)
    target = str(tmp_path / "some_latest.json")
    newer = RunPaths(str(tmp_path), AS_OF + DAY)
    assert ledger.write_latest(newer, target, {"as_of": iso(AS_OF + DAY)}, lambda d: d.get("as_of"), now=NOW + DAY)
    assert not ledger.write_latest(older, target, {"as_of": iso(AS_OF)}, lambda d: d.get("as_of"), now=NOW + DAY)
    assert json.loads(Path(target).read_text())["as_of"] == iso(AS_OF + DAY)
    # A future date in the file is not obeyed: the latest run replaces it.
    Path(target).write_text(json.dumps({"as_of": "2099-01-01T00:00:00Z"}))
    assert ledger.write_latest(newer, target, {"as_of": iso(AS_OF + DAY)}, lambda d: d.get("as_of"), now=NOW + DAY)
