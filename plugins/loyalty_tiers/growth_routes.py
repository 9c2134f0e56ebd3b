"""The page's "At risk, in full" and "Growing" routes, and their campaign CSV (issue 18).

Counts for everyone who may read the DAG; the customers on the lists only with the per-customer
permission, audited and rate-limited like the at-risk names (access.permitted_lookup). The CSV
export is checked exactly like one customer's view (access.customer_lookup: 403, audited, without
the permission; 429 past the hourly limit) and every exported customer id is audited. The lists
themselves are include/tier_sync/dashboard_growth.py; `build_router` gets the app's own user
dependency and data-dir reader so this module never imports app.py.
"""

# ruff: noqa: I002 - no `from __future__ import annotations`: FastAPI must resolve the Annotated
# aliases local to build_router, which string annotations would hide from it.

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from include.tier_sync import dashboard, dashboard_campaign, dashboard_growth
from loyalty_tiers import access

log = logging.getLogger(__name__)

EXPORT_ACTION = "campaign_export"


def _options() -> dashboard_growth.Options:
    try:
        return dashboard_growth.load_options()
    except ValueError as exc:  # a refused Variable is the deployer's to fix: say which, answer nothing
        log.error("Loyalty tiers: %s", exc)
        raise HTTPException(status_code=500, detail=str(exc)) from exc


def _listed(request: Request, user: Any, action: str, found: dict[str, Any], kinds: tuple[str, ...],
            page: tuple[str | None, int, int]) -> JSONResponse:
    """The list's counts and one page (kind, limit, offset) of it; its customers only for a user
    holding the permission (the lookup audited)."""
    payload = dashboard_growth.overview(found, kinds, *page)
    lookup = access.permitted_lookup(request, user, action) if access.can_view_customers(user) else None
    payload["customers_visible"] = lookup is not None
    if lookup is None:
        payload["customers"] = []
    elif payload["customers"]:
        lookup.record(action, [c["customer_id"] for c in payload["customers"]], total=payload["total"])
    return JSONResponse(payload, headers={"Cache-Control": "no-store"})


def build_router(require_user: Callable[..., Any], data_dir: Callable[[], str]) -> APIRouter:
    router = APIRouter()
    User = Annotated[Any, Depends(require_user)]
    Limit = Annotated[int, Query(ge=1, le=dashboard.MAX_PAGE)]
    Offset = Annotated[int, Query(ge=0)]
    Runs = Annotated[int, Query(ge=1, le=dashboard_growth.MAX_GROWING_RUNS)]
    Days = Annotated[int, Query(ge=0, le=3650)]

    @router.get("/api/at-risk-full")
    def at_risk_full(request: Request, user: User, within_days: Days = 30, limit: Limit = 50,
                     offset: Offset = 0, kind: Annotated[str | None, Query(pattern="^(next_run|return|streak)$")] = None) -> JSONResponse:
        found = dashboard_growth.risk_entries(data_dir(), dashboard.resolve_rules(), _options(), within_days)
        return _listed(request, user, "at_risk_full", found, dashboard_growth.RISK_KINDS, (kind, limit, offset))

    @router.get("/api/growing")
    def growing(request: Request, user: User, runs: Runs = dashboard_growth.GROWING_RUNS_DEFAULT, limit: Limit = 50,
                offset: Offset = 0, kind: Annotated[str | None, Query(pattern="^(moved_up|near_next)$")] = None) -> JSONResponse:
        found = dashboard_growth.growth_entries(data_dir(), dashboard.resolve_rules(), _options(), runs)
        return _listed(request, user, "growing", found, dashboard_growth.GROWTH_KINDS, (kind, limit, offset))

    @router.get("/api/campaign.csv")
    def campaign(request: Request, user: User, within_days: Days = 30, runs: Runs = dashboard_growth.GROWING_RUNS_DEFAULT,
                 lists: Annotated[str, Query(pattern="^(at_risk|growing)(,(at_risk|growing))?$")] = "at_risk,growing",
                 ) -> Response:
        lookup = access.customer_lookup(request, user, EXPORT_ACTION)
        chosen = tuple(dict.fromkeys(lists.split(",")))
        rows, as_of = dashboard_campaign.campaign_rows(
            data_dir(), dashboard.resolve_rules(), _options(), chosen, within_days, runs
        )
        ids = list(dict.fromkeys(r["Customer ID"] for r in rows))
        lookup.record(EXPORT_ACTION, ids, total=len(ids))
        name = dashboard_campaign.file_name(as_of)
        return Response(
            dashboard_campaign.campaign_csv(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff"},
        )

    return router
