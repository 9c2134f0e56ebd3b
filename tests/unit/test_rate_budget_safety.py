"""The shared request budget trusts only a private folder and plausible file contents (issue 13).

Why: every task process obeys the budget file, so a file another user can plant (the old default
was the world-writable temp dir) or a corrupt value (a `blocked_until` ten years ahead) could hold
the whole pipeline back. Clock and sleep are fakes: the tests assert the sleeps asked for.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from include.tier_sync import rate_budget
from include.tier_sync.rate_budget import RateBudget
from tests.unit.fakes import FakeTime

pytestmark = pytest.mark.unit

TEN_YEARS = 10 * 365 * 86400.0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def budget_in(directory: Path, t: FakeTime, limit: int = 10, window: float = 300.0) -> RateBudget:
    return RateBudget(
        "store", limit=limit, window_seconds=window, directory=directory, clock=t.clock, sleep=t.sleep
    )


def write_budget_file(budget: RateBudget, content: str) -> None:
    budget.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    budget.path.write_text(content, encoding="utf-8")


# -- where the folder is and who may write it ------------------------------------------------------


def test_default_folder_is_under_airflow_home_not_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home"))
    assert rate_budget.default_directory() == tmp_path / "home" / "tier_sync_rate_budget"
    assert RateBudget("k", limit=5).directory == tmp_path / "home" / "tier_sync_rate_budget"
    monkeypatch.delenv("AIRFLOW_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert rate_budget.default_directory() == tmp_path / "user" / "airflow" / "tier_sync_rate_budget"


def test_folder_is_created_owner_only_and_files_0600(tmp_path: Path, umask_022: None) -> None:
    t = FakeTime()
    directory = tmp_path / "nested" / "budget"
    budget = budget_in(directory, t)
    budget.acquire()
    budget.block_until(t.now + 5)
    assert mode(directory) == 0o700
    assert mode(budget.path) == 0o600
    assert mode(budget.lock_path) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == sorted([budget.path.name, budget.lock_path.name])


def test_a_lock_file_left_readable_by_others_is_made_0600(tmp_path: Path, umask_022: None) -> None:
    t = FakeTime()
    budget = budget_in(tmp_path / "budget", t)
    budget.directory.mkdir(mode=0o700)
    budget.lock_path.touch()
    os.chmod(budget.lock_path, 0o644)
    budget.acquire()
    assert mode(budget.lock_path) == 0o600


def test_a_world_writable_folder_of_ours_is_closed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t = FakeTime()
    directory = tmp_path / "budget"
    directory.mkdir()
    os.chmod(directory, 0o777)
    budget = budget_in(directory, t)
    with caplog.at_level(logging.WARNING, logger="include.tier_sync.rate_budget"):
        assert budget.acquire() == 0.0
    assert mode(directory) == 0o700
    assert any(str(directory) in r.getMessage() and "0o777" in r.getMessage() for r in caplog.records)


def test_a_folder_of_another_user_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = FakeTime()
    directory = tmp_path / "budget"
    directory.mkdir(mode=0o700)
    owner = os.stat(directory).st_uid
    budget = budget_in(directory, t)
    monkeypatch.setattr(os, "getuid", lambda: owner + 4242)
    with pytest.raises(PermissionError, match="rate_budget_dir") as info:
        budget.acquire()
    assert str(directory) in str(info.value) and f"uid {owner}" in str(info.value)
    assert type(info.value).__name__ == "RateBudgetDirError"
    assert list(directory.iterdir()) == []  # nothing read from or written to it
    assert t.sleeps == []


def test_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "budget").write_text("not a folder", encoding="utf-8")
    budget = budget_in(tmp_path / "budget", FakeTime())
    with pytest.raises(PermissionError, match="is not a folder"):
        budget.acquire()


# -- what is read from the file is made plausible --------------------------------------------------


def test_blocked_until_ten_years_ahead_holds_at_most_the_clamp(tmp_path: Path) -> None:
    t = FakeTime()
    budget = budget_in(tmp_path / "budget", t)
    write_budget_file(budget, json.dumps({"sent": [], "blocked_until": t.now + TEN_YEARS}))
    clamp = rate_budget.MAX_BLOCK_SECONDS
    assert 300.0 <= clamp <= 3600.0
    assert budget.acquire() == pytest.approx(clamp)
    assert t.sleeps == [pytest.approx(clamp)]  # one hold, not a clamp renewed on every read
    assert budget.acquire() == 0.0
    assert len(t.sleeps) == 1


def test_the_clamp_can_be_set_per_budget(tmp_path: Path) -> None:
    t = FakeTime()
    budget = RateBudget(
        "store", limit=10, directory=tmp_path / "b", clock=t.clock, sleep=t.sleep, max_block_seconds=30.0
    )
    write_budget_file(budget, json.dumps({"sent": [], "blocked_until": t.now + TEN_YEARS}))
    assert budget.acquire() == pytest.approx(30.0)


def test_block_until_itself_is_clamped(tmp_path: Path) -> None:
    t = FakeTime()
    budget = budget_in(tmp_path / "budget", t)
    other = budget_in(tmp_path / "budget", t)
    budget.block_until(t.now + TEN_YEARS)
    assert other.acquire() == pytest.approx(rate_budget.MAX_BLOCK_SECONDS)


@pytest.mark.parametrize("value", ["Infinity", "NaN", '"2036-01-01T00:00:00Z"', "true", "[1]"])
def test_blocked_until_that_is_not_a_finite_number_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    t = FakeTime()
    budget = budget_in(tmp_path / "budget", t)
    write_budget_file(budget, f'{{"sent": [{t.now - 1!r}], "blocked_until": {value}}}')
    with caplog.at_level(logging.WARNING, logger="include.tier_sync.rate_budget"):
        assert budget.acquire() == 0.0
    assert t.sleeps == []
    assert budget.in_window() == 2  # the valid send times in the file still count
    assert any(
        "blocked_until" in r.getMessage() and str(budget.path) in r.getMessage() for r in caplog.records
    )


def test_send_times_from_the_future_count_as_sent_now(tmp_path: Path) -> None:
    t = FakeTime()
    budget = budget_in(tmp_path / "budget", t, limit=2, window=60.0)
    write_budget_file(budget, json.dumps({"sent": [t.now + TEN_YEARS] * 2, "blocked_until": 0}))
    assert budget.acquire() == pytest.approx(60.0)  # at most one window, not ten years


def test_a_symlinked_budget_file_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    budget = budget_in(tmp_path / "budget", t)
    budget.directory.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"sent": [], "blocked_until": t.now + 100}), encoding="utf-8")
    budget.path.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="include.tier_sync.rate_budget"):
        assert budget.acquire() == 0.0
    assert t.sleeps == []
    assert not budget.path.is_symlink()  # replaced by a file of ours
    assert json.loads(elsewhere.read_text(encoding="utf-8"))["sent"] == []  # the target untouched
