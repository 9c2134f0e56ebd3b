"""Contract tests over real HTTP: auth, cursor paging, membership moves, PUT merge, groups, sales."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import requests

from tests.sim.conftest import TOKEN, body, page_all
from tools.lightspeed_sim.jsonutil import dumps
from tools.lightspeed_sim.testing import running_simulator

if TYPE_CHECKING:
    from tools.lightspeed_sim import SimServer, SimStore

pytestmark = pytest.mark.unit


def live_customer_ids(store: SimStore, group_id: str | None = None) -> list[str]:
    return [
        c["id"]
        for c in store.customers.values()
        if c["deleted_at"] is None and (group_id is None or c["customer_group_id"] == group_id)
    ]


def group_id(store: SimStore, name: str) -> str:
    return next(g["id"] for g in store.groups.values() if g["name"] == name)


# -- auth ---------------------------------------------------------------------------------------


def test_missing_or_wrong_token_is_401(sim: SimServer) -> None:
    url = f"{sim.base_url}/customers"
    assert requests.get(url, timeout=5).status_code == 401
    resp = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert resp.status_code == 401
    assert resp.json()["error"] == "Unauthorized"
    assert "X-RateLimit-Limit" in resp.headers
    ok = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert ok.status_code == 200


def test_expired_token_is_401_everywhere(sim: SimServer, http: requests.Session) -> None:
    sim.expire_token()
    for path in ("/customers", "/sales", "/customer_groups"):
        assert http.get(sim.base_url + path, timeout=5).status_code == 401
    assert http.put(f"{sim.base_url}/customers/x", json={}, timeout=5).status_code == 401


def test_unknown_route_and_ids_are_404(sim: SimServer, http: requests.Session) -> None:
    assert http.get(f"{sim.base_url}/products", timeout=5).status_code == 404
    assert http.get(f"{sim.url}/api/2.1/customers", timeout=5).status_code == 404
    for path in ("/customers/nope", "/sales/nope", "/customer_groups/nope", "/customer_groups/nope/customers"):
        assert http.get(sim.base_url + path, timeout=5).status_code == 404, path


def test_any_host_header_is_accepted(sim: SimServer, http: requests.Session) -> None:
    resp = http.get(f"{sim.base_url}/customer_groups", headers={"Host": "shop.retail.lightspeed.app"}, timeout=5)
    assert resp.status_code == 200


# -- pagination ---------------------------------------------------------------------------------


def test_page_cap_applies_whatever_page_size_asks(store: SimStore) -> None:
    with running_simulator(store=store, token=TOKEN, page_cap=25) as sim, requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        resp = http.get(f"{sim.base_url}/sales", params={"page_size": 1000}, timeout=5)
        assert len(body(resp)["data"]) == 25
        small = http.get(f"{sim.base_url}/sales", params={"page_size": 10}, timeout=5)
        assert len(body(small)["data"]) == 10


def test_after_is_exclusive_and_versions_ascend(sim: SimServer, http: requests.Session) -> None:
    first = body(http.get(f"{sim.base_url}/sales", params={"page_size": 50}, timeout=5))
    versions = [s["version"] for s in first["data"]]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert first["version"] == {"min": versions[0], "max": versions[-1]}
    assert versions[0] > 2**32  # exceeds 32 bits, like real stores
    nxt = body(http.get(f"{sim.base_url}/sales", params={"after": versions[-1], "page_size": 50}, timeout=5))
    assert nxt["data"][0]["version"] > versions[-1]
    again = body(http.get(f"{sim.base_url}/sales", params={"after": versions[10], "page_size": 5}, timeout=5))
    assert again["data"][0]["version"] == versions[11]


def test_full_scan_matches_store_and_ends_on_empty_page(sim: SimServer, http: requests.Session) -> None:
    sales = page_all(http, f"{sim.base_url}/sales", page_size=1000)
    assert {s["id"] for s in sales} == set(sim.store.sales)
    assert any(s["deleted_at"] for s in sales), "deleted sales are served without being asked"
    last = max(s["version"] for s in sales)
    empty = http.get(f"{sim.base_url}/sales", params={"after": last}, timeout=5)
    assert body(empty) == {"data": [], "version": {"min": None, "max": None}}


def test_empty_page_variant_without_version(store: SimStore) -> None:
    with running_simulator(store=store, token=TOKEN, empty_version="missing") as sim:
        resp = requests.get(
            f"{sim.base_url}/customers",
            params={"after": 10**12},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        assert body(resp) == {"data": []}


def test_before_bounds_the_page(sim: SimServer, http: requests.Session) -> None:
    page = body(http.get(f"{sim.base_url}/sales", params={"page_size": 20}, timeout=5))["data"]
    cut = page[5]["version"]
    bounded = body(http.get(f"{sim.base_url}/sales", params={"before": cut, "page_size": 20}, timeout=5))["data"]
    assert [s["version"] for s in bounded] == [s["version"] for s in page[:5]]


def test_deleted_filter_on_customers_and_groups(sim: SimServer, http: requests.Session) -> None:
    deleted = {c["id"] for c in sim.store.customers.values() if c["deleted_at"]}
    assert deleted
    default = {c["id"] for c in page_all(http, f"{sim.base_url}/customers")}
    assert default == set(sim.store.customers) - deleted
    everything = {c["id"] for c in page_all(http, f"{sim.base_url}/customers", deleted="true")}
    assert everything == set(sim.store.customers)
    gone = sim.store.create_group("Old group")
    gone["deleted_at"] = gone["updated_at"]
    sim.store.stamp(gone)
    assert gone["id"] not in {g["id"] for g in page_all(http, f"{sim.base_url}/customer_groups")}
    assert gone["id"] in {g["id"] for g in page_all(http, f"{sim.base_url}/customer_groups", deleted="true")}


def test_edits_while_paging_reappear_later(sim: SimServer, http: requests.Session) -> None:
    first = body(http.get(f"{sim.base_url}/customers", params={"page_size": 10}, timeout=5))
    seen = first["data"][0]
    sim.store.move_customer_to_group(seen["id"], group_id(sim.store, "Staff"))
    rest = page_all(http, f"{sim.base_url}/customers")  # a fresh scan from 0 is fine too
    tail = [c for c in rest if c["id"] == seen["id"]]
    assert len(tail) == 1 and tail[0]["version"] > first["version"]["max"]
    after_first = page_all_from(http, f"{sim.base_url}/customers", first["version"]["max"])
    assert seen["id"] in {c["id"] for c in after_first}


def page_all_from(http: requests.Session, url: str, after: int) -> list[dict[str, object]]:
    out = []
    while True:
        payload = body(http.get(url, params={"after": after}, timeout=5))
        if not payload["data"]:
            return out
        out.extend(payload["data"])
        after = payload["version"]["max"]


def test_bad_page_params_are_400(sim: SimServer, http: requests.Session) -> None:
    assert http.get(f"{sim.base_url}/sales", params={"after": "x"}, timeout=5).status_code == 400
    assert http.get(f"{sim.base_url}/sales", params={"page_size": 0}, timeout=5).status_code == 400


# -- single records and money -------------------------------------------------------------------


def test_single_record_envelopes_and_exact_money(sim: SimServer, http: requests.Session) -> None:
    sale_id = sim.store.labels["sale_1499_995"]
    resp = http.get(f"{sim.base_url}/sales/{sale_id}", timeout=5)
    assert b'"total_price_incl":1499.995' in resp.content
    assert str(body(resp)["data"]["total_price_incl"]) == "1499.995"
    cid = sim.store.labels["evergreen_exact_1500_00"]
    customer = body(http.get(f"{sim.base_url}/customers/{cid}", timeout=5))["data"]
    assert customer["id"] == cid and customer["created_at"].endswith("+00:00")


# -- PUT /customers/{id} ------------------------------------------------------------------------


def test_put_merges_and_ignores_read_only_fields(sim: SimServer, http: requests.Session) -> None:
    cid = sim.store.labels["sprout_749_99"]
    before = body(http.get(f"{sim.base_url}/customers/{cid}", timeout=5))["data"]
    staff = group_id(sim.store, "Staff")
    resp = http.put(
        f"{sim.base_url}/customers/{cid}",
        json={"first_name": "Kiri-Ann", "customer_group_id": staff, "id": "hacked", "version": 1, "name": "x"},
        timeout=5,
    )
    assert resp.status_code == 200
    after = body(resp)["data"]
    assert after["id"] == cid and after["first_name"] == "Kiri-Ann" and after["name"] == "Kiri-Ann Under"
    assert after["email"] == before["email"]  # absent from the body: kept
    assert after["customer_group_id"] == staff
    assert after["version"] > before["version"] and after["updated_at"] > before["updated_at"]


def test_put_whole_object_back_and_bad_group(sim: SimServer, http: requests.Session) -> None:
    cid = sim.store.labels["seed_249_99"]
    record = body(http.get(f"{sim.base_url}/customers/{cid}", timeout=5))["data"]
    record["customer_group_id"] = group_id(sim.store, "Wholesale")
    headers = {"Content-Type": "application/json"}
    resp = http.put(f"{sim.base_url}/customers/{cid}", data=dumps(record), headers=headers, timeout=5)
    assert resp.status_code == 200 and body(resp)["data"]["customer_group_id"] == record["customer_group_id"]
    bad = http.put(f"{sim.base_url}/customers/{cid}", json={"customer_group_id": "no-such-group"}, timeout=5)
    assert bad.status_code == 400
    assert http.put(f"{sim.base_url}/customers/nope", json={"note": "x"}, timeout=5).status_code == 404
    assert http.put(f"{sim.base_url}/customers/{cid}", data=b"not json", timeout=5).status_code == 400


# -- groups -------------------------------------------------------------------------------------


def test_create_group_201(sim: SimServer, http: requests.Session) -> None:
    resp = http.post(f"{sim.base_url}/customer_groups", json={"name": "GreenHaus Crew - Seed"}, timeout=5)
    assert resp.status_code == 201
    group = body(resp)["data"]
    assert group["name"] == "GreenHaus Crew - Seed" and group["group_id"] and group["deleted_at"] is None
    assert body(http.get(f"{sim.base_url}/customer_groups/{group['id']}", timeout=5))["data"] == group
    assert http.post(f"{sim.base_url}/customer_groups", json={}, timeout=5).status_code == 400


# -- membership ---------------------------------------------------------------------------------


def test_add_members_moves_and_bumps_versions(sim: SimServer, http: requests.Session) -> None:
    store = sim.store
    target = group_id(store, "GreenHaus Crew - Bloom")
    ids = live_customer_ids(store, store.default_group_id())[:5]
    versions = {i: store.customers[i]["version"] for i in ids}
    resp = http.post(f"{sim.base_url}/customer_groups/{target}/customers", json={"customer_ids": ids}, timeout=5)
    assert resp.status_code == 201 and resp.json() is True
    for i in ids:
        assert store.customers[i]["customer_group_id"] == target
        assert store.customers[i]["version"] > versions[i]
    members = {c["id"] for c in page_all(http, f"{sim.base_url}/customer_groups/{target}/customers")}
    assert set(ids) <= members
    assert members == set(live_customer_ids(store, target))
    # Idempotent: re-adding members changes nothing.
    bumped = {i: store.customers[i]["version"] for i in ids}
    http.post(f"{sim.base_url}/customer_groups/{target}/customers", json={"customer_ids": ids}, timeout=5)
    assert {i: store.customers[i]["version"] for i in ids} == bumped


def test_membership_calls_can_keep_the_customers_version(store: SimStore, http: requests.Session) -> None:
    """The API variant where a membership call moves customers but leaves `version` alone (§5.1)."""
    with running_simulator(store=store, token=TOKEN, membership_bumps_version=False) as sim:
        target = group_id(store, "GreenHaus Crew - Bloom")
        ids = live_customer_ids(store, store.default_group_id())[:3]
        before = {i: (store.customers[i]["version"], store.customers[i]["updated_at"]) for i in ids}
        feed_end = max(int(c["version"]) for c in store.customers.values())
        url = f"{sim.base_url}/customer_groups/{target}/customers"
        assert http.post(url, json={"customer_ids": ids}, timeout=5).status_code == 201
        assert {i: (store.customers[i]["version"], store.customers[i]["updated_at"]) for i in ids} == before
        assert set(ids) <= {c["id"] for c in page_all(http, url)}  # moved: the group lists them
        newer = http.get(f"{sim.base_url}/customers", params={"after": feed_end, "deleted": "true"}, timeout=5)
        assert body(newer)["data"] == []  # but the customers feed shows nothing new
        assert http.delete(url, json={"customer_ids": ids[:1]}, timeout=5).status_code == 204
        assert store.customers[ids[0]]["customer_group_id"] == store.default_group_id()
        assert store.customers[ids[0]]["version"] == before[ids[0]][0]


def test_add_members_limits_and_unknown_ids(sim: SimServer, http: requests.Session) -> None:
    store = sim.store
    target = group_id(store, "GreenHaus Crew - Sprout")
    url = f"{sim.base_url}/customer_groups/{target}/customers"
    too_many = (live_customer_ids(store) * 3)[:101]
    assert http.post(url, json={"customer_ids": too_many}, timeout=5).status_code == 400
    ids = live_customer_ids(store, store.default_group_id())[:3]
    before = {i: dict(store.customers[i]) for i in ids}
    resp = http.post(url, json={"customer_ids": [*ids, "unknown-id"]}, timeout=5)
    assert resp.status_code == 400
    deleted = store.labels["deleted_customer_with_sales"]
    assert http.post(url, json={"customer_ids": [*ids, deleted]}, timeout=5).status_code == 400
    assert {i: store.customers[i] for i in ids} == before, "a refused call changes nothing"
    assert http.post(url, json={"customer_ids": []}, timeout=5).status_code == 400
    assert http.post(url, json={"ids": ids}, timeout=5).status_code == 400
    missing_group = f"{sim.base_url}/customer_groups/nope/customers"
    assert http.post(missing_group, json={"customer_ids": ids}, timeout=5).status_code == 404


def test_remove_members_with_delete_body_moves_to_default(sim: SimServer, http: requests.Session) -> None:
    store = sim.store
    source = group_id(store, "GreenHaus Crew - Evergreen")
    ids = live_customer_ids(store, store.default_group_id())[:2]
    http.post(f"{sim.base_url}/customer_groups/{source}/customers", json={"customer_ids": ids}, timeout=5)
    resp = http.delete(f"{sim.base_url}/customer_groups/{source}/customers", json={"customer_ids": ids}, timeout=5)
    assert resp.status_code == 204 and resp.content == b""
    assert all(store.customers[i]["customer_group_id"] == store.default_group_id() for i in ids)
    assert http.delete(f"{sim.base_url}/customer_groups/{source}/customers", timeout=5).status_code == 400


def test_move_customer_to_group_in_pos(sim: SimServer, http: requests.Session) -> None:
    cid = sim.store.labels["seed_249_99"]
    old = sim.store.customers[cid]["version"]
    staff = group_id(sim.store, "Staff")
    sim.store.move_customer_to_group(cid, staff)
    data = body(http.get(f"{sim.base_url}/customers/{cid}", timeout=5))["data"]
    assert data["customer_group_id"] == staff and data["version"] > old


def test_requests_are_recorded(sim: SimServer, http: requests.Session) -> None:
    http.get(f"{sim.base_url}/customers", timeout=5)
    http.get(f"{sim.base_url}/customers/nope", timeout=5)
    assert sim.requests == [("GET", "/api/2.0/customers", 200), ("GET", "/api/2.0/customers/nope", 404)]
