"""The Lightspeed client against hand-built HTTP responses (requests_mock): no server, no sleeping."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from include.tier_sync.lightspeed import (
    LightspeedAuthError,
    LightspeedClient,
    LightspeedClientError,
    LightspeedError,
    LightspeedNotFound,
    LightspeedUnavailable,
    Page,
    resolve_base_url,
)
from include.tier_sync.lightspeed_http import dumps_exact, parse_retry_after
from include.tier_sync.rate_budget import RateBudget
from tests.unit.fakes import FakeTime

if TYPE_CHECKING:
    import requests_mock as rm

pytestmark = pytest.mark.unit

BASE = "https://acme.retail.lightspeed.app/api/2.0"
TOKEN = "lsxs_pt_SuperSecretToken123"




@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(fake_time: FakeTime) -> LightspeedClient:
    return LightspeedClient(BASE, TOKEN, max_retries=3, sleep=fake_time.sleep, clock=fake_time.clock)


def page(records: list[dict[str, Any]], vmin: Any = "auto", vmax: Any = "auto") -> dict[str, Any]:
    versions = [r["version"] for r in records]
    return {
        "data": records,
        "version": {
            "min": (min(versions) if versions else None) if vmin == "auto" else vmin,
            "max": (max(versions) if versions else None) if vmax == "auto" else vmax,
        },
    }


def rec(rid: str, version: int, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "version": version, **extra}


def afters(m: rm.Mocker) -> list[int]:
    return [int(r.qs["after"][0]) for r in m.request_history]


# -- pagination ------------------------------------------------------------------------------------


def test_pagination_follows_version_max_and_ignores_short_pages(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.get(
        f"{BASE}/sales",
        [
            {"json": page([rec("a", 10), rec("b", 12)])},
            {"json": page([rec("c", 20)])},  # short page: not the end
            {"json": page([rec("d", 31), rec("e", 35)])},
            {"json": {"data": [], "version": {"min": None, "max": None}}},
        ],
    )
    pages = list(client.iter_pages("/sales", after=5, page_size=2))
    assert [p.version_max for p in pages] == [12, 20, 35]
    assert [p.version_min for p in pages] == [10, 20, 31]
    assert [r["id"] for p in pages for r in p.data] == ["a", "b", "c", "d", "e"]
    assert afters(requests_mock) == [5, 12, 20, 35]
    assert all(r.qs["page_size"] == ["2"] for r in requests_mock.request_history)
    assert client.stats.as_dict() == {"requests": 4, "rate_limited": 0, "retries": 0}


def test_pagination_empty_page_without_version_key(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.get(
        f"{BASE}/customers",
        [
            {"json": page([rec("a", 3)])},
            {"json": page([rec("b", 4)])},
            {"json": page([rec("c", 9)])},
            {"json": {"data": []}},
        ],
    )
    pages = list(client.iter_customers())
    assert len(pages) == 3
    assert afters(requests_mock) == [0, 3, 4, 9]
    assert requests_mock.request_history[0].qs["page_size"] == ["1000"]


def test_pagination_null_version_on_full_page_uses_record_versions(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.get(
        f"{BASE}/sales",
        [
            {"json": {"data": [rec("a", 7), rec("b", 11)], "version": None}},
            {"json": {"data": [rec("c", 15)]}},
            {"json": {"data": [], "version": None}},
        ],
    )
    pages = list(client.iter_sales(after=0))
    assert [p.version_max for p in pages] == [11, 15]
    assert afters(requests_mock) == [0, 11, 15]


def test_pagination_refuses_a_cursor_that_does_not_advance(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.get(f"{BASE}/sales", json=page([rec("a", 50)]))  # the same page forever
    with pytest.raises(LightspeedError, match="did not advance"):
        list(client.iter_pages("/sales", after=0))
    assert requests_mock.call_count == 2


def test_pagination_passes_extra_params(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.get(f"{BASE}/customer_groups", json={"data": []})
    assert list(client.iter_pages("/customer_groups", params={"deleted": "true"})) == []
    assert requests_mock.last_request.qs["deleted"] == ["true"]


def test_list_customer_groups_keeps_highest_version_and_drops_deleted(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.get(
        f"{BASE}/customer_groups",
        [
            {"json": page([rec("g1", 1, name="All Customers"), rec("g2", 2, name="Old name")])},
            {
                "json": page(
                    [rec("g2", 5, name="GreenHaus Crew - Bloom"), rec("g3", 6, name="Gone", deleted_at="x")]
                )
            },
            # a stale copy of g2 (lower version) must not win; g1 was re-stamped
            {"json": page([rec("g2", 2, name="Old name"), rec("g1", 8, name="All Customers")])},
            {"json": {"data": [], "version": {"min": None, "max": None}}},
        ],
    )
    groups = client.list_customer_groups()
    assert {g["id"]: (g["version"], g["name"]) for g in groups} == {
        "g1": (8, "All Customers"),
        "g2": (5, "GreenHaus Crew - Bloom"),
    }


def test_list_group_members_dedupes_and_drops_customers_who_moved_away(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    url = f"{BASE}/customer_groups/grp-1/customers"
    requests_mock.get(
        url,
        [
            {
                "json": page(
                    [rec("c1", 10, customer_group_id="grp-1"), rec("c2", 11, customer_group_id="grp-1")]
                )
            },
            {
                "json": page(
                    [rec("c1", 20, customer_group_id="grp-1"), rec("c2", 21, customer_group_id="grp-9")]
                )
            },
            {"json": {"data": []}},
        ],
    )
    members = client.list_group_members("grp-1")
    assert [(m["id"], m["version"]) for m in members] == [("c1", 20)]


# -- auth and errors -------------------------------------------------------------------------------


def test_sends_bearer_token_and_json_headers(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.get(f"{BASE}/customers/c1", json={"data": {"id": "c1"}})
    assert client.get_customer("c1") == {"id": "c1"}
    headers = requests_mock.last_request.headers
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "application/json"
    assert requests_mock.last_request.timeout == 30.0


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_fail_fast_name_the_connection_and_hide_the_token(
    client: LightspeedClient, requests_mock: rm.Mocker, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1",
        status_code=status,
        json={"error": "Unauthorized", "email": "mia@example.org", "echo": TOKEN},
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LightspeedAuthError) as info:
        client.get_customer("c1")
    message = str(info.value)
    assert "'lightspeed_default'" in message
    assert str(status) in message
    assert info.value.status == status
    assert requests_mock.call_count == 1  # no retry
    assert TOKEN not in message and TOKEN not in caplog.text and TOKEN not in repr(client)
    assert "mia@example.org" not in caplog.text  # bodies are never logged
    assert client.stats.retries == 0


def test_404_is_not_found(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.get(f"{BASE}/customers/nope", status_code=404, text="Not found")
    with pytest.raises(LightspeedNotFound):
        client.get_customer("nope")
    assert requests_mock.call_count == 1


def test_other_4xx_is_a_typed_client_error(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.post(f"{BASE}/customer_groups/g/customers", status_code=400, json={"errors": ["bad id"]})
    with pytest.raises(LightspeedClientError) as info:
        client.add_customers_to_group("g", ["x"])
    assert info.value.status == 400
    assert requests_mock.call_count == 1


def test_ids_are_quoted_into_one_path_segment(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.get(f"{BASE}/customers/a%2F..%2Fb", json={"data": {"id": "a/../b"}})
    assert client.get_customer("a/../b")["id"] == "a/../b"


# -- retries ---------------------------------------------------------------------------------------


def test_500_then_200_is_retried_with_backoff(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1", [{"status_code": 500, "text": "boom"}, {"json": {"data": {"id": "c1"}}}]
    )
    assert client.get_customer("c1")["id"] == "c1"
    assert len(fake_time.sleeps) == 1
    assert 0.5 <= fake_time.sleeps[0] <= 1.0  # first backoff: base 1 s, half of it jittered
    assert client.stats.as_dict() == {"requests": 2, "rate_limited": 0, "retries": 1}


def test_backoff_grows_and_5xx_retries_are_bounded(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    requests_mock.get(f"{BASE}/sales", status_code=503)
    with pytest.raises(LightspeedUnavailable) as info:
        list(client.iter_sales())
    assert info.value.status == 503
    assert requests_mock.call_count == 4  # 1 + max_retries=3
    assert len(fake_time.sleeps) == 3
    assert fake_time.sleeps[0] < fake_time.sleeps[2]  # 0.5-1, 1-2, 2-4
    assert "'lightspeed_default'" in str(info.value)


@pytest.mark.parametrize("exc", [requests.ConnectionError, requests.ConnectTimeout, requests.ReadTimeout])
def test_network_errors_and_timeouts_are_retried(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime, exc: type[Exception]
) -> None:
    requests_mock.get(f"{BASE}/customers/c1", [{"exc": exc}, {"exc": exc}, {"json": {"data": {"id": "c1"}}}])
    assert client.get_customer("c1")["id"] == "c1"
    assert len(fake_time.sleeps) == 2
    assert client.stats.retries == 2 and client.stats.requests == 3


def test_network_errors_give_up_after_bounded_retries(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.get(f"{BASE}/customers/c1", exc=requests.ConnectionError)
    with pytest.raises(LightspeedUnavailable, match="ConnectionError"):
        client.get_customer("c1")
    assert requests_mock.call_count == 4


def test_truncated_2xx_body_is_retried(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1", [{"text": '{"data": {"id": "c'}, {"json": {"data": {"id": "c1"}}}]
    )
    assert client.get_customer("c1")["id"] == "c1"
    assert client.stats.retries == 1


def test_writes_are_retried_because_they_are_idempotent(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    requests_mock.put(
        f"{BASE}/customers/c1", [{"status_code": 502}, {"json": {"data": {"id": "c1", "version": 9}}}]
    )
    assert client.put_customer("c1", {"id": "c1", "customer_group_id": "g"})["version"] == 9
    assert requests_mock.call_count == 2


def test_create_group_does_not_create_twice_after_an_ambiguous_failure(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    post = requests_mock.post(f"{BASE}/customer_groups", status_code=504)
    requests_mock.get(
        f"{BASE}/customer_groups",
        [{"json": page([rec("new", 77, name="GreenHaus Crew - Seed")])}, {"json": {"data": []}}],
    )
    group = client.create_customer_group("GreenHaus Crew - Seed")
    assert group["id"] == "new"
    assert post.call_count == 1


def test_create_group(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    post = requests_mock.post(
        f"{BASE}/customer_groups", status_code=201, json={"data": {"id": "g9", "name": "X"}}
    )
    assert client.create_customer_group("X") == {"id": "g9", "name": "X"}
    assert post.last_request.json() == {"name": "X"}


# -- 429 and pacing --------------------------------------------------------------------------------


def test_429_with_http_date_waits_exactly_until_then(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    retry_at = fake_time.now + 17
    requests_mock.get(
        f"{BASE}/customers/c1",
        [
            {
                "status_code": 429,
                "headers": {"Retry-After": formatdate(retry_at, usegmt=True)},
                "json": {"error": "Too Many Requests", "message": "Rate limiting enforced"},
            },
            {"json": {"data": {"id": "c1"}}},
        ],
    )
    assert client.get_customer("c1")["id"] == "c1"
    assert fake_time.sleeps == [pytest.approx(17.0)]
    assert fake_time.now == pytest.approx(retry_at)
    assert client.stats.as_dict() == {"requests": 2, "rate_limited": 1, "retries": 1}


def test_429_with_seconds(client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1",
        [{"status_code": 429, "headers": {"Retry-After": "3"}}, {"json": {"data": {"id": "c1"}}}],
    )
    client.get_customer("c1")
    assert fake_time.sleeps == [3.0]


def test_429_body_retry_after_then_cap(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1",
        [
            {"status_code": 429, "json": {"retry-after": formatdate(fake_time.now + 5, usegmt=True)}},
            {"status_code": 429, "headers": {"Retry-After": "86400"}},  # not believed beyond the cap
            {"json": {"data": {"id": "c1"}}},
        ],
    )
    client.get_customer("c1")
    assert fake_time.sleeps == [pytest.approx(5.0), 360.0]


def test_429_forever_raises_instead_of_hanging(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    requests_mock.get(f"{BASE}/sales", status_code=429, headers={"Retry-After": "60"})
    with pytest.raises(LightspeedUnavailable) as info:
        list(client.iter_sales())
    assert info.value.status == 429
    assert requests_mock.call_count == client.max_rate_limit_waits + 1
    assert client.stats.rate_limited == client.max_rate_limit_waits + 1
    assert sum(fake_time.sleeps) == 60.0 * client.max_rate_limit_waits


def test_low_remaining_paces_the_next_request(
    client: LightspeedClient, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1",
        [
            {
                "json": {"data": {"id": "c1"}},
                "headers": {"X-RateLimit-Limit": "350", "X-RateLimit-Remaining": "200"},
            },
            {
                "json": {"data": {"id": "c1"}},
                "headers": {"X-RateLimit-Limit": "350", "X-RateLimit-Remaining": "3"},
            },
            {
                "json": {"data": {"id": "c1"}},
                "headers": {"X-RateLimit-Limit": "350", "X-RateLimit-Remaining": "340"},
            },
            {"json": {"data": {"id": "c1"}}},
        ],
    )
    client.get_customer("c1")
    client.get_customer("c1")
    assert fake_time.sleeps == []  # the pause happens before the *next* send, not after the last
    client.get_customer("c1")
    # threshold 5 % of 350 = 17; 14 short, one average interval (300/350 s) each
    assert fake_time.sleeps == [pytest.approx(14 * 300 / 350)]
    client.get_customer("c1")
    assert len(fake_time.sleeps) == 1  # plenty left again: no more pacing


def test_budget_takes_a_slot_per_attempt_and_learns_from_429(
    tmp_path: Path, requests_mock: rm.Mocker, fake_time: FakeTime
) -> None:
    budget = RateBudget(
        "k", limit=50, window_seconds=300, directory=tmp_path, clock=fake_time.clock, sleep=fake_time.sleep
    )
    client = LightspeedClient(BASE, TOKEN, budget=budget, sleep=fake_time.sleep, clock=fake_time.clock)
    requests_mock.get(
        f"{BASE}/customers/c1",
        [{"status_code": 429, "headers": {"Retry-After": "4"}}, {"json": {"data": {"id": "c1"}}}],
    )
    client.get_customer("c1")
    assert budget.in_window() == 2
    assert fake_time.sleeps == [4.0]  # the budget's block ended exactly when the client's wait did


# -- bodies ----------------------------------------------------------------------------------------


def test_decimals_stay_exact_both_ways(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    requests_mock.get(
        f"{BASE}/customers/c1",
        text='{"data": {"id": "c1", "balance": 1499.995, "loyalty_balance": 0.1, "year_to_date": 12, "version": 31570022841}}',
    )
    put = requests_mock.put(f"{BASE}/customers/c1", json={"data": {"id": "c1"}})
    customer = client.get_customer("c1")
    assert customer["balance"] == Decimal("1499.995") and isinstance(customer["balance"], Decimal)
    assert customer["year_to_date"] == 12 and customer["version"] == 31570022841
    customer["customer_group_id"] = "g2"
    client.put_customer("c1", customer)
    sent = put.last_request.text
    assert '"balance":1499.995' in sent and '"loyalty_balance":0.1' in sent
    assert json.loads(sent, parse_float=Decimal)["balance"] == Decimal("1499.995")
    assert put.last_request.headers["Content-Type"] == "application/json"


def test_dumps_exact_handles_nesting_and_rejects_nan() -> None:
    text = dumps_exact({"a": [Decimal("0.30"), {"b": Decimal("-2E+3")}], "s": "__dec_x__"})
    assert json.loads(text, parse_float=Decimal) == {
        "a": [Decimal("0.30"), {"b": Decimal("-2E+3")}],
        "s": "__dec_x__",
    }
    with pytest.raises(ValueError):
        dumps_exact({"x": Decimal("NaN")})


@pytest.mark.parametrize("response", [{"json": True}, {"json": {}}, {"text": ""}, {"status_code": 204}])
def test_add_members_accepts_any_2xx_body(
    client: LightspeedClient, requests_mock: rm.Mocker, response: dict[str, Any]
) -> None:
    post = requests_mock.post(
        f"{BASE}/customer_groups/g1/customers", status_code=response.pop("status_code", 201), **response
    )
    client.add_customers_to_group("g1", ["c1", "c2"])
    assert post.last_request.json() == {"customer_ids": ["c1", "c2"]}


def test_membership_batches_are_capped_at_100(client: LightspeedClient, requests_mock: rm.Mocker) -> None:
    with pytest.raises(ValueError, match="100"):
        client.add_customers_to_group("g1", [f"c{i}" for i in range(101)])
    with pytest.raises(ValueError):
        client.remove_customers_from_group("g1", [f"c{i}" for i in range(101)])
    client.add_customers_to_group("g1", [])  # nothing to do: no request
    assert requests_mock.call_count == 0


def test_remove_members_is_a_delete_with_a_json_body(
    client: LightspeedClient, requests_mock: rm.Mocker
) -> None:
    delete = requests_mock.delete(f"{BASE}/customer_groups/g1/customers", status_code=204)
    client.remove_customers_from_group("g1", ["c1"])
    assert delete.last_request.json() == {"customer_ids": ["c1"]}


def test_page_keeps_the_contract_field_order() -> None:
    p = Page([{"id": "a"}], 5)
    assert p.version_max == 5 and p.version_min is None


# -- configuration ---------------------------------------------------------------------------------


def test_repr_and_missing_token() -> None:
    client = LightspeedClient(BASE, TOKEN)
    assert TOKEN not in repr(client) and "lightspeed_default" in repr(client)
    with pytest.raises(LightspeedAuthError, match="'lightspeed_default'"):
        LightspeedClient(BASE, "")


@pytest.mark.parametrize(
    ("host", "kwargs", "expected"),
    [
        ("https://acme.retail.lightspeed.app/api/2.0/", {}, "https://acme.retail.lightspeed.app/api/2.0"),
        ("http://127.0.0.1:8080/api/2.0", {}, "http://127.0.0.1:8080/api/2.0"),
        ("", {"domain_prefix": "acme"}, "https://acme.retail.lightspeed.app/api/2.0"),
        (None, {"domain_prefix": "acme"}, "https://acme.retail.lightspeed.app/api/2.0"),
        ("acme.retail.lightspeed.app", {}, "https://acme.retail.lightspeed.app/api/2.0"),
        ("127.0.0.1", {"port": 9000, "schema": "http"}, "http://127.0.0.1:9000/api/2.0"),
    ],
)
def test_resolve_base_url(host: str | None, kwargs: dict[str, Any], expected: str) -> None:
    assert resolve_base_url(host, **kwargs) == expected


def test_resolve_base_url_needs_something() -> None:
    with pytest.raises(LightspeedError):
        resolve_base_url("")


def test_parse_retry_after() -> None:
    now = 1_795_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_from_connection_reads_the_airflow_env_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, requests_mock: rm.Mocker
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow_home"))
    conn = {
        "conn_type": "http",
        "host": "",
        "password": TOKEN,
        "extra": {
            "domain_prefix": "acme",
            "registers": "2",
            "page_size": "250",
            "timeout": "12.5",
            "max_retries": "4",
            "rate_budget_dir": str(tmp_path / "budget"),
        },
    }
    monkeypatch.setenv("AIRFLOW_CONN_LIGHTSPEED_DEFAULT", json.dumps(conn))
    client = LightspeedClient.from_connection("lightspeed_default")
    assert client.base_url == "https://acme.retail.lightspeed.app/api/2.0"
    assert (client.page_size, client.timeout, client.max_retries, client.registers) == (250, 12.5, 4, 2)
    assert client.budget is not None
    assert client.budget.limit == 650 - 20
    assert Path(client.budget.directory) == tmp_path / "budget"
    assert TOKEN not in repr(client)
    requests_mock.get(f"{BASE}/customers/c1", json={"data": {"id": "c1"}})
    client.get_customer("c1")
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert requests_mock.last_request.timeout == 12.5
    assert client.budget.in_window() == 1
