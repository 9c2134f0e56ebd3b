"""include/tier_sync/dashboard.py (the "Loyalty tiers" page's data) on hand-built data dirs.

The data dir is produced by the pipeline's own functions (OrderStore, compute_tiers, publish_run)
from a small store whose every tier and drop date is worked out by hand below, on a local folder
and on memory:// (object storage). A 200,000-customer master checks that responses stay small.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from include.tier_sync import dashboard, dashboard_cache, dashboard_master, fileio
from include.tier_sync.clv import compute_customer_metrics
from include.tier_sync.customer_access import mask_email
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import compute_tiers, publish_run
from include.tier_sync.runtime import iso
from include.tier_sync.store import CUSTOMERS, CUSTOMERS_SCHEMA, SALES, SALES_SCHEMA, OrderStore
from tests.unit.test_clv import AS_OF, DAY, RULES, customer, customers_df, sale, sales_df

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
HOUR = timedelta(hours=1)
DAY1 = AS_OF - DAY


def the_sales() -> pd.DataFrame:
    return sales_df(
        # c1: Evergreen by lifetime value.
        sale("s1", "c1", "2000.00", AS_OF - 100 * DAY),
        # c2 (loyalty): Sprout only by 3 purchases in the window; the 3rd newest is 20 days old,
        # so the tier drops (to Seed) once as_of passes AS_OF + 10 days.
        sale("s2a", "c2", "10.00", AS_OF - 5 * DAY),
        sale("s2b", "c2", "10.00", AS_OF - 12 * DAY),
        sale("s2c", "c2", "10.00", AS_OF - 20 * DAY),
        sale("s2d", "c2", "10.00", AS_OF - 200 * DAY),
        # A sale first rung up for c2, then moved to c5 before as_of: it is not c2's purchase.
        sale("s9", "c2", "10.00", AS_OF - 2 * DAY, version=1, updated_at=AS_OF - 2 * DAY),
        sale("s9", "c5", "10.00", AS_OF - 2 * DAY, version=2, updated_at=AS_OF - DAY - HOUR),
        # c3 (no loyalty): 4 purchases in the window, 3rd newest 25 days old -> drops after +5 days.
        sale("s3a", "c3", "5.00", AS_OF - 1 * DAY),
        sale("s3b", "c3", "5.00", AS_OF - 2 * DAY),
        sale("s3c", "c3", "5.00", AS_OF - 25 * DAY),
        sale("s3d", "c3", "5.00", AS_OF - 29 * DAY),
        # c4: Sprout by lifetime value (and 3 purchases): never at risk.
        sale("s4a", "c4", "100.00", AS_OF - 3 * DAY),
        sale("s4b", "c4", "100.00", AS_OF - 4 * DAY),
        sale("s4c", "c4", "100.00", AS_OF - 5 * DAY),
        # c5 (loyalty): Seed.
        sale("s5", "c5", "20.00", AS_OF - 50 * DAY),
        # c6: First Time Buyer on day 1, Sprout by value on day 2 (an upgrade).
        sale("s6a", "c6", "30.00", AS_OF - 100 * DAY),
        sale("s6b", "c6", "300.00", AS_OF - 12 * HOUR),
        # c8: Sprout on day 1 by 3 purchases; the oldest is 30.5 days before AS_OF, so it has left
        # the window on day 2: a downgrade to First Time Buyer.
        sale("s8a", "c8", "5.00", AS_OF - 2 * DAY),
        sale("s8b", "c8", "5.00", AS_OF - 3 * DAY),
        sale("s8c", "c8", "5.00", AS_OF - 30 * DAY - 12 * HOUR),
    )


def the_customers() -> pd.DataFrame:
    return customers_df(
        customer("c1", name="Ada Evergreen"),
        customer("c2", name="Bob Frequent", loyalty=True),
        customer("c3", name="Cy Frequent"),
        customer("c4", name="Di Big"),
        customer("c5", name="Ed Seed", loyalty=True),
        customer("c6", name="Flo Upgrade"),
        customer("c7", name="Gus Nobody"),
        customer("c8", name="Hal Downgrade"),
    )


def to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def identity(as_of: datetime) -> dict[str, Any]:
    return {"dag_id": "customer_tier_sync", "run_id": f"scheduled__{iso(as_of)}", "as_of": iso(as_of)}


SYNC_LOG = {
    "as_of": iso(AS_OF),
    "run_id": f"scheduled__{iso(AS_OF)}",
    "updated": 2,
    "protected": 1,
    "errors": 0,
    "unchanged": 4,
    "synced": True,
    "dry_run": False,
    "api": {"requests": 17, "rate_limited": 3, "retries": 3},
    "group_counts_match": False,
    "group_counts": {
        "Sprout": {"expected": 3, "actual": 2, "missing": 1, "unexpected": 0, "match": False},
        "Evergreen": {"expected": 1, "actual": 1, "missing": 0, "unexpected": 0, "match": True},
    },
    "circuit_breaker": {"tripped": False, "reasons": []},
}


def build_data_dir(url: str) -> str:
    """Two daily runs through the pipeline's own functions, plus a sync log and a validation result."""
    store = OrderStore(fileio.join(url, "store"))
    store.append(SALES, to_table(the_sales(), SALES_SCHEMA), cursor=100)
    store.append(CUSTOMERS, to_table(the_customers(), CUSTOMERS_SCHEMA), cursor=100)
    for as_of in (DAY1, AS_OF):
        paths = RunPaths(url, as_of)
        result = compute_tiers(store, paths, identity(as_of), RULES)
        fileio.write_json(paths.run_validation_json, {"summary": {"success": True, "run_key": paths.key}})
        publish_run(paths, identity(as_of), result["tier_breakdown"])
        fileio.write_json(paths.run_sync_log, {**SYNC_LOG, "as_of": iso(as_of), "updated": 5})
    fileio.write_json(fileio.join(url, "tier_sync_log.json"), SYNC_LOG)
    fileio.write_json(
        fileio.join(url, "validation", "latest.json"),
        {"summary": {"success": True, "evaluated": 14, "successful": 14, "failed": [], "row_count": 8}},
    )
    fileio.write_text(fileio.join(url, "validation", "data_docs", "index.html"), "<html>docs</html>")
    return url


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    dashboard.clear_cache()
    yield
    dashboard.clear_cache()


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_data_dir(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def memory_dir() -> Iterator[str]:
    url = f"memory://dashboard-{uuid.uuid4().hex}"
    build_data_dir(url)
    yield url
    fs, path = fileio.filesystem(url)
    fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory"])
def data_dir(request: pytest.FixtureRequest, local_dir: str, memory_dir: str) -> str:
    return local_dir if request.param == "local" else memory_dir


def master_rows(url: str) -> dict[str, dict[str, str]]:
    df = dashboard_cache.read_csv(fileio.join(url, "customer_analytics_master.csv"))
    return {r["Customer ID"]: r for r in df.to_dict("records")}


# -- summary, history, moves ---------------------------------------------------------------------------


def test_summary_matches_the_master_and_the_logs(data_dir: str) -> None:
    s = dashboard.summary(data_dir)
    tiers = {r["Customer ID"]: r["Tier"] for r in master_rows(data_dir).values()}
    assert tiers == {
        "c1": "Evergreen",
        "c2": "Sprout",
        "c3": "Sprout",
        "c4": "Sprout",
        "c5": "Seed",
        "c6": "Sprout",
        "c7": "None",
        "c8": "First Time Buyer",
    }
    assert s["has_data"] and s["total_customers"] == 8 and s["as_of"] == iso(AS_OF)
    dist = {d["tier"]: d["count"] for d in s["distribution"]}
    assert dist == {"Evergreen": 1, "Bloom": 0, "Sprout": 4, "Seed": 1, "First Time Buyer": 1, "None": 1}
    assert (
        next(d for d in s["distribution"] if d["tier"] == "Evergreen")["lifetime_value"]["dollars"]
        == "2000.00"
    )
    sync = s["sync"]
    assert (sync["updated"], sync["protected"], sync["errors"]) == (2, 1, 0)
    assert (sync["api_requests"], sync["rate_limited"], sync["group_counts_match"]) == (17, 3, False)
    assert [g["tier"] for g in sync["group_counts"]] == ["Evergreen", "Sprout"]  # best tier first
    assert s["validation"]["success"] is True and s["validation"]["data_docs"] is True


def test_history_has_one_point_per_run(data_dir: str) -> None:
    points = dashboard.history(data_dir)["points"]
    assert [p["as_of"] for p in points] == [iso(DAY1), iso(AS_OF)]
    assert points[1]["counts"]["Sprout"] == 4 and points[1]["total"] == 8
    assert points[0]["counts"]["Sprout"] == 4  # c2, c3, c4, c8 on day 1; c6 was First Time Buyer


def test_moves_count_upgrades_downgrades_and_new(data_dir: str) -> None:
    runs = dashboard.moves(data_dir)["runs"]
    assert [r["as_of"] for r in runs] == [iso(DAY1), iso(AS_OF)]
    first, second = runs
    assert first["new"] == 7 and first["upgrades"] == first["downgrades"] == 0  # c7 has no tier
    assert (second["upgrades"], second["downgrades"], second["new"]) == (1, 1, 0)
    assert second["top_transitions"] == {"First Time Buyer -> Sprout": 1, "Sprout -> First Time Buyer": 1}
    assert second["synced_updates"] == 5


def test_classify_move() -> None:
    assert dashboard.classify_move("", "Seed") == "new"
    assert dashboard.classify_move("Seed", "Bloom") == "upgrade"
    assert dashboard.classify_move("Bloom", "None") == "downgrade"
    assert dashboard.classify_move("Seed", "Seed") == "other"


# -- at risk ------------------------------------------------------------------------------------------


def test_at_risk_dates_are_exact(data_dir: str) -> None:
    r = dashboard.at_risk(data_dir, RULES)
    assert r["total"] == 2 and r["exact"] == 2
    c3, c2 = r["customers"]  # soonest first
    assert (c3["customer_id"], c3["drops_after"], c3["days_left"], c3["drops_to"]) == (
        "c3",
        iso(AS_OF + 5 * DAY),
        5,
        "First Time Buyer",
    )
    assert (c2["customer_id"], c2["drops_after"], c2["days_left"], c2["drops_to"]) == (
        "c2",
        iso(AS_OF + 10 * DAY),
        10,
        "Seed",
    )
    assert "email" not in c2 and c2["method"] == "exact"
    assert dashboard.at_risk(data_dir, RULES, within_days=7)["total"] == 1
    assert [c["customer_id"] for c in dashboard.at_risk(data_dir, RULES, limit=1, offset=1)["customers"]] == [
        "c2"
    ]


def test_at_risk_date_is_when_the_engine_really_drops_the_tier() -> None:
    """Re-run the engine at the predicted instant (still Sprout) and one second later (dropped)."""
    sales, custs = the_sales(), the_customers()
    for cid, drop in (("c3", AS_OF + 5 * DAY), ("c2", AS_OF + 10 * DAY)):
        at = compute_customer_metrics(sales, custs, drop, RULES).set_index("customer_id")
        after = compute_customer_metrics(sales, custs, drop + timedelta(seconds=1), RULES).set_index(
            "customer_id"
        )
        assert at.loc[cid, "tier"] == "Sprout"
        assert after.loc[cid, "tier"] == ("Seed" if cid == "c2" else "First Time Buyer")


def test_at_risk_without_a_store_is_approximated_from_last_order(tmp_path: Path, local_dir: str) -> None:
    for name in ("customer_analytics_master.csv", "latest.json"):
        fileio.copy(fileio.join(local_dir, name), str(tmp_path / name))
    r = dashboard.at_risk(str(tmp_path), RULES)
    assert r["total"] == 2 and r["exact"] == 0
    c2 = next(c for c in r["customers"] if c["customer_id"] == "c2")
    assert c2["method"] == "latest_possible" and c2["drops_after"] == iso(AS_OF + 25 * DAY)


# -- search -------------------------------------------------------------------------------------------


def test_search_by_email_code_and_id(data_dir: str) -> None:
    rows = master_rows(data_dir)
    c6 = rows["c6"]
    for query in (c6["Email"].upper(), f"  {c6['Customer Code']} ", "C6"):
        found = dashboard.search(data_dir, query, rules=RULES)
        assert found["match"] == "exact" and found["total"] == 1, query
        hit = found["customers"][0]
        assert (hit["customer_id"], hit["tier"], hit["lifetime_value"]["dollars"]) == (
            "c6",
            "Sprout",
            "330.00",
        )
        assert [(h["as_of"], h["from"], h["to"], h["kind"]) for h in hit["tier_history"]] == [
            (iso(DAY1), None, "First Time Buyer", "new"),
            (iso(AS_OF), "First Time Buyer", "Sprout", "upgrade"),
        ]
        assert hit["at_risk"] is None
    c2 = dashboard.search(data_dir, "c2", rules=RULES)["customers"][0]
    assert c2["at_risk"]["drops_after"] == iso(AS_OF + 10 * DAY)


def test_search_prefix_short_and_missing(data_dir: str) -> None:
    assert dashboard.search(data_dir, "x")["total"] == 0  # too short to search
    assert dashboard.search(data_dir, "no-such-customer")["match"] == "none"
    rows = master_rows(data_dir)
    code = rows["c1"]["Customer Code"]
    prefix = dashboard.search(data_dir, code[:-1])
    assert prefix["match"] == "prefix" and "c1" in [c["customer_id"] for c in prefix["customers"]]
    # Search lists candidates: every email masked, exact hit or not; the full one is the detail's.
    for found in (prefix, dashboard.search(data_dir, code)):
        for c in found["customers"]:
            full = rows[c["customer_id"]]["Email"]
            assert c["email"] == mask_email(full) and (c["email"] != full or not full)


def test_customer_detail(data_dir: str) -> None:
    c8 = dashboard.customer(data_dir, "c8", RULES)
    assert c8 is not None and c8["tier"] == "First Time Buyer" and c8["previous_tier"] == "Sprout"
    assert c8["email"] == master_rows(data_dir)["c8"]["Email"]  # the customer's own view: in full
    assert c8["tier_history"][-1]["kind"] == "downgrade"
    assert dashboard.customer(data_dir, "nope", RULES) is None


def test_customer_detail_explains_the_tier_from_the_store(data_dir: str) -> None:
    """The explanation agrees with the CSV's tier and figures for every customer on the page."""
    rows = master_rows(data_dir)
    for cid, row in rows.items():
        found = dashboard.customer(data_dir, cid, RULES)
        assert found is not None
        why = found["explanation"]
        assert why is not None and why["because"]["tier"] == row["Tier"], cid
        assert why["because"]["purchases_in_window"] == int(row["Purchases Last 30 Days"]), cid
        for step in why["next_up"]:
            assert step["text"] and step["tier"] != row["Tier"]


# -- empty state, Data Docs, cache -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_empty_data_dir(kind: str, tmp_path: Path) -> None:
    url = str(tmp_path / "nothing") if kind == "local" else f"memory://empty-{uuid.uuid4().hex}"
    s = dashboard.summary(url)
    assert (
        s["has_data"] is False and s["distribution"] == [] and s["sync"] is None and s["validation"] is None
    )
    assert dashboard.history(url)["points"] == []
    assert dashboard.moves(url)["runs"] == []
    assert dashboard.at_risk(url)["total"] == 0
    assert dashboard.search(url, "someone")["total"] == 0
    assert dashboard.customer(url, "c1") is None
    assert dashboard.data_docs_file(url, "index.html") is None


def test_data_docs_are_served_and_confined(data_dir: str) -> None:
    found = dashboard.data_docs_file(data_dir, "index.html")
    assert found == (b"<html>docs</html>", "text/html")
    for bad in ("../latest.json", "../../tier_sync_log.json", "/../latest.json", "static/../../latest.json"):
        assert dashboard.data_docs_file(data_dir, bad) is None, bad


def test_master_is_parsed_once_per_file_version(tmp_path: Path, local_dir: str) -> None:
    for name in ("customer_analytics_master.csv", "latest.json"):
        fileio.copy(fileio.join(local_dir, name), str(tmp_path / name))
    first = dashboard.load_master(str(tmp_path))
    assert dashboard.load_master(str(tmp_path)) is first
    text = (tmp_path / "customer_analytics_master.csv").read_text()
    (tmp_path / "customer_analytics_master.csv").write_text(text.replace("Ada Evergreen", "Ada Evergreen2"))
    second = dashboard.load_master(str(tmp_path))
    assert second is not None and second is not first and "Ada Evergreen2" in second.df["Name"].tolist()


def test_data_dir_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", "memory://somewhere")
    assert dashboard.resolve_data_dir() == "memory://somewhere"
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_RULES", json.dumps({"window_days": 14}))
    assert dashboard.resolve_rules().window_days == 14


# -- 200,000 customers ------------------------------------------------------------------------------------


def big_master(n: int, as_of: datetime) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    tiers = np.array(["Evergreen", "Bloom", "Sprout", "Seed", "First Time Buyer", "None"])
    tier = tiers[rng.integers(0, 6, n)]
    ltv = rng.integers(0, 300_000, n)
    p30 = rng.integers(0, 6, n)
    at_risk = tier == "Sprout"
    ltv[at_risk & (rng.random(n) < 0.5)] = 12_345  # half the Sprouts are there by purchases
    ids = np.array([f"{uuid.UUID(int=i)}" for i in range(n)])
    last = pd.Timestamp(as_of) - pd.to_timedelta(rng.integers(0, 30 * 86400, n), unit="s")
    return pd.DataFrame(
        {
            "Customer ID": ids,
            "Customer Code": [f"CODE-{i:06d}" for i in range(n)],
            "Name": [f"Customer {i}" for i in range(n)],
            "Email": [f"customer{i}@example.org" for i in range(n)],
            "Phone": "",
            "Lifetime Value": [f"{v // 100}.{v % 100:02d}" for v in ltv],
            "Order Count": "3",
            "Avg Order Value": "1.00",
            "First Order": "2025-01-01T00:00:00Z",
            "Last Order": last.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Days Since Last Order": "1",
            "Purchases Last 30 Days": p30.astype(str),
            "Loyalty Member": np.where(rng.random(n) < 0.5, "true", "false"),
            "Tier": tier,
            "Previous Tier": "",
            "Tier Changed At": "",
            "Last Updated": iso(as_of),
        }
    )


@pytest.mark.slow
def test_200k_customers_are_served_in_bounded_responses(tmp_path: Path) -> None:
    n = 200_000
    df = big_master(n, AS_OF)
    df.to_csv(tmp_path / "customer_analytics_master.csv", index=False)
    (tmp_path / "latest.json").write_text(json.dumps({"as_of": iso(AS_OF), "run_id": "big"}))
    started = time.monotonic()
    s = dashboard.summary(str(tmp_path))
    first = time.monotonic() - started
    assert s["total_customers"] == n
    risk = dashboard.at_risk(str(tmp_path), RULES, limit=50)
    expected = int(
        (
            (df["Tier"] == "Sprout")
            & (pd.to_numeric(df["Lifetime Value"]) < 250)
            & (df["Purchases Last 30 Days"].astype(int) >= 3)
        ).sum()
    )
    assert risk["total"] == expected > 5_000 and len(risk["customers"]) == 50
    started = time.monotonic()
    again = dashboard.summary(str(tmp_path))
    risk_again = dashboard.at_risk(str(tmp_path), RULES, limit=50, offset=50)
    found = dashboard.search(str(tmp_path), "CUSTOMER123456@example.org")
    cached = time.monotonic() - started
    assert found["total"] == 1 and found["customers"][0]["customer_code"] == "CODE-123456"
    prefix = dashboard.search(str(tmp_path), "code-1")
    assert prefix["total"] == 100_000 and len(prefix["customers"]) == 10
    for payload in (
        again,
        risk_again,
        found,
        prefix,
        dashboard.history(str(tmp_path)),
        dashboard.moves(str(tmp_path)),
    ):
        assert len(json.dumps(payload)) < 64_000
    assert first < 30, f"first summary took {first:.1f} s"
    assert cached < 5, f"cached calls took {cached:.1f} s"


# -- the FastAPI app (routing and validation; Airflow's auth is covered by the integration test) -----------


def test_plugin_app_endpoints(local_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    sys.modules.pop("loyalty_tiers.app", None)
    import loyalty_tiers.app as app_module  # type: ignore[import-not-found]
    from loyalty_tiers.app import app, require_user  # type: ignore[import-not-found]

    # The auth manager and the audit log are Airflow's (tests/integration/test_ui_plugin.py runs
    # them for real); here a stand-in grants or refuses the customer permission and keeps the rows.
    audited: list[tuple[str, list[str]]] = []
    allowed = {"customers": True}

    class Lookup:
        def record(self, action: str, ids: list[str], total: int | None = None) -> None:
            audited.append((action, ids))

    def lookup(request: Any, user: Any, action: str) -> Lookup:
        if not allowed["customers"]:
            from fastapi import HTTPException

            raise HTTPException(status_code=403, detail="no")
        return Lookup()

    monkeypatch.setattr(app_module, "customer_lookup", lookup)
    monkeypatch.setattr(app_module, "permitted_lookup", lookup)
    monkeypatch.setattr(app_module, "can_view_customers", lambda user: allowed["customers"])
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", local_dir)
    app.dependency_overrides[require_user] = lambda: {"name": "test"}
    try:
        client = TestClient(app)
        assert client.get("/api/summary").json()["total_customers"] == 8
        assert client.get("/api/summary").json()["access"]["customers"] is True
        assert client.get("/api/at-risk", params={"limit": 1}).json()["customers"][0]["customer_id"] == "c3"
        assert audited == [("at_risk", ["c3"])]
        assert client.get("/api/at-risk", params={"limit": 100_000}).status_code == 422
        assert client.get("/api/search", params={"q": "c6"}).json()["customers"][0]["tier"] == "Sprout"
        assert client.get("/api/customers/c8").json()["tier"] == "First Time Buyer"
        assert client.get("/api/customers/nope").status_code == 404
        assert audited[1:] == [("search", ["c6"]), ("customer", ["c8"]), ("customer", [])]
        # Without the permission: the counts stay, the names go, search and detail are refused.
        allowed["customers"] = False
        risk = client.get("/api/at-risk").json()
        assert risk["total"] == 2 and risk["customers"] == [] and risk["customers_visible"] is False
        assert client.get("/api/summary").json()["access"]["customers"] is False
        assert client.get("/api/search", params={"q": "c6"}).status_code == 403
        assert client.get("/api/customers/c8").status_code == 403
        assert len(audited) == 4
        assert client.get("/api/history").json()["points"][-1]["as_of"] == iso(AS_OF)
        assert len(client.get("/api/moves").json()["runs"]) == 2
        assert client.get("/data-docs/index.html").text == "<html>docs</html>"
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/static/../app.py").status_code == 404
        assert client.get("/api/summary").headers["cache-control"] == "no-store"
    finally:
        app.dependency_overrides.clear()


def test_concurrent_requests_parse_the_master_once(
    tmp_path: Path, local_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    for name in ("customer_analytics_master.csv", "latest.json"):
        fileio.copy(fileio.join(local_dir, name), str(tmp_path / name))
    calls = []
    real = dashboard_master.read_csv

    def slow_read(url: str, usecols: list[str] | None = None) -> Any:
        calls.append(url)
        time.sleep(0.3)
        return real(url, usecols)

    monkeypatch.setattr(dashboard_master, "read_csv", slow_read)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(dashboard.load_master(str(tmp_path))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1
    dashboard.warm_up(str(tmp_path), RULES)  # no store: approximated, and never raises
    assert dashboard.at_risk(str(tmp_path), RULES)["total"] == 2
