"""Task glue that is pure enough to test without Airflow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from include.tier_sync.tasks import is_latest_interval

pytestmark = pytest.mark.unit

D = datetime(2026, 11, 25, 2, tzinfo=UTC)


def test_latest_interval_is_the_newest_one_that_has_ended() -> None:
    ctx = {"data_interval_start": D - timedelta(days=1), "data_interval_end": D}
    assert is_latest_interval(ctx, now=D + timedelta(hours=14))
    assert not is_latest_interval(ctx, now=D + timedelta(days=1))  # the next interval closed at D+1d
    older = {"data_interval_start": D - timedelta(days=3), "data_interval_end": D - timedelta(days=2)}
    assert not is_latest_interval(older, now=D + timedelta(hours=14))


def test_a_run_without_an_interval_is_not_a_latest_backfill() -> None:
    assert not is_latest_interval({"data_interval_start": None, "data_interval_end": None})
    assert not is_latest_interval({"data_interval_start": D, "data_interval_end": D})
