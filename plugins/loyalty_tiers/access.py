"""The page's access checks against Airflow: the auth manager decides, the audit log remembers.

The policy (include/tier_sync/customer_access.py): aggregates for anyone who may read the DAG;
per-customer data for those who may edit it, each answered request written to Airflow's audit
log (`log` table; Browse > Audit Log, event `loyalty_customers.*`) and counted against the user's
hourly limit, which is read back from that table so every api-server worker shares it. Airflow is
imported inside the functions: loading the plugin stays cheap in processes that never serve it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import HTTPException, Request, status

from include.tier_sync import customer_access as policy
from include.tier_sync import settings
from include.tier_sync.dashboard_cache import variable

log = logging.getLogger(__name__)


def _dag_details() -> Any:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    return DagDetails(id=settings.DAG_ID)


def can_read_dag(user: Any) -> bool:
    from airflow.api_fastapi.app import get_auth_manager

    return bool(get_auth_manager().is_authorized_dag(method="GET", details=_dag_details(), user=user))


def can_view_customers(user: Any) -> bool:
    """The DAG's edit permission (customer_access's policy), asked of whichever auth manager runs."""
    from airflow.api_fastapi.app import get_auth_manager

    return bool(get_auth_manager().is_authorized_dag(method="PUT", details=_dag_details(), user=user))


def _user_name(user: Any) -> str:
    return str(user.get_name())


def write_audit(
    event: str, user: Any, request: Request, action: str, customer_ids: list[str], total: int | None = None
) -> None:
    """One row in Airflow's audit log: who, when (the row's time), which customers, from where."""
    from airflow.models.log import Log
    from airflow.utils.session import create_session

    client = request.client.host if request.client else None
    extra = policy.audit_extra(action, customer_ids, client, request.headers.get("x-forwarded-for"), total)
    with create_session(scoped=False) as session:
        session.add(
            Log(
                event=event,
                owner=_user_name(user),
                owner_display_name=_user_name(user),
                extra=extra,
                dag_id=settings.DAG_ID,
            )
        )


def _recent_lookups(user: Any, now: datetime) -> list[datetime]:
    from airflow.models.log import Log
    from airflow.utils.session import create_session
    from sqlalchemy import select

    since = now - policy.LIMIT_WINDOW
    with create_session(scoped=False) as session:
        rows = session.scalars(
            select(Log.dttm).where(
                Log.event == policy.LOOKUP_EVENT, Log.owner == _user_name(user), Log.dttm > since
            )
        ).all()
    return [t if t.tzinfo else t.replace(tzinfo=UTC) for t in rows if t is not None]


def _lookup_limit() -> int:
    try:
        return settings.check_customer_lookups_per_hour(variable(settings.VAR_CUSTOMER_LOOKUPS))
    except ValueError as exc:  # a refused setting is the deployer's to fix: say so, answer nothing
        log.error("Loyalty tiers: %s", exc)
        raise HTTPException(status_code=500, detail=str(exc)) from exc


@dataclass(frozen=True)
class CustomerLookup:
    """Permission to answer one per-customer request; `record` writes its audit row."""

    user: Any
    request: Request

    def record(self, action: str, customer_ids: list[str], total: int | None = None) -> None:
        write_audit(policy.LOOKUP_EVENT, self.user, self.request, action, customer_ids, total)


def customer_lookup(request: Request, user: Any, action: str) -> CustomerLookup:
    """403 without the permission, 429 past the hourly limit (both audited), else a lookup to record."""
    if not can_view_customers(user):
        write_audit(policy.DENIED_EVENT, user, request, action, [])
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=policy.DENIED_MESSAGE)
    return permitted_lookup(request, user, action)


def permitted_lookup(request: Request, user: Any, action: str) -> CustomerLookup:
    """For a user already known to hold the permission: 429 past the hourly limit (audited), else
    a lookup to record."""
    now = datetime.now(UTC)
    decision = policy.decide(_recent_lookups(user, now), _lookup_limit(), now)
    if not decision.allowed:
        write_audit(policy.LIMITED_EVENT, user, request, action, [])
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail=policy.limited_message(decision),
            headers={"Retry-After": str(decision.retry_after_s)},
        )
    return CustomerLookup(user=user, request=request)
