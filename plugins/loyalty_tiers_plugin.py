"""Airflow 3 plugin: the "Loyalty tiers" page of customer-tier-sync in the Airflow UI.

`fastapi_apps` mounts the dashboard's FastAPI app on the api-server under /loyalty-tiers (every
route there requires Airflow's own login); `external_views` adds "Loyalty tiers" to the UI's
navigation, shown inside the UI at /plugin/loyalty-tiers, and a "Tier sync" tab on every DAG run
(destination `dag_run`: the UI fills in `{DAG_ID}` / `{RUN_ID}` and shows the href in an iframe at
/dags/<dag>/runs/<run>/plugin/tier-sync-run). Airflow 3.3 shows a `dag_run` view on the runs of
every DAG (it cannot be limited to one), so the tab says so on another DAG's run. Module-level
imports stay light (no pandas): this file is imported wherever Airflow loads plugins.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from loyalty_tiers.app import URL_PREFIX, app

RUN_TAB_HREF = f"{URL_PREFIX}/run?dag_id={{DAG_ID}}&run_id={{RUN_ID}}"


class LoyaltyTiersPlugin(AirflowPlugin):
    name = "loyalty_tiers"
    fastapi_apps = [
        {"app": app, "url_prefix": URL_PREFIX, "name": "Loyalty tiers"},
    ]
    external_views = [
        {
            "name": "Loyalty tiers",
            "href": f"{URL_PREFIX}/",
            "url_route": "loyalty-tiers",
            "destination": "nav",
            "icon": f"{URL_PREFIX}/static/icon.svg",
        },
        {
            "name": "Tier sync",
            "href": RUN_TAB_HREF,
            "url_route": "tier-sync-run",
            "destination": "dag_run",
            "icon": f"{URL_PREFIX}/static/icon.svg",
        },
    ]
