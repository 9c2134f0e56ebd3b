"""Who may see one customer's data on the "Loyalty tiers" page, what is recorded when they do, and
how often they may.

Aggregates (tier counts, history, moves, sync counts, data quality) are for anyone who may read the
DAG. Per-customer data (search, one customer's detail, names in the at-risk list) needs the DAG's
edit permission: a person who may trigger and clear runs already decides what reaches each
customer's record in the POS, and every auth manager has that permission (Airflow's SimpleAuthManager
gives it to User, Op and Admin, never to Viewer; FAB and Keycloak map it to their own roles).

Every per-customer request is written to Airflow's audit log (Browse > Audit Log in the UI) with
who, when, which customers and from where, and counted against a per-user limit per hour; the
count comes from that same audit log, so every api-server worker and host shares it. This module
holds the pure parts (the policy's words, masking, the limit's arithmetic, the audit record); the
plugin (plugins/loyalty_tiers/access.py) asks the auth manager and writes the rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

LOOKUP_EVENT = "loyalty_customers.lookup"  # a per-customer request that was answered
DENIED_EVENT = "loyalty_customers.denied"  # refused: the user lacks the permission
LIMITED_EVENT = "loyalty_customers.rate_limited"  # refused: the user's hourly limit is used up
LIMIT_WINDOW = timedelta(hours=1)
MAX_AUDITED_IDS = 200  # one page of a list at most (dashboard.MAX_PAGE)

PERMISSION = "edit on the DAG customer_tier_sync"
DENIED_MESSAGE = (
    f"Customer data (search, one customer, names of at-risk customers) needs {PERMISSION} "
    "(Airflow roles User, Op and Admin have it by default; Viewer does not). Aggregates stay visible."
)


def mask_email(email: str | None) -> str:
    """`jane.doe@example.com` -> `j•••@example.com`: enough to tell two candidates apart in a list,
    not enough to harvest the address. Anything that is not an address masks to `•••`."""
    text = (email or "").strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return "•••" if text else ""
    return f"{local[0]}•••@{domain}"


@dataclass(frozen=True)
class LimitDecision:
    allowed: bool
    used: int  # answered lookups of this user in the window, before this one
    limit: int
    retry_after_s: int  # 0 when allowed: seconds until the oldest counted lookup leaves the window


def decide(recent: Sequence[datetime], limit: int, now: datetime, window: timedelta = LIMIT_WINDOW) -> LimitDecision:
    """Whether one more lookup fits: `recent` are the times of this user's answered lookups."""
    inside = sorted(t for t in recent if now - window < t <= now)
    if len(inside) < limit:
        return LimitDecision(allowed=True, used=len(inside), limit=limit, retry_after_s=0)
    # The lookup that must leave the window before one more fits.
    frees_at = inside[len(inside) - limit] + window
    wait = max(1, int((frees_at - now).total_seconds() + 0.999))
    return LimitDecision(allowed=False, used=len(inside), limit=limit, retry_after_s=wait)


def limited_message(decision: LimitDecision) -> str:
    minutes = max(1, (decision.retry_after_s + 59) // 60)
    return (
        f"Too many customer lookups: {decision.limit} per hour per user "
        f"(Variable tier_sync_customer_lookups_per_hour). Try again in {minutes} min."
    )


def audit_extra(
    action: str,
    customer_ids: Sequence[str],
    client: str | None,
    forwarded_for: str | None = None,
    total: int | None = None,
) -> str:
    """The audit row's `extra` (JSON). Customer ids only: Airflow's audit log is readable by
    Viewers, so no name, email or search text goes into it."""
    ids = [str(c) for c in customer_ids]
    doc: dict[str, object] = {
        "action": action,
        "customer_ids": ids[:MAX_AUDITED_IDS],
        "customers": len(ids) if total is None else total,
        "client": client or "unknown",
    }
    if forwarded_for:
        doc["forwarded_for"] = forwarded_for[:200]
    return json.dumps(doc, sort_keys=True)
