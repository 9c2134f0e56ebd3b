"""extract_orders with a fake feed client: incremental reads, crash safety, idempotence, full refresh."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync import fileio
from include.tier_sync.extract import extract_orders
from include.tier_sync.lightspeed_http import ApiStats
from include.tier_sync.store import MalformedRecordError, OrderStore

pytestmark = pytest.mark.unit

T0 = "2025-11-20T02:40:51+00:00"


class ApiDown(Exception):
    """What the real client raises when the API stays unavailable after its retries."""


class ProcessKilled(BaseException):
    """A worker killed mid-run: no `except Exception` cleanup gets to run."""


@dataclass(frozen=True)
class FakePage:
    data: list[dict[str, Any]]
    version_max: int | None


@dataclass
class FakeClient:
    """A version-cursor feed per path, like /api/2.0: ascending versions, `after` exclusive."""

    page_size: int = 3
    sales: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # id -> versions seen
    customers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fail_after_pages: int | None = None
    failure: type[BaseException] = ApiDown
    omit_version_max: bool = False
    stats: ApiStats = field(default_factory=ApiStats)
    calls: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    next_version: int = 100
    pages_served: int = 0

    def bump(self) -> int:
        self.next_version += 7  # one global counter across resources, not consecutive per record
        return self.next_version

    def put_sale(self, sid: str, amount: str = "10.00", **extra: Any) -> dict[str, Any]:
        sale = {
            "id": sid,
            "customer_id": "c-1",
            "status": "CLOSED",
            "sale_date": T0,
            "created_at": T0,
            "updated_at": T0,
            "deleted_at": None,
            "total_price_incl": Decimal(amount),
            "version": self.bump(),
            **extra,
        }
        self.sales.setdefault(sid, []).append(sale)
        return sale

    def put_customer(self, cid: str, **extra: Any) -> dict[str, Any]:
        customer = {
            "id": cid,
            "name": "Someone",
            "email": f"{cid}@example.org",
            "enable_loyalty": True,
            "customer_group_id": "g-all",
            "created_at": T0,
            "updated_at": T0,
            "deleted_at": None,
            "version": self.bump(),
            **extra,
        }
        self.customers.setdefault(cid, []).append(customer)
        return customer

    def feed(self, path: str) -> list[dict[str, Any]]:
        # The live feed shows only the current version of each record, like the real API.
        records = self.sales if path == "/sales" else self.customers
        return sorted((versions[-1] for versions in records.values()), key=lambda r: r["version"])

    def iter_pages(
        self,
        path: str,
        after: int = 0,
        page_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[FakePage]:
        self.calls.append((path, after, dict(params or {})))
        cursor = after
        while True:
            if self.fail_after_pages is not None and self.pages_served >= self.fail_after_pages:
                raise self.failure(f"simulated failure after {self.pages_served} pages")
            self.stats.requests += 1
            chunk = [r for r in self.feed(path) if r["version"] > cursor][: page_size or self.page_size]
            if not chunk:
                return
            self.pages_served += 1
            vmax = max(r["version"] for r in chunk)
            yield FakePage(data=chunk, version_max=None if self.omit_version_max else vmax)
            cursor = vmax


def all_versions(client: FakeClient, resource: str) -> set[tuple[str, int]]:
    records = client.sales if resource == "sales" else client.customers
    return {(r["id"], r["version"]) for versions in records.values() for r in versions}


def stored(store: OrderStore, resource: str) -> set[tuple[str, int]]:
    df = store.read(resource)
    pairs = list(zip(df["id"], df["version"], strict=True))
    assert len(pairs) == len(set(pairs)), "a (id, version) is stored twice"
    return {(str(i), int(v)) for i, v in pairs}


def seeded_client(sales: int = 20, customers: int = 7) -> FakeClient:
    client = FakeClient()
    for i in range(customers):
        client.put_customer(f"c{i}")
    for i in range(sales):
        client.put_sale(f"s{i}", amount=f"{i}.50")
    return client


@pytest.fixture
def store(tmp_path: Path) -> OrderStore:
    return OrderStore(tmp_path / "store")


# -- first run, incremental runs, idempotence --------------------------------------------------------


def test_first_run_reads_the_full_history(store: OrderStore) -> None:
    client = seeded_client(sales=20, customers=7)
    result = extract_orders(client, store, commit_every_pages=2)
    assert stored(store, "sales") == all_versions(client, "sales")
    assert stored(store, "customers") == all_versions(client, "customers")
    assert result["records"] == {"sales": 20, "customers": 7}
    assert result["pages_by_resource"] == {"sales": 7, "customers": 3}
    assert result["pages"] == 10
    assert result["cursors"] == store.cursors()
    assert result["cursors"]["sales"] == max(v for _, v in all_versions(client, "sales"))
    assert result["api"] == {"requests": 12, "rate_limited": 0, "retries": 0}  # 10 pages + 2 empty
    assert client.calls[0] == ("/sales", 0, {})
    assert client.calls[1] == ("/customers", 0, {"deleted": "true"})
    amounts = store.read("sales").set_index("id")["amount_cents"]
    assert amounts["s3"] == 350


def test_xcom_payload_is_small_json_following_the_contract(store: OrderStore) -> None:
    result = extract_orders(seeded_client(), store)
    assert {"store", "cursors", "records", "pages", "api"} <= set(result)
    assert set(result["api"]) == {"requests", "rate_limited", "retries"}
    assert set(result["records"]) == {"sales", "customers"}
    assert result["store"] == store.uri
    assert len(json.dumps(result)) < 1000


def test_rerun_without_new_data_changes_nothing(store: OrderStore) -> None:
    client = seeded_client()
    extract_orders(client, store)
    manifest = store.manifest()
    before = store.read("sales")
    client.calls.clear()

    result = extract_orders(client, store)

    assert result["records"] == {"sales": 0, "customers": 0}
    assert result["pages"] == 0
    assert result["cursors"] == {
        "sales": manifest["resources"]["sales"]["cursor"],
        "customers": manifest["resources"]["customers"]["cursor"],
    }
    assert store.manifest() == manifest  # not even a new commit
    pd.testing.assert_frame_equal(store.read("sales"), before)
    assert [c[1] for c in client.calls] == [store.cursor("sales"), store.cursor("customers")]


def test_later_runs_read_only_what_changed_and_keep_every_version(store: OrderStore) -> None:
    client = seeded_client(sales=10, customers=3)
    extract_orders(client, store)
    cursor = store.cursor("sales")

    client.put_sale("s2", amount="99.99", status="VOIDED")  # an edit: new version of an old sale
    client.put_sale("s-new")
    client.put_customer("c1", deleted_at=T0)  # a deletion arrives as a new version
    result = extract_orders(client, store)

    assert result["records"] == {"sales": 2, "customers": 1}
    assert client.calls[-2] == ("/sales", cursor, {})
    assert stored(store, "sales") == all_versions(client, "sales")
    assert stored(store, "customers") == all_versions(client, "customers")
    sales = store.read("sales")
    s2 = sales[sales["id"] == "s2"].sort_values("version")
    assert s2["status"].tolist() == ["CLOSED", "VOIDED"]
    assert s2["amount_cents"].tolist() == [250, 9999]
    customers = store.read("customers")
    assert customers.loc[customers["id"] == "c1", "deleted_at"].notna().sum() == 1


def test_pages_without_version_max_use_the_highest_record_version(store: OrderStore) -> None:
    client = seeded_client(sales=5, customers=1)
    client.omit_version_max = True
    extract_orders(client, store)
    assert store.cursor("sales") == max(v for _, v in all_versions(client, "sales"))


# -- crash safety ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_after", [0, 1, 2, 3, 4, 5, 7, 9])
def test_a_killed_run_resumes_from_the_last_commit_without_loss_or_double_count(
    store: OrderStore, fail_after: int
) -> None:
    client = seeded_client(sales=20, customers=7)  # 7 sales pages, then 3 customer pages
    client.fail_after_pages = fail_after
    client.failure = ProcessKilled
    with pytest.raises(ProcessKilled):
        extract_orders(client, store, commit_every_pages=2)
    # Killed: only whole commits (every 2 pages, and the end of the feed) survive; a buffered
    # page is lost as a whole. The sales feed ends after its 7th page and the empty 8th request.
    committed_sales_pages = 7 if fail_after > 7 else fail_after // 2 * 2
    expected_sales = sorted(all_versions(client, "sales"), key=lambda p: p[1])[: committed_sales_pages * 3]
    assert stored(store, "sales") == set(expected_sales)
    assert store.cursor("sales") == (max(v for _, v in expected_sales) if expected_sales else 0)

    client.fail_after_pages = None
    result = extract_orders(client, store, commit_every_pages=2)

    assert stored(store, "sales") == all_versions(client, "sales")
    assert stored(store, "customers") == all_versions(client, "customers")
    assert result["records"]["sales"] == 20 - len(expected_sales)


@pytest.mark.parametrize("fail_after", [1, 3, 6, 8])
def test_an_api_failure_commits_the_complete_pages_before_raising(store: OrderStore, fail_after: int) -> None:
    client = seeded_client(sales=20, customers=7)
    client.fail_after_pages = fail_after
    with pytest.raises(ApiDown):
        extract_orders(client, store, commit_every_pages=20)
    sales_pages = min(fail_after, 7)
    read_so_far = sorted(all_versions(client, "sales"), key=lambda p: p[1])[: sales_pages * 3]
    assert set(read_so_far) <= stored(store, "sales")
    assert store.cursor("sales") == max(v for _, v in read_so_far)

    client.fail_after_pages = None
    client.put_sale("s5", amount="1.00")  # a change while the run was down
    extract_orders(client, store)
    # The feed shows only current versions: one superseded before it was ever read is not seen.
    current = {(r["id"], r["version"]) for r in client.feed("/sales")}
    assert current <= stored(store, "sales") <= all_versions(client, "sales")
    assert set(read_so_far) <= stored(store, "sales")
    assert stored(store, "customers") == all_versions(client, "customers")


def test_a_crash_while_committing_does_not_advance_the_cursor(
    store: OrderStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = seeded_client(sales=12, customers=2)
    extract_orders(client, store)
    cursor = store.cursor("sales")
    for i in range(6):
        client.put_sale(f"late{i}")

    real_write_json = fileio.write_json

    def failing_manifest_write(url: str, obj: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fileio, "write_json", failing_manifest_write)
    with pytest.raises(OSError, match="disk full"):
        extract_orders(client, store)
    monkeypatch.setattr(fileio, "write_json", real_write_json)
    assert store.cursor("sales") == cursor
    assert not {f"late{i}" for i in range(6)} & {i for i, _ in stored(store, "sales")}

    extract_orders(client, store)
    assert stored(store, "sales") == all_versions(client, "sales")


def test_rereading_already_committed_pages_is_harmless(store: OrderStore) -> None:
    client = seeded_client(sales=9, customers=2)
    extract_orders(client, store)
    # Someone rewound the cursor (or a concurrent run committed late): everything is read again.
    manifest = store.manifest()
    manifest["resources"]["sales"]["cursor"] = 0
    fileio.write_json(store.manifest_url, manifest)
    result = extract_orders(client, store)
    assert result["records"]["sales"] == 9
    assert stored(store, "sales") == all_versions(client, "sales")
    assert len(store.read("sales")) == 9


def test_a_malformed_record_stops_the_run_after_committing_the_pages_before_it(store: OrderStore) -> None:
    client = seeded_client(sales=6, customers=1)
    bad = client.put_sale("s-bad")
    bad["sale_date"] = "sometime last week"
    client.put_sale("s-after")
    with pytest.raises(MalformedRecordError, match="sales record id=s-bad: field 'sale_date'"):
        extract_orders(client, store, commit_every_pages=20)
    assert stored(store, "sales") == {
        p for p in all_versions(client, "sales") if p[0].startswith("s") and p[0][1:].isdigit()
    }
    assert store.cursor("customers") == 0


# -- full refresh, compaction, object storage, logging -----------------------------------------------


def test_full_refresh_rebuilds_the_store_from_scratch(store: OrderStore) -> None:
    client = seeded_client(sales=6, customers=2)
    extract_orders(client, store)
    client.put_sale("s1", amount="5.00")
    extract_orders(client, store)
    assert len(store.read("sales")) == 7  # both versions of s1

    result = extract_orders(client, store, full_refresh=True)

    assert result["full_refresh"] is True
    assert result["started_from"] == {"sales": 0, "customers": 0}
    assert client.calls[-2] == ("/sales", 0, {})
    # Rebuilt from what the API shows now: the superseded version of s1 is gone.
    current = {(r["id"], r["version"]) for r in client.feed("/sales")}
    assert stored(store, "sales") == current
    assert result["records"]["sales"] == 6


def test_compaction_runs_when_segments_pile_up(store: OrderStore) -> None:
    client = seeded_client(sales=30, customers=2)
    result = extract_orders(client, store, commit_every_pages=1, compact_above_segments=4)
    assert result["compacted"] == {"sales": 10}
    assert result["segments"] == {"sales": 1, "customers": 1}
    assert stored(store, "sales") == all_versions(client, "sales")


def test_extraction_into_object_storage() -> None:
    root = f"memory://tier-sync-tests/{uuid.uuid4().hex}/store"
    client = seeded_client(sales=10, customers=4)
    result = extract_orders(client, OrderStore(root), commit_every_pages=1)
    assert result["store"] == root
    client.put_sale("s0", amount="3.00")
    extract_orders(client, OrderStore(root))
    reader = OrderStore(root)  # another worker, same URL
    assert stored(reader, "sales") == all_versions(client, "sales")
    assert stored(reader, "customers") == all_versions(client, "customers")
    fs, path = fileio.filesystem(root)
    fs.rm(path, recursive=True)


def test_progress_and_summary_lines_are_logged(store: OrderStore, caplog: pytest.LogCaptureFixture) -> None:
    client = seeded_client(sales=60, customers=2)
    client.stats.retries = 3  # earlier use of the client is not counted for this run
    with caplog.at_level(logging.INFO, logger="include.tier_sync.extract"):
        result = extract_orders(client, store)
    messages = [r.getMessage() for r in caplog.records]
    assert "sales: 10 pages, 30 records read" in messages
    assert any(m.startswith("sales: 20 pages, 60 records read; cursor 0 -> ") for m in messages)
    summary = [m for m in messages if m.startswith("extract_orders:")]
    assert len(summary) == 1
    assert "60 sales and 2 customer records in 21 pages; 23 API requests, 0 x 429, 0 retries" in summary[0]
    assert result["api"]["retries"] == 0
    assert not any("example.org" in m for m in messages)
