"""The "Loyalty tiers" FastAPI app, mounted by the api-server under /loyalty-tiers.

Every route requires Airflow's own authentication: the same JWT the Airflow UI uses (its `_token`
cookie, which the browser sends to this same-origin iframe) or an `Authorization: Bearer` token
from `POST /auth/token`, resolved by Airflow's `get_user` and checked with the auth manager's
`is_authorized_view(WEBSITE)` - exactly what `requires_access_view(AccessView.WEBSITE)` does. The
Airflow modules are imported inside the dependency so that loading the plugin stays cheap in
processes that never serve it.

Aggregates also need read access to the DAG; per-customer data (search, one customer, names in
the at-risk list) needs its edit permission, and every such request is audited and rate-limited
per user (access.py; the policy in include/tier_sync/customer_access.py).

The app only reads files the pipeline wrote (include/tier_sync/dashboard.py) and returns
aggregates, a page of a list, or search hits - never the whole master CSV.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from include.tier_sync import dashboard, dashboard_run
from include.tier_sync.customer_access import DENIED_MESSAGE, PERMISSION
from loyalty_tiers.access import (
    CustomerLookup,
    can_read_dag,
    can_view_customers,
    customer_lookup,
    permitted_lookup,
)
from loyalty_tiers.growth_routes import build_router as build_growth_router

log = logging.getLogger(__name__)

URL_PREFIX = "/loyalty-tiers"
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "app.js": "text/javascript",
    "customer.js": "text/javascript",
    "run.js": "text/javascript",
    "growth.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}

_bearer = HTTPBearer(auto_error=False)


async def require_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Any:
    """Airflow's authenticated user (401 without a valid token, 403 without access to the UI)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import get_user

    user = await get_user(request=request, _oauth_token=None, bearer_credentials=credentials)
    if not get_auth_manager().is_authorized_view(access_view=AccessView.WEBSITE, user=user):
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Forbidden")
    if not can_read_dag(user):
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="The page needs read access to the DAG")
    return user


User = Annotated[Any, Depends(require_user)]


def _search_lookup(request: Request, user: User) -> CustomerLookup:
    return customer_lookup(request, user, "search")


def _detail_lookup(request: Request, user: User) -> CustomerLookup:
    return customer_lookup(request, user, "customer")


