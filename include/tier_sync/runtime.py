"""What a run is about, read off the Airflow context: its `as_of` instant and its identity.

Where its files live, and how runs compare, is the run ledger's job (ledger.py).

`as_of` is the end of the run's data interval (tier-rules.md). Airflow 3 gives manual runs no data
interval at all, so those fall back to the time the run was asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def to_utc(value: Any) -> datetime:
    """A datetime (aware or naive-as-UTC) or ISO string as an aware UTC datetime, to the second."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):
        raise TypeError(f"not a datetime: {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # pendulum DateTime is a datetime subclass; normalise to the stdlib type.
    out = datetime.fromtimestamp(value.timestamp(), tz=UTC)
    return out.replace(microsecond=0)


def iso(value: datetime) -> str:
    return to_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolve_as_of(context: Mapping[str, Any]) -> datetime:
    """End of the data interval; for manual runs without one, the run's `run_after`."""
    start = context.get("data_interval_start")
    end = context.get("data_interval_end")
    if end is not None and (start is None or end >= start):
        return to_utc(end)
    dag_run = context.get("dag_run")
    run_after = getattr(dag_run, "run_after", None) if dag_run is not None else None
    if run_after is not None:
        return to_utc(run_after)
    return to_utc(datetime.now(tz=UTC))


def run_identity(context: Mapping[str, Any]) -> dict[str, Any]:
    """Small JSON-able description of the run, written into every artifact."""
    dag_run = context.get("dag_run")
    logical = context.get("logical_date")
    run_type = getattr(dag_run, "run_type", None)
    return {
        "dag_id": getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", None),
        "run_id": context.get("run_id") or getattr(dag_run, "run_id", None),
        "run_type": str(getattr(run_type, "value", run_type)) if run_type is not None else None,
        "logical_date": iso(logical) if logical is not None else None,
        "as_of": iso(resolve_as_of(context)),
    }
