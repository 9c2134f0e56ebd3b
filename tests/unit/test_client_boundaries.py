"""The client at its boundaries (issue 13): what a 2xx must look like, what the token may hold, where it
may travel, how long one request may take, and how far a misbehaving feed may lead it.

Most tests run over real HTTP against the X-Series simulator; the envelope matrix and the requests
exception wrapping use requests_mock, so they need no server and never sleep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from include.tier_sync.extract import extract_orders
from include.tier_sync.lightspeed import (
    LightspeedAuthError,
    LightspeedClient,
    LightspeedConfigError,
    LightspeedError,
    LightspeedFeedError,
    LightspeedNotFound,
    LightspeedProtocolError,
    LightspeedTimeout,
    LightspeedUnavailable,
)
from include.tier_sync.lightspeed_http import ApiStats
from include.tier_sync.store import OrderStore
from tests.unit.fakes import FakeTime

if TYPE_CHECKING:
    import requests_mock as rm

sim_pkg = pytest.importorskip("tools.lightspeed_sim")
sim_testing = pytest.importorskip("tools.lightspeed_sim.testing")
running_simulator, clock_after = sim_testing.running_simulator, sim_testing.clock_after

pytestmark = pytest.mark.unit

TOKEN = "t0ken-for-tests"
NOW = datetime(2026, 11, 25, 2, tzinfo=UTC)
BASE = "https://acme.retail.lightspeed.app/api/2.0"
GATEWAY_200 = {"error": "Service Unavailable"}  # what the misbehaving gateway answers, with a 200


@pytest.fixture(scope="module")
def demo_store_json() -> str:
    return str(sim_pkg.generate_demo_store(seed=42, customers=120, now=NOW).dumps())


@pytest.fixture
def sim(demo_store_json: str) -> Iterator[Any]:
    with running_simulator(
        store=sim_pkg.SimStore.loads(demo_store_json), clock=clock_after(NOW), token=TOKEN, page_cap=20
    ) as server:
        yield server


def make_client(sim: Any, **kwargs: Any) -> LightspeedClient:
    kwargs.setdefault("backoff_base", 0.01)  # real sleeps, kept tiny
    kwargs.setdefault("timeout", 5.0)
    return LightspeedClient(sim.base_url, kwargs.pop("token", sim.token), **{**sim.CLIENT_OPTIONS, **kwargs})


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything chained to it (what a traceback or an error tracker would show)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def statuses(sim: Any, path: str) -> list[int]:
    return [r.status for r in sim.requests if r.path == f"/api/2.0{path}"]


# -- a 2xx that is not the envelope: retried like a 5xx, never "the end" ------------------------------


def test_200_without_data_on_a_feed_page_is_retried_then_the_feed_is_read_to_the_end(sim: Any) -> None:
    sim.faults.add("status", method="GET", path=r"^/sales$", status=200, body=GATEWAY_200, skip=1, times=2)
    client = make_client(sim)
    pages = list(client.iter_sales())
    assert {s["id"] for page in pages for s in page.data} == set(sim.store.sales)  # nothing lost
    assert client.stats.retries == 2
    assert client.stats.requests == len(pages) + 1 + 2  # every page, the empty end, the two bad answers


def test_persistent_200_without_data_fails_clearly_and_the_store_keeps_only_the_good_pages(
    sim: Any, tmp_path: Path
) -> None:
    sim.faults.add("status", method="GET", path=r"^/sales$", status=200, body=GATEWAY_200, skip=2)
    store = OrderStore(tmp_path / "store")
    client = make_client(sim, max_retries=2)
    with pytest.raises(LightspeedProtocolError) as info:
        extract_orders(client, store)
    exc = info.value
    assert isinstance(exc, LightspeedUnavailable)  # the transient family: a task retry may help
    assert (exc.method, exc.path, exc.status) == ("GET", "/sales", 200)
    message = str(exc)
    assert "GET /sales" in message and "200" in message and "`data`" in message
    assert "'lightspeed_default'" in message and "after 2 retries" in message
    assert "Service Unavailable" not in message  # the body's content is never echoed
    assert client.stats.requests == 2 + 3  # two good pages, then 1 + max_retries bad answers
    # The two good pages (20 sales each) are committed with their cursor; nothing past them.
    by_version = sorted(sim.store.sales.values(), key=lambda s: int(s["version"]))
    assert store.cursor("sales") == int(by_version[39]["version"])
    assert set(store.read("sales")["id"]) == {s["id"] for s in by_version[:40]}
    assert store.cursor("customers") == 0


def test_group_listing_200_without_data_is_retried_and_fails_when_it_persists(sim: Any) -> None:
    live = {g["name"] for g in sim.store.groups.values() if not g.get("deleted_at")}
    fault = sim.faults.add(
        "status", method="GET", path=r"^/customer_groups$", status=200, body=GATEWAY_200, times=1
    )
    client = make_client(sim, max_retries=2)
    assert {g["name"] for g in client.list_customer_groups()} == live
    assert fault.fired == 1 and client.stats.retries == 1

    sim.faults.add("status", method="GET", path=r"^/customer_groups$", status=200, body=GATEWAY_200)
    with pytest.raises(
        LightspeedProtocolError, match=r"GET /customer_groups -> 200 but the page has no `data`"
    ):
        client.list_customer_groups()


def test_group_members_listing_200_without_data_fails_instead_of_an_empty_group(sim: Any) -> None:
    bloom = next(g["id"] for g in sim.store.groups.values() if g["name"] == "GreenHaus Crew - Bloom")
    assert any(c.get("customer_group_id") == bloom for c in sim.store.customers.values())
    sim.faults.add("status", method="GET", path=r"/customers$", status=200, body=GATEWAY_200)
    with pytest.raises(LightspeedProtocolError) as info:
        make_client(sim, max_retries=1).list_group_members(bloom)
    assert info.value.path == f"/customer_groups/{bloom}/customers"


def test_membership_call_answered_200_with_an_error_object_is_not_success(sim: Any) -> None:
    bloom = next(g["id"] for g in sim.store.groups.values() if g["name"] == "GreenHaus Crew - Bloom")
    someone = next(c for c, v in sim.store.customers.items() if not v.get("deleted_at"))
    members = rf"^/customer_groups/{bloom}/customers$"
    sim.faults.add("status", method="POST", path=members, status=200, body=GATEWAY_200, times=1)
    client = make_client(sim, max_retries=2)
    client.add_customers_to_group(bloom, [someone])  # the bad answer was retried; the re-send landed
    assert sim.store.customers[someone]["customer_group_id"] == bloom
    assert statuses(sim, f"/customer_groups/{bloom}/customers") == [200, 201]

    sim.faults.add("status", method="POST", path=members, status=200, body=GATEWAY_200)
    with pytest.raises(LightspeedProtocolError, match="not an acknowledgement"):
        client.add_customers_to_group(bloom, [someone])


def test_single_customer_answered_200_with_an_error_object_is_not_a_customer(sim: Any) -> None:
    someone = next(iter(sim.store.customers))
    sim.faults.add("status", method="GET", path=rf"^/customers/{someone}$", status=200, body=GATEWAY_200)
    with pytest.raises(LightspeedProtocolError, match="neither `data` nor a record `id`"):
        make_client(sim, max_retries=1).get_customer(someone)


@pytest.mark.parametrize(
    ("response", "problem"),
    [
        ({"json": {"error": "Service Unavailable", "email": "mia@example.org"}}, "the page has no `data`"),
        ({"json": ["mia@example.org"]}, "the body is a JSON array, not a page object"),
        ({"json": {"data": None}}, "`data` is empty or null, not a list"),
        ({"json": {"data": {"id": "mia@example.org"}}}, "`data` is a JSON object, not a list"),
        ({"json": {"data": ["mia@example.org"]}}, "`data` item 0 is a JSON string, not a record"),
        ({"json": {"data": [{"id": "a", "version": 5}], "version": "mia"}}, "`version` is a JSON string"),
        ({"json": {"data": [{"id": "a"}], "version": {"max": None}}}, "carries no version"),
        ({"text": "<html>mia@example.org</html>"}, "the body is not JSON"),
        ({"text": ""}, "the body is empty or null"),
    ],
)
def test_every_non_page_2xx_is_a_protocol_error_after_bounded_retries(
    requests_mock: rm.Mocker, response: dict[str, Any], problem: str
) -> None:
    fake_time = FakeTime()
    client = LightspeedClient(BASE, TOKEN, max_retries=2, sleep=fake_time.sleep, clock=fake_time.clock)
    requests_mock.get(f"{BASE}/sales", **response)
    with pytest.raises(LightspeedProtocolError) as info:
        list(client.iter_sales())
    assert problem in str(info.value)
    assert "mia@example.org" not in str(info.value)
    assert requests_mock.call_count == 3 and len(fake_time.sleeps) == 2  # backoff like a 5xx
    assert info.value.status == 200
    # An explicit empty page still ends the feed, whatever its `version` says.
    requests_mock.get(f"{BASE}/sales", json={"data": [], "version": "not read on the last page"})
    assert list(client.iter_sales()) == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"data": {"id": "c2"}}, "not the one asked for"),
        ({"data": {"name": "no id"}}, "the record has no `id`"),
        ({"data": "c1"}, "`data` is a JSON string, not a record"),
        (True, "the body is JSON true, not an object"),
    ],
)
def test_a_single_record_must_be_the_record_asked_for(
    requests_mock: rm.Mocker, body: Any, problem: str
) -> None:
    fake_time = FakeTime()
    client = LightspeedClient(BASE, TOKEN, max_retries=1, sleep=fake_time.sleep, clock=fake_time.clock)
    requests_mock.get(f"{BASE}/customers/c1", json=body)
    with pytest.raises(LightspeedProtocolError, match=problem):
        client.get_customer("c1")
    requests_mock.get(f"{BASE}/customers/c1", json={"id": "c1", "version": 3})  # a bare record is tolerated
    assert client.get_customer("c1") == {"id": "c1", "version": 3}


# -- the token: stripped, refused when it cannot be sent; never in a message -------------------------


def test_a_token_with_a_trailing_newline_works(sim: Any) -> None:
    client = make_client(sim, token=f"  {TOKEN}\r\n")
    assert client.list_customer_groups()
    assert set(statuses(sim, "/customer_groups")) == {200}  # the server took the stripped token


@pytest.mark.parametrize("inner", ["\n", "\r\n", " ", "\t", "\x00", "\x7f", "\u00e9", "\u2019"])
def test_a_token_with_whitespace_or_control_characters_inside_is_refused(sim: Any, inner: str) -> None:
    secret = f"lsxs_pt_FIRSTHALF{inner}SECONDHALF"
    with pytest.raises(LightspeedAuthError) as info:
        make_client(sim, token=secret, conn_id="lightspeed_shop2")
    assert "'lightspeed_shop2'" in str(info.value)
    for exc in chain(info.value):
        for text in (str(exc), repr(exc)):
            assert "FIRSTHALF" not in text and "SECONDHALF" not in text
    assert sim.requests == []  # refused before anything was sent


@pytest.mark.parametrize("token", ["   ", "\n", "\t\r\n"])
def test_an_empty_token_is_refused(token: str) -> None:
    with pytest.raises(LightspeedAuthError, match="'lightspeed_default' has no token"):
        LightspeedClient(BASE, token)


def test_a_requests_exception_never_carries_the_token_out(requests_mock: rm.Mocker) -> None:
    # Cannot happen after the token check, but if requests ever refuses a header it echoes its value.
    leak = requests.exceptions.InvalidHeader(f"Invalid return character in header value: 'Bearer {TOKEN}'")
    requests_mock.get(f"{BASE}/customers/c1", exc=leak)
    client = LightspeedClient(BASE, TOKEN)
    with pytest.raises(LightspeedConfigError) as info:
        client.get_customer("c1")
    assert (info.value.method, info.value.path) == ("GET", "/customers/c1")
    assert "InvalidHeader" in str(info.value) and requests_mock.call_count == 1  # not re-sent
    for exc in chain(info.value):
        assert TOKEN not in str(exc) and TOKEN not in repr(exc)


def test_errors_carry_method_path_and_status_but_no_query_string(requests_mock: rm.Mocker) -> None:
    fake_time = FakeTime()
    client = LightspeedClient(BASE, TOKEN, max_retries=1, sleep=fake_time.sleep, clock=fake_time.clock)
    requests_mock.get(f"{BASE}/sales", status_code=503)
    with pytest.raises(LightspeedUnavailable) as info:
        list(client.iter_pages("/sales", after=31570022841))
    assert (info.value.method, info.value.path, info.value.status) == ("GET", "/sales", 503)
    assert "?" not in str(info.value) and "page_size" not in str(info.value)


# -- plain http: never, unless the connection opts in (a local test server) -------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://pos.example.com/api/2.0",
        "http://10.0.0.7:8080/api/2.0",
        "http://[2001:db8::1]/api/2.0",
        # This machine too: a proxy or another user's process can listen on a local port.
        "http://127.0.0.1:9/api/2.0",
        "http://[::1]:9",
        "http://localhost:9",
    ],
)
def test_plain_http_is_refused_without_the_opt_in(url: str) -> None:
    with pytest.raises(LightspeedConfigError) as info:
        LightspeedClient(url, TOKEN, conn_id="lightspeed_test")
    message = str(info.value)
    assert "'lightspeed_test'" in message and "plain http" in message
    assert "allow_insecure_http: true" in message and TOKEN not in message
    assert LightspeedClient(url, TOKEN, allow_insecure_http=True).base_url == url


def test_the_opt_in_comes_from_the_connection_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {"conn_type": "http", "host": "http://127.0.0.1:9/api/2.0", "password": TOKEN}
    monkeypatch.setenv("AIRFLOW_CONN_LIGHTSPEED_TEST", json.dumps(conn))
    with pytest.raises(LightspeedConfigError, match="allow_insecure_http: true"):
        LightspeedClient.from_connection("lightspeed_test")
    conn["extra"] = {"allow_insecure_http": "true"}
    monkeypatch.setenv("AIRFLOW_CONN_LIGHTSPEED_TEST", json.dumps(conn))
    assert LightspeedClient.from_connection("lightspeed_test").base_url == conn["host"]


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{TOKEN}@acme.retail.lightspeed.app/api/2.0",
        f"https://acme.retail.lightspeed.app/api/2.0?token={TOKEN}",
        "ftp://acme.retail.lightspeed.app/api/2.0",
    ],
)
def test_a_base_url_that_could_leak_the_token_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(LightspeedConfigError, match="'lightspeed_default'") as info:
        LightspeedClient(url, "another-token")
    assert TOKEN not in str(info.value)


def test_from_connection_reads_the_new_extras_and_strips_the_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, requests_mock: rm.Mocker
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow_home"))

    def connect(host: str, **extra: Any) -> LightspeedClient:
        extra["rate_budget_dir"] = str(tmp_path / "budget")
        conn = {"conn_type": "http", "host": host, "password": f"{TOKEN}\n", "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_LIGHTSPEED_DEFAULT", json.dumps(conn))
        return LightspeedClient.from_connection("lightspeed_default")

    remote = "http://pos.example.com/api/2.0"
    with pytest.raises(LightspeedConfigError, match="allow_insecure_http"):
        connect(remote)
    client = connect(remote, allow_insecure_http="true", request_deadline_seconds="7.5", max_pages="40")
    assert (client.request_deadline_seconds, client.max_pages) == (7.5, 40)
    with pytest.raises(LightspeedConfigError, match="extra allow_insecure_http must be true or false"):
        connect(remote, allow_insecure_http="perhaps")
    requests_mock.get(f"{remote}/customers/c1", json={"data": {"id": "c1"}})
    client.get_customer("c1")
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {TOKEN}"


# -- a wall-clock deadline per request ------------------------------------------------------------


def test_a_trickled_body_is_cut_off_at_the_request_deadline(sim: Any) -> None:
    page = requests.get(
        f"{sim.base_url}/customer_groups", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    chunk, pause = 8, 0.3
    assert len(page.content) / chunk * pause > 30  # sent whole, the answer would take over 30 s
    sim.faults.add("trickle", method="GET", path=r"^/customer_groups$", seconds=pause, chunk_bytes=chunk)
    sim.requests.clear()
    client = make_client(sim, request_deadline_seconds=1.0, max_retries=0)
    started = time.monotonic()
    with pytest.raises(LightspeedTimeout) as info:
        client.list_customer_groups()
    elapsed = time.monotonic() - started
    assert elapsed < 10  # cut off near the 1 s deadline, not held for the 30 s+ the server wanted
    # Either bound may trip first (the deadline between reads, or the socket read timeout, which is
    # capped at the deadline): both are the same LightspeedTimeout.
    message = str(info.value)
    assert ("1 s deadline" in message or "Timeout" in message) and info.value.path == "/customer_groups"
    assert isinstance(info.value, LightspeedUnavailable)  # transient: retried like a 5xx
    assert client.stats.requests == 1


def test_a_trickle_that_happens_once_is_retried(sim: Any) -> None:
    sim.faults.add("trickle", method="GET", path=r"^/customer_groups$", seconds=0.3, chunk_bytes=8, times=1)
    client = make_client(sim, request_deadline_seconds=1.0, max_retries=2)
    assert client.list_customer_groups()
    assert client.stats.retries == 1 and client.stats.requests == 3  # trickled, then a whole page, then end


# -- a feed that does not move forward -------------------------------------------------------------


def test_a_creeping_cursor_fails_the_extraction_with_the_resource_and_cursor_named(
    sim: Any, tmp_path: Path
) -> None:
    sim.faults.add("creep", method="GET", path=r"^/sales$")
    store = OrderStore(tmp_path / "store")
    with pytest.raises(LightspeedFeedError) as info:
        extract_orders(make_client(sim), store)
    first_page_max = int(sorted(int(s["version"]) for s in sim.store.sales.values())[19])
    message = str(info.value)
    assert "GET /sales" in message and f"after={first_page_max}" in message
    assert "no record is newer than the cursor" in message
    assert store.cursor("sales") == first_page_max  # the one honest page, nothing after it
    assert len(store.read("sales")) == 20


def test_the_same_records_again_fail_even_when_the_cursor_moves(requests_mock: rm.Mocker) -> None:
    page = {"data": [{"id": "a", "version": None}, {"id": "b", "version": None}]}
    requests_mock.get(
        f"{BASE}/sales",
        [{"json": {**page, "version": {"max": 10}}}, {"json": {**page, "version": {"max": 11}}}],
    )
    with pytest.raises(
        LightspeedFeedError, match="the same records as the previous page came back at after=10"
    ):
        list(LightspeedClient(BASE, TOKEN).iter_sales())


def test_max_pages_bounds_a_feed_that_never_ends(requests_mock: rm.Mocker) -> None:
    requests_mock.get(
        f"{BASE}/sales", [{"json": {"data": [{"id": f"s{v}", "version": v}]}} for v in range(1, 6)]
    )
    client = LightspeedClient(BASE, TOKEN, max_pages=3)
    pages = []
    with pytest.raises(LightspeedFeedError, match="more than max_pages=3 pages at after=3"):
        pages.extend(client.iter_sales())
    assert len(pages) == 3 and requests_mock.call_count == 4


@dataclass(frozen=True)
class _Page:
    data: list[dict[str, Any]]
    version_max: int | None


class _StuckFeed:
    """A feed client that is not ours and repeats its page (extract must not trust the client)."""

    stats = ApiStats()

    def iter_pages(
        self, path: str, after: int = 0, page_size: int | None = None, params: Any = None
    ) -> Iterator[_Page]:
        stamp = "2025-11-20T02:40:51+00:00"
        sale = {
            "id": "s1",
            "customer_id": None,
            "status": "CLOSED",
            "total_price_incl": Decimal("1.00"),
            "sale_date": stamp,
            "created_at": stamp,
            "updated_at": stamp,
            "deleted_at": None,
            "version": 50,
        }
        for _ in range(3):
            yield _Page([sale], 50)


def test_extract_refuses_a_page_that_does_not_move_the_cursor(tmp_path: Path) -> None:
    store = OrderStore(tmp_path / "store")
    with pytest.raises(LightspeedError, match=r"sales: page 2 of /sales does not move the cursor past 50"):
        extract_orders(_StuckFeed(), store)
    assert store.cursor("sales") == 50 and len(store.read("sales")) == 1


def test_one_group_is_read_and_checked_like_any_single_record(sim: Any) -> None:
    bloom = next(g for g in sim.store.groups.values() if g["name"] == "GreenHaus Crew - Bloom")
    client = make_client(sim, max_retries=1)
    assert client.get_customer_group(bloom["id"]) == bloom
    sim.faults.add(
        "status", method="GET", path=rf"^/customer_groups/{bloom['id']}$", status=200, body=GATEWAY_200
    )
    with pytest.raises(LightspeedProtocolError, match="neither `data` nor a record `id`"):
        client.get_customer_group(bloom["id"])
    with pytest.raises(LightspeedNotFound):
        client.get_customer_group("no-such-group")
