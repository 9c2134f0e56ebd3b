"""What a retry can cure: the DAG's `retry_policy` (Airflow 3.3 `ExceptionRetryPolicy`).

Every task gets the same ordered rules (first match wins), evaluated by Airflow in the worker
against the real exception:

1. auth and configuration errors (401/403, an unusable connection, an unsafe budget folder)
   fail at once: only a person fixing the connection helps;
2. data errors (malformed or implausible sales, a failed quality gate, the circuit breaker, a feed
   that loops, a 4xx, a group deleted in the POS, a run dated in the future, a damaged order
   store, customers that could not be synced) fail at once: a retry reads the same data;
3. a rate limit that outlasted the client's own waits retries after one full rate-limit window
   (5 minutes on X-Series), when the budget is new again;
4. transient API errors (5xx, timeouts, network, a bad body behind a 200, the shared budget
   unreachable) and a failed git push retry with the task's exponential backoff;
5. anything else follows the task's ordinary retries.

The retry count itself stays the task's (`retries`): a rule can fail a task earlier, never retry
it more often. `AirflowFailException` (the tasks' own "fail now, with this message") always fails
at once, whatever the rules say.

Exceptions are named by dotted path and resolved only from modules *already imported*: building
the policy at DAG parse time imports neither pandas nor pyarrow, and an exception whose module was
never imported cannot have been raised.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy, RetryAction, RetryRule

from include.tier_sync.rate_budget import WINDOW_SECONDS

_P = "include.tier_sync."

AUTH_ERRORS = [
    _P + "lightspeed_errors.LightspeedAuthError",
    _P + "lightspeed_errors.LightspeedConfigError",
    _P + "rate_budget.RateBudgetDirError",
]
DATA_ERRORS = [
    _P + "lightspeed_errors.LightspeedFeedError",
    _P + "lightspeed_errors.LightspeedClientError",
    _P + "sync.write.GroupDeletedError",
    _P + "store_records.MalformedRecordError",
    _P + "clv.AmountOverflowError",
    _P + "validation.DataQualityError",
    _P + "sync.plan.MassChangeError",
    _P + "sync.log.SyncFailed",
    _P + "sync.contracts.UnsupportedFormatVersion",
    _P + "ledger.FutureRunError",
    _P + "store_manifest.StoreCorruptError",  # its home (store re-exports it): the light tasks import only that
    _P + "sync.live.LiveCustomersError",
]
RATE_LIMIT_ERRORS = [_P + "lightspeed_errors.LightspeedRateLimited"]
TRANSIENT_ERRORS = [
    _P + "lightspeed_errors.LightspeedUnavailable",
    _P + "git_export.GitPushError",
]
RATE_LIMIT_DELAY = timedelta(seconds=WINDOW_SECONDS)


class LoadedRule(RetryRule):
    """A `RetryRule` whose exceptions are dotted paths resolved from `sys.modules` only, when a
    failure is evaluated (never imported: see the module docstring)."""

    def __post_init__(self) -> None:
        for spec in self._specs:
            if not isinstance(spec, str) or "." not in spec:
                raise ValueError(f"LoadedRule takes dotted exception paths, got {spec!r}")

    def _resolve_exception_classes(self) -> list[type[BaseException]]:
        found: list[type[BaseException]] = []
        for spec in self._specs:
            module_name, _, name = str(spec).rpartition(".")
            cls = getattr(sys.modules.get(module_name), name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
        return found  # not cached: a module imported later may bring its class


def tier_sync_retry_policy() -> ExceptionRetryPolicy:
    """The policy every task of the DAG carries (default_args)."""
    return ExceptionRetryPolicy(
        rules=[
            LoadedRule(
                exception=list(AUTH_ERRORS),
                action=RetryAction.FAIL,
                reason="auth or configuration error: retrying cannot help, fix the connection",
            ),
            LoadedRule(
                exception=list(DATA_ERRORS),
                action=RetryAction.FAIL,
                reason="data error: a retry would read the same data",
            ),
            LoadedRule(
                exception=list(RATE_LIMIT_ERRORS),
                action=RetryAction.RETRY,
                retry_delay=RATE_LIMIT_DELAY,
                reason="rate limit exhausted: retrying after one full rate-limit window",
            ),
            LoadedRule(
                exception=list(TRANSIENT_ERRORS),
                action=RetryAction.RETRY,
                reason="transient error: retrying with backoff",
            ),
        ],
        default=RetryAction.DEFAULT,
    )


def describe(policy: ExceptionRetryPolicy | None = None) -> str:
    """The rules as Markdown, for the DAG's documentation in the UI."""
    policy = policy or tier_sync_retry_policy()
    lines = ["#### Retry policy (every task; first matching rule wins)", ""]
    for rule in policy.rules:
        names = ", ".join(f"`{str(s).rpartition('.')[2]}`" for s in rule._specs)
        what: dict[RetryAction, str] = {RetryAction.FAIL: "fail at once", RetryAction.RETRY: "retry"}
        delay = f" after {rule.retry_delay}" if rule.retry_delay else " with the task's backoff"
        action = what.get(rule.action, rule.action.value) + (delay if rule.action is RetryAction.RETRY else "")
        lines.append(f"- {names}: **{action}** ({rule.reason})")
    lines.append("- anything else: the task's ordinary retries")
    return "\n".join(lines)


def decision_for(exc: BaseException, try_number: int = 1, max_tries: int = 3) -> Any:
    """The policy's decision for `exc` (tests, and a person asking "would this retry?")."""
    return tier_sync_retry_policy().evaluate(exc, try_number=try_number, max_tries=max_tries)