# Data Docs are HTML that Great Expectations rendered from customer data, served on the Airflow
# origin: a sandbox without allow-scripts / allow-same-origin gives them an opaque origin and runs
# none of their scripts, so nothing in them can act with the viewer's Airflow session. The cost:
# GX's own scripts and CDN assets (Bootstrap, jQuery, Vega charts, Font Awesome) do not load, so
# the pages render plain (tables and text, no collapsible sections or charts).
DATA_DOCS_CSP = (
    "sandbox; default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
DATA_DOCS_HEADERS = {
    "Content-Security-Policy": DATA_DOCS_CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _data_dir(headers: dict[str, str] | None = None) -> str:
    """The validated data dir; a refused `tier_sync_data_dir` is a 500 that says why (never read)."""
    try:
        return dashboard.resolve_data_dir()
    except ValueError as exc:  # the message names the Variable and the problem, never the value
        log.error("Loyalty tiers: %s", exc)
        raise HTTPException(status_code=500, detail=str(exc), headers=headers) from exc


def _json(payload: Any) -> JSONResponse:
    # Aggregates change with every run; never let a browser or proxy keep customer data around.
    return JSONResponse(payload, headers={"Cache-Control": "no-store"})


app = FastAPI(
    title="Loyalty tiers",
    description="customer-tier-sync dashboard: tiers, moves, sync, data quality, at-risk customers.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    """The page. Without a valid session, send the browser to Airflow's login and back."""
    if not request.url.path.endswith("/"):  # the page's asset and API URLs are relative
        return RedirectResponse(request.url.replace(path=request.url.path + "/"), status_code=307)
    return await _page(request, "index.html")


@app.get("/run", include_in_schema=False)
async def run_page(request: Request) -> Response:
    """A DAG run's "Tier sync" tab (the plugin's dag_run external view: ?dag_id=..&run_id=..)."""
    return await _page(request, "run.html")


async def _page(request: Request, name: str) -> Response:
    try:
        await require_user(request, await _bearer(request))
    except HTTPException as exc:
        if exc.status_code == status.HTTP_403_FORBIDDEN:
            raise
        from airflow.api_fastapi.app import get_auth_manager

        login = get_auth_manager().get_url_login()
        sep = "&" if "?" in login else "?"
        return RedirectResponse(f"{login}{sep}next={quote(str(request.url), safe='')}", status_code=307)
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers={"Cache-Control": "no-store"})


@app.get("/static/{name}", include_in_schema=False)
def static_file(name: str, _user: User) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail="Not found")
    return FileResponse(STATIC_DIR / name, media_type=media_type)


_warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loyalty-tiers-warm-up")


@app.get("/api/summary")
def api_summary(user: User) -> JSONResponse:
    data_dir = _data_dir()
    payload = dashboard.summary(data_dir)
    allowed = can_view_customers(user)
    payload["access"] = {
        "customers": allowed,
        "permission": PERMISSION,
        "message": None if allowed else DENIED_MESSAGE,
    }
    if payload["has_master"]:
        # The at-risk dates read the order store (seconds at 200k customers): start them now, in
        # the background, while the browser renders the summary; later calls hit the cache.
        _warmer.submit(dashboard.warm_up, data_dir, dashboard.resolve_rules())
    return _json(payload)


@app.get("/api/history")
def api_history(_user: User, limit: Annotated[int, Query(ge=1, le=5000)] = 400) -> JSONResponse:
    return _json(dashboard.history(_data_dir(), limit=limit))


@app.get("/api/moves")
def api_moves(_user: User, limit: Annotated[int, Query(ge=1, le=1000)] = 60) -> JSONResponse:
    return _json(dashboard.moves(_data_dir(), limit=limit))


@app.get("/api/at-risk")
def api_at_risk(
    request: Request,
    user: User,
    within_days: Annotated[int, Query(ge=0, le=3650)] = 30,
    limit: Annotated[int, Query(ge=1, le=dashboard.MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JSONResponse:
    """The counts for everyone who may read the DAG; the names only with the customer permission
    (a lookup of the customers on this page: audited and counted)."""
    lookup = permitted_lookup(request, user, "at_risk") if can_view_customers(user) else None
    payload = dashboard.at_risk(
        _data_dir(), dashboard.resolve_rules(), within_days=within_days, limit=limit, offset=offset
    )
    payload["customers_visible"] = lookup is not None
    if lookup is None:
        payload["customers"] = []
    elif payload["customers"]:
        lookup.record("at_risk", [c["customer_id"] for c in payload["customers"]])
    return _json(payload)


@app.get("/api/search")
def api_search(
    lookup: Annotated[CustomerLookup, Depends(_search_lookup)],
    q: Annotated[str, Query(max_length=200)] = "",
    limit: Annotated[int, Query(ge=1, le=dashboard.MAX_SEARCH)] = 10,
) -> JSONResponse:
    """Candidates, emails masked: the full record is the customer's own view (/api/customers/{id})."""
    found = dashboard.search(_data_dir(), q, limit=limit, rules=dashboard.resolve_rules())
    lookup.record("search", [c["customer_id"] for c in found["customers"]], total=found["total"])
    return _json(found)


@app.get("/api/customers/{customer_id}")
def api_customer(customer_id: str, lookup: Annotated[CustomerLookup, Depends(_detail_lookup)]) -> JSONResponse:
    found = dashboard.customer(_data_dir(), customer_id, rules=dashboard.resolve_rules())
    lookup.record("customer", [customer_id] if found is not None else [], total=0 if found is None else 1)
    if found is None:
        raise HTTPException(status_code=404, detail="No such customer in the latest master CSV")
    return _json(found)


def _sales_lookup(request: Request, user: User) -> CustomerLookup:
    return customer_lookup(request, user, "customer_sales")


@app.get("/api/customers/{customer_id}/sales")
def api_customer_sales(
    customer_id: str,
    lookup: Annotated[CustomerLookup, Depends(_sales_lookup)],
    counting: bool = True,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=dashboard.MAX_PAGE)] = 25,
) -> JSONResponse:
    """One page of the customer's sales that count (or, counting=false, that do not, and why)."""
    from include.tier_sync.dashboard_customer import SalesUnavailable, sales

    try:
        found = sales(_data_dir(), customer_id, dashboard.resolve_rules(), counting=counting, page=page,
                      per_page=per_page)
    except SalesUnavailable as exc:
        lookup.record("customer_sales", [])
        raise HTTPException(status_code=503, detail=f"The customer's sales cannot be listed: {exc}") from exc
    lookup.record("customer_sales", [customer_id] if found is not None else [], total=0 if found is None else 1)
    if found is None:
        raise HTTPException(status_code=404, detail="No such customer in the latest master CSV")
    return _json(found)


def _dag_run_as_of(dag_id: str, run_id: str) -> Any:
    """The run's as_of by the tasks' own rule (runtime.resolve_as_of), from Airflow's DagRun;
    None when the metadata DB does not know the run (e.g. `airflow db clean` removed it)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from include.tier_sync.runtime import resolve_as_of

    with create_session(scoped=False) as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is None:
            return None
        interval = {"data_interval_start": run.data_interval_start, "data_interval_end": run.data_interval_end}
        return resolve_as_of({**interval, "dag_run": run})


@app.get("/api/runs/{run_id:path}")
def api_run(run_id: str, _user: User, dag_id: Annotated[str, Query(max_length=250)] = "") -> JSONResponse:
    """One DAG run's plan, moves, sync log, validation and approval (include/tier_sync/dashboard_run.py)."""
    dag_id = dag_id or dashboard_run.DAG_ID
    if dag_id != dashboard_run.DAG_ID:  # another DAG's run: say so, read nothing
        return _json(dashboard_run.run_view("", dag_id, run_id))
    return _json(dashboard_run.run_view(_data_dir(), dag_id, run_id, _dag_run_as_of(dag_id, run_id)))


@app.get("/data-docs/{path:path}", include_in_schema=False)
def data_docs(path: str, _user: User) -> Response:
    """The Great Expectations Data Docs site, served from the data dir (local or object storage),
    every response sandboxed (DATA_DOCS_HEADERS)."""
    data_dir = _data_dir(DATA_DOCS_HEADERS)
    try:
        found = dashboard.data_docs_file(data_dir, path or "index.html")
    except Exception as exc:  # unreadable storage: still a sandboxed response, the cause in the log
        log.exception("Loyalty tiers: reading a Data Docs file failed")
        raise HTTPException(
            status_code=500,
            detail=f"Reading the Data Docs file failed ({type(exc).__name__}); see the api-server log",
            headers=DATA_DOCS_HEADERS,
        ) from exc
    if found is None:
        raise HTTPException(status_code=404, detail="Data Docs file not found", headers=DATA_DOCS_HEADERS)
    body, media_type = found
    return Response(body, media_type=media_type, headers=DATA_DOCS_HEADERS)


# "At risk, in full", "Growing" and their campaign CSV (issue 18): routes of their own module.
app.include_router(build_growth_router(require_user, _data_dir))
