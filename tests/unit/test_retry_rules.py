"""The DAG's retry policy: which failures fail at once, which wait a rate-limit window, which back off."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from airflow.sdk.definitions.retry_policy import RetryAction

from include.tier_sync import retry_rules
from include.tier_sync.lightspeed_errors import (
    LightspeedAuthError,
    LightspeedClientError,
    LightspeedConfigError,
    LightspeedFeedError,
    LightspeedNotFound,
    LightspeedProtocolError,
    LightspeedRateLimited,
    LightspeedTimeout,
    LightspeedUnavailable,
)
from include.tier_sync.retry_rules import decision_for

if TYPE_CHECKING:
    import requests_mock as rm

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "exc",
    [
        LightspeedAuthError("GET /sales -> 401", 401),
        LightspeedConfigError("plain http to a remote host"),
    ],
)
def test_auth_and_config_errors_fail_at_once(exc: BaseException) -> None:
    decision = decision_for(exc)
    assert decision.action is RetryAction.FAIL
    assert "auth or configuration" in decision.reason


def test_data_errors_fail_at_once() -> None:
    from include.tier_sync.clv import AmountOverflowError
    from include.tier_sync.ledger import FutureRunError
    from include.tier_sync.store import StoreCorruptError
    from include.tier_sync.store_records import MalformedRecordError
    from include.tier_sync.sync.live import LiveCustomersError
    from include.tier_sync.sync.log import SyncFailed
    from include.tier_sync.sync.plan import MassChangeError
    from include.tier_sync.sync.write import GroupDeletedError
    from include.tier_sync.validation import DataQualityError

    classes: list[type[BaseException]] = [
        LightspeedFeedError, LightspeedClientError, GroupDeletedError, MalformedRecordError, AmountOverflowError,
        DataQualityError, MassChangeError, SyncFailed, FutureRunError, StoreCorruptError, LiveCustomersError,
    ]
    for cls in classes:
        exc = cls.__new__(cls)  # matching is by class; each __init__ has its own arguments
        decision = decision_for(exc)
        assert decision.action is RetryAction.FAIL, type(exc).__name__
        assert decision.reason.startswith("data error"), type(exc).__name__


def test_rate_limit_exhaustion_waits_one_full_window() -> None:
    decision = decision_for(LightspeedRateLimited("still rate limited (429) after 3 waits", 429))
    assert decision.action is RetryAction.RETRY
    assert decision.retry_delay == timedelta(minutes=5)


@pytest.mark.parametrize(
    "exc",
    [
        LightspeedUnavailable("POST /customer_groups/g/customers -> 503 after 5 attempts", 503),
        LightspeedTimeout("read timed out"),
        LightspeedProtocolError("no data list"),
    ],
)
def test_transient_errors_retry_with_the_tasks_backoff(exc: BaseException) -> None:
    decision = decision_for(exc)
    assert decision.action is RetryAction.RETRY
    assert decision.retry_delay is None  # the task's retry_delay with exponential backoff
    assert "transient" in decision.reason


def test_the_budget_and_git_push_failures_are_transient() -> None:
    from include.tier_sync.git_export import GitPushError
    from include.tier_sync.rate_budget import RateBudgetDirError, RateBudgetUnavailable

    assert decision_for(RateBudgetUnavailable("redis down")).action is RetryAction.RETRY
    assert decision_for(GitPushError("push refused")).action is RetryAction.RETRY
    assert decision_for(RateBudgetDirError("owned by another user")).action is RetryAction.FAIL


def test_anything_else_follows_the_tasks_retries() -> None:
    assert decision_for(RuntimeError("boom")).action is RetryAction.DEFAULT
    assert decision_for(LightspeedNotFound("GET /customers/1 -> 404")).action is RetryAction.DEFAULT


def test_the_client_raises_rate_limited_once_its_waits_are_spent(requests_mock: rm.Mocker) -> None:
    """What the transport raises after its last 429 wait is what the rate-limit rule matches."""
    from include.tier_sync.lightspeed import LightspeedClient
    from tests.unit.fakes import FakeTime

    fake_time = FakeTime()
    base = "https://acme.retail.lightspeed.app/api/2.0"
    client = LightspeedClient(base, "lsxs_pt_token", max_retries=3, sleep=fake_time.sleep, clock=fake_time.clock)
    requests_mock.get(f"{base}/sales", status_code=429, headers={"Retry-After": "60"})
    with pytest.raises(LightspeedRateLimited) as info:
        list(client.iter_sales())
    assert info.value.status == 429
    decision = decision_for(info.value)
    assert decision.action is RetryAction.RETRY and decision.retry_delay == timedelta(minutes=5)


def test_every_rule_names_a_real_exception_class() -> None:
    """A typo in a dotted path would silently never match: import each one for real."""
    import importlib

    for spec in [*retry_rules.AUTH_ERRORS, *retry_rules.DATA_ERRORS, *retry_rules.RATE_LIMIT_ERRORS,
                 *retry_rules.TRANSIENT_ERRORS]:
        module, _, name = spec.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, BaseException), spec


def test_a_damaged_store_fails_at_once_in_a_task_that_never_imported_the_store() -> None:
    """plan_sync reads the manifest through store_manifest only (no pyarrow): the rule must match there."""
    code = (
        "import sys\n"
        "from include.tier_sync.retry_rules import decision_for\n"
        "from include.tier_sync.store_manifest import StoreCorruptError\n"
        "d = decision_for(StoreCorruptError('manifest is not valid JSON'))\n"
        "assert 'include.tier_sync.store' not in sys.modules\n"
        "print(d.action.name, d.reason.startswith('data error'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["FAIL", "True"]


def test_building_the_policy_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from include.tier_sync.retry_rules import tier_sync_retry_policy, describe\n"
        "p = tier_sync_retry_policy(); describe(p)\n"
        "p.evaluate(RuntimeError('x'), try_number=1, max_tries=3)\n"
        "bad = [m for m in ('pandas', 'pyarrow', 'numpy', 'great_expectations', 'git') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_describe_lists_every_rule() -> None:
    text = retry_rules.describe()
    assert "`LightspeedAuthError`" in text and "**fail at once**" in text
    assert "`LightspeedRateLimited`: **retry after 0:05:00**" in text
    assert "`LightspeedUnavailable`" in text and "with the task's backoff" in text
