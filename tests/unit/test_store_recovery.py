"""The order store when its files are damaged or two writers race (issue 13).

Why: a truncated `manifest.json` raised a bare JSONDecodeError and blocked the documented recovery
(`full_refresh`), a truncated segment a bare ArrowInvalid, and the manifest commit was
check-then-act, so a second writer could overwrite the first one's commit and lose its segment.
Names come from the module at call time so that each case fails on its own on the old code.
"""

from __future__ import annotations

import fcntl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import fileio
from include.tier_sync import store as store_module
from include.tier_sync.extract import extract_orders
from include.tier_sync.store import OrderStore, StoreError, sale_to_row
from tests.unit.test_extract import seeded_client, stored
from tests.unit.test_store import keys, raw_sale

pytestmark = pytest.mark.unit

RECOVERY = "full_refresh=true"


def sale_rows(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [sale_to_row(raw_sale(sid, v)) for sid, v in pairs]


@pytest.fixture(params=["local", "file_url", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OrderStore]:
    if request.param == "local":
        yield OrderStore(tmp_path / "store")
    elif request.param == "file_url":
        yield OrderStore(f"file://{tmp_path}/store")
    else:
        root = f"memory://tier-sync-tests/{uuid.uuid4().hex}/store"
        yield OrderStore(root)
        fs, path = fileio.filesystem(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def assert_corrupt(info: pytest.ExceptionInfo[StoreError], *names: str) -> None:
    """A StoreCorruptError whose message names each of `names` and the recovery."""
    assert type(info.value).__name__ == "StoreCorruptError"
    assert isinstance(info.value, store_module.StoreCorruptError)
    for name in (*names, RECOVERY):
        assert name in str(info.value)


def damaged_folders(store: OrderStore) -> list[str]:
    return [n for n in fileio.listdir(store.uri) if n.startswith("damaged-")]


def two_segments(store: OrderStore) -> tuple[str, str]:
    store.append("sales", sale_rows(("a", 1), ("b", 2)), cursor=2)
    store.append("sales", sale_rows(("c", 3)), cursor=3)
    first, second = (s["name"] for s in store.segments("sales"))
    return first, second


# -- a damaged manifest --------------------------------------------------------------------------------


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_truncate, id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(
            lambda data: data.replace(b'"segments": [', b'"segments": "x", "was": ['), id="bad-shape"
        ),
    ],
)
def test_a_damaged_manifest_raises_a_clear_error_naming_the_file_and_the_recovery(
    store: OrderStore, damage: Any
) -> None:
    two_segments(store)
    fileio.write_bytes(store.manifest_url, damage(fileio.read_bytes(store.manifest_url)))
    for action in (
        lambda: store.read("sales"),
        lambda: store.cursor("sales"),
        lambda: store.append("sales", sale_rows(("d", 4)), cursor=4),
        store.compact,
        store.collect_garbage,
    ):
        with pytest.raises(StoreError) as info:
            action()
        assert_corrupt(info, store.manifest_url)
    assert len(fileio.listdir(fileio.join(store.uri, "segments", "sales"))) == 2  # nothing collected


def test_full_refresh_after_a_corrupt_manifest_starts_afresh_and_keeps_the_damaged_data(
    store: OrderStore,
) -> None:
    client = seeded_client(sales=5, customers=2)
    extract_orders(client, store)
    old_segment = store.segments("sales")[0]["name"]
    segment_bytes = fileio.read_bytes(store.segment_url("sales", old_segment))
    broken = _truncate(fileio.read_bytes(store.manifest_url))
    fileio.write_bytes(store.manifest_url, broken)
    with pytest.raises(StoreError):
        extract_orders(client, store)  # an ordinary run refuses the damaged store

    result = extract_orders(client, store, full_refresh=True)

    assert result["full_refresh"] is True and result["started_from"] == {"sales": 0, "customers": 0}
    assert stored(store, "sales") == {(r["id"], r["version"]) for r in client.feed("/sales")}
    assert store.cursors() == result["cursors"]
    (folder,) = damaged_folders(store)
    aside = fileio.join(store.uri, folder)
    assert fileio.read_bytes(fileio.join(aside, "manifest.json")) == broken
    assert fileio.read_bytes(fileio.join(aside, "segments", "sales", old_segment)) == segment_bytes
    # Later runs, compaction and garbage collection leave the damaged data alone.
    client.put_sale("s-new")
    extract_orders(client, store)
    store.compact()
    store.collect_garbage()
    assert fileio.read_bytes(fileio.join(aside, "segments", "sales", old_segment)) == segment_bytes
    assert damaged_folders(store) == [folder]


def test_reset_of_a_corrupt_store_returns_where_the_damage_went(store: OrderStore) -> None:
    two_segments(store)
    fileio.write_text(store.manifest_url, '{"format": "tier_sync.order_st')
    damaged = store.reset()
    assert damaged is not None and damaged.startswith(fileio.join(store.uri, "damaged-"))
    assert fileio.read_text(fileio.join(damaged, "manifest.json")) == '{"format": "tier_sync.order_st'
    assert len(fileio.listdir(fileio.join(damaged, "segments", "sales"))) == 2
    assert store.cursors() == {"sales": 0, "customers": 0}
    store.append("sales", sale_rows(("z", 9)), cursor=9)
    assert keys(store.read("sales")) == {("z", 9)}
    assert store.reset() is None  # a readable store: nothing is set aside
    assert len(damaged_folders(store)) == 1


# -- a damaged segment ---------------------------------------------------------------------------------


def test_a_truncated_segment_names_the_segment_and_the_recovery(store: OrderStore) -> None:
    good, bad = two_segments(store)
    url = store.segment_url("sales", bad)
    fileio.write_bytes(url, _truncate(fileio.read_bytes(url)))
    with pytest.raises(StoreError) as info:
        store.read("sales")
    assert_corrupt(info, url)
    assert good not in str(info.value)
    with pytest.raises(StoreError) as info:
        store.compact()
    assert_corrupt(info, url)
    # The documented recovery works on it.
    store.reset()
    store.append("sales", sale_rows(("a", 5)), cursor=5)
    assert keys(store.read("sales")) == {("a", 5)}


def test_a_missing_committed_segment_is_named(store: OrderStore) -> None:
    _, bad = two_segments(store)
    store_module._remove(store.segment_url("sales", bad))
    with pytest.raises(StoreError) as info:
        store.read("sales")
    assert_corrupt(info, bad, "missing")


# -- two writers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "file_url"])
def test_two_writers_committing_from_the_same_read_never_lose_a_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`second` has read and checked the manifest and is about to write it when `first`, which read
    the same manifest, commits too. Whoever loses must fail, not overwrite the other's commit."""
    root = str(tmp_path / "store") if kind == "local" else f"file://{tmp_path}/store"
    OrderStore(root).append("sales", sale_rows(("a", 1)), cursor=1)
    first, second = OrderStore(root), OrderStore(root)
    assert first.cursor("sales") == second.cursor("sales") == 1
    outcome: dict[str, Any] = {}
    first_blocked, first_done = threading.Event(), threading.Event()

    def run_first() -> None:
        try:
            first.append("sales", sale_rows(("b", 2)), cursor=2)
            outcome["first"] = "committed"
        except Exception as exc:
            outcome["first"] = exc
        finally:
            first_done.set()

    thread = threading.Thread(target=run_first)
    real_flock, real_write_json = fcntl.flock, fileio.write_json

    def flock(fd: Any, operation: int) -> None:
        if threading.current_thread() is thread:
            first_blocked.set()  # first now waits for the commit lock that second holds
        real_flock(fd, operation)

    def write_json(url: str, obj: Any) -> None:
        if (
            threading.current_thread() is threading.main_thread()
            and not thread.is_alive()
            and not first_done.is_set()
        ):
            thread.start()
            deadline = time.monotonic() + 30
            while not (first_blocked.is_set() or first_done.is_set()) and time.monotonic() < deadline:
                time.sleep(0.002)
        real_write_json(url, obj)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(fileio, "write_json", write_json)
    second.append("sales", sale_rows(("c", 3)), cursor=3)
    thread.join(timeout=30)
    monkeypatch.undo()

    rows = keys(OrderStore(root).read("sales"))
    assert ("c", 3) in rows  # second returned normally: its commit is there
    if outcome["first"] == "committed":
        assert ("b", 2) in rows, "first's commit was overwritten by second"
    assert isinstance(outcome["first"], store_module.ConcurrentWriteError)
    assert "another writer committed" in str(outcome["first"])
    assert rows == {("a", 1), ("c", 3)}
    assert OrderStore(root).cursor("sales") == 3
    # Having re-read its cursor, the loser goes on without losing anything.
    assert first.cursor("sales") == 3
    first.append("sales", sale_rows(("b", 2)), cursor=3)
    assert keys(OrderStore(root).read("sales")) == {("a", 1), ("b", 2), ("c", 3)}


def test_each_commit_gets_a_new_etag_and_generation(store: OrderStore) -> None:
    store.append("sales", sale_rows(("a", 1)), cursor=1)
    before = store.manifest()
    store.append("sales", sale_rows(("b", 2)), cursor=2)
    after = store.manifest()
    assert after["generation"] == before["generation"] + 1
    assert isinstance(after.get("etag"), str) and after["etag"] != before.get("etag")
