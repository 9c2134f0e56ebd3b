"""The customer-data policy's pure parts: masking, the hourly limit's arithmetic, the audit record,
and the limit's setting (the Airflow side is tests/integration/test_ui_plugin.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from include.tier_sync import settings
from include.tier_sync.customer_access import (
    LIMIT_WINDOW,
    MAX_AUDITED_IDS,
    audit_extra,
    decide,
    limited_message,
    mask_email,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("jane.doe@example.com", "j•••@example.com"),
        ("  Z@x.nz ", "Z•••@x.nz"),
        ("a@b@c.org", "a•••@c.org"),  # the domain is what follows the last @
        ("not-an-address", "•••"),
        ("@example.com", "•••"),
        ("", ""),
        (None, ""),
    ],
)
def test_mask_email(email: str | None, masked: str) -> None:
    assert mask_email(email) == masked


def test_the_limit_counts_the_last_hour_only() -> None:
    recent = [NOW - 70 * MIN, NOW - 50 * MIN, NOW - 20 * MIN, NOW - 1 * MIN]
    ok = decide(recent, limit=4, now=NOW)
    assert ok.allowed and ok.used == 3 and ok.retry_after_s == 0  # the 70-minute-old one is out
    full = decide(recent, limit=3, now=NOW)
    assert not full.allowed and full.used == 3
    assert full.retry_after_s == 10 * 60  # when the 50-minute-old lookup leaves the window
    tighter = decide(recent, limit=2, now=NOW)
    assert tighter.retry_after_s == 40 * 60  # two must leave: the second oldest decides
    assert "in 40 min" in limited_message(tighter) and "tier_sync_customer_lookups_per_hour" in limited_message(
        tighter
    )


def test_the_window_edge_and_future_rows() -> None:
    edge = NOW - LIMIT_WINDOW  # exactly an hour ago: already out
    assert decide([edge], limit=1, now=NOW).allowed
    # A row stamped after `now` (another host's clock ahead) is not counted as "in the window".
    assert decide([NOW + MIN], limit=1, now=NOW).allowed


def test_the_audit_record_holds_ids_never_contact_data() -> None:
    ids = [f"c{i}" for i in range(MAX_AUDITED_IDS + 5)]
    doc = json.loads(audit_extra("at_risk", ids, "10.0.0.7", "203.0.113.9, 10.0.0.1"))
    assert doc["action"] == "at_risk" and doc["client"] == "10.0.0.7"
    assert doc["forwarded_for"] == "203.0.113.9, 10.0.0.1"
    assert doc["customer_ids"] == ids[:MAX_AUDITED_IDS] and doc["customers"] == len(ids)
    assert set(doc) == {"action", "customer_ids", "customers", "client", "forwarded_for"}
    assert json.loads(audit_extra("search", [], None, total=0)) == {
        "action": "search",
        "customer_ids": [],
        "customers": 0,
        "client": "unknown",
    }


@pytest.mark.parametrize("raw", ["0", "-5", "ten", "1.5", "10001", "１２"])
def test_a_bad_limit_setting_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="tier_sync_customer_lookups_per_hour"):
        settings.check_customer_lookups_per_hour(raw)


def test_the_limit_setting() -> None:
    assert settings.check_customer_lookups_per_hour(None) == settings.CUSTOMER_LOOKUPS_PER_HOUR
    assert settings.check_customer_lookups_per_hour("  ") == settings.CUSTOMER_LOOKUPS_PER_HOUR
    assert settings.check_customer_lookups_per_hour(" 25 ") == 25
