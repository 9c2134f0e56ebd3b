"""The order store on S3: the manifest commit is a conditional PUT, a real compare-and-swap (issue 13).

Why: on object storage the commit was check-then-act, so a writer whose re-check passed just before
another writer committed overwrote that commit and lost its segment. On S3 each manifest PUT now
carries If-Match (the object ETag of the manifest the commit was built on) or If-None-Match '*'
(the first manifest), and S3 refuses the loser. These tests run the store against a real S3 API:
moto's server on a free loopback port, reached by s3fs through AWS_ENDPOINT_URL, as the store
reaches any s3:// data dir (fsspec's url_to_fs, no storage options in the URL).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs

from include.tier_sync import fileio
from include.tier_sync import store as store_module
from include.tier_sync.extract import extract_orders
from include.tier_sync.store import OrderStore, StoreError, sale_to_row
from tests.servers import s3_server
from tests.unit.test_extract import seeded_client, stored
from tests.unit.test_store import keys, raw_sale

pytestmark = pytest.mark.unit


def sale_rows(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [sale_to_row(raw_sale(sid, v)) for sid, v in pairs]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 API on a free loopback port, stopped after the module."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_root(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server; the store's root in it. Credentials and endpoint come
    from the environment, as for a deployment (an instance role or env), never from the URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    bucket = f"tier-sync-{uuid.uuid4().hex[:12]}"
    fileio.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
    yield f"s3://{bucket}/store"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def manifest_puts(s3_root: str) -> list[dict[str, Any]]:
    """The parameters of every PutObject of a manifest.json, as botocore is about to send them."""
    fs = fileio.filesystem(s3_root)[0]
    client = fs.s3  # type: ignore[attr-defined]
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if str(params.get("Key", "")).endswith("/manifest.json"):
            calls.append(dict(params))

    client.meta.events.register("provide-client-params.s3.PutObject", record)
    return calls


def manifest_etag(store: OrderStore) -> str:
    fs, path = fileio.filesystem(store.manifest_url)
    fs.invalidate_cache(path)
    return str(fs.info(path)["ETag"])


def assert_consistent(store: OrderStore, expected: set[tuple[str, int]], cursor: int) -> None:
    """Every segment the manifest names is there and readable, and it holds exactly `expected`."""
    fresh = OrderStore(store.uri)
    for seg in fresh.segments("sales"):
        assert fileio.exists(fresh.segment_url("sales", seg["name"]))
    assert keys(fresh.read("sales")) == expected
    assert fresh.cursor("sales") == cursor


# -- a round trip ------------------------------------------------------------------------------------


def test_a_full_store_round_trip_on_s3_commits_every_manifest_conditionally(
    s3_root: str, manifest_puts: list[dict[str, Any]]
) -> None:
    store = OrderStore(s3_root)
    client = seeded_client(sales=6, customers=3)
    extract_orders(client, store)
    assert stored(store, "sales") == {(r["id"], r["version"]) for r in client.feed("/sales")}
    assert stored(store, "customers") == {(r["id"], r["version"]) for r in client.feed("/customers")}
    client.put_sale("s-new")
    extract_orders(client, store)
    store.compact()
    assert len(store.segments("sales")) == 1
    assert stored(store, "sales") == {(r["id"], r["version"]) for r in client.feed("/sales")}
    other = OrderStore(s3_root)  # a worker on another machine sees every commit
    assert other.cursors() == store.cursors() and keys(other.read("sales")) == keys(store.read("sales"))

    # The first manifest is created only if there is none; every later one replaces exactly the
    # object its commit was built on (the ETag the previous PUT produced).
    assert len(manifest_puts) >= 3
    assert manifest_puts[0].get("IfNoneMatch") == "*" and "IfMatch" not in manifest_puts[0]
    for put in manifest_puts[1:]:
        assert put.get("IfMatch") and "IfNoneMatch" not in put
    assert manifest_puts[-1]["IfMatch"] != manifest_etag(store)  # a new object each commit
    # A full refresh of a readable store replaces exactly the manifest it read, too.
    before = manifest_etag(store)
    assert store.reset() is None
    assert manifest_puts[-1]["IfMatch"] == before and store.cursors() == {"sales": 0, "customers": 0}


# -- two committers ----------------------------------------------------------------------------------


def commit_in_between(store: OrderStore, monkeypatch: pytest.MonkeyPatch, other: Callable[[], None]) -> None:
    """Run `other` right after `store`'s commit has re-checked the manifest and before it writes:
    the window a check-then-act commit leaves open."""
    real = store._manifest_for_write
    fired: list[bool] = []

    def recheck(expected: tuple[int, Any] | None = None) -> dict[str, Any]:
        manifest = real(expected)
        if expected is not None and not fired:  # _commit's re-check, not the read a commit starts from
            fired.append(True)
            other()
        return manifest

    monkeypatch.setattr(store, "_manifest_for_write", recheck)


@pytest.mark.parametrize("existing", [True, False], ids=["replacing-a-manifest", "first-manifest"])
def test_two_committers_on_the_same_manifest_exactly_one_lands(
    s3_root: str, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    if existing:
        OrderStore(s3_root).append("sales", sale_rows(("a", 1)), cursor=1)
    base = {("a", 1)} if existing else set()
    first, second = OrderStore(s3_root), OrderStore(s3_root)
    assert first.cursor("sales") == second.cursor("sales") == (1 if existing else 0)
    commit_in_between(second, monkeypatch, lambda: first.append("sales", sale_rows(("b", 2)), cursor=2))

    with pytest.raises(StoreError) as info:
        second.append("sales", sale_rows(("c", 3)), cursor=3)

    assert type(info.value) is store_module.ConcurrentWriteError
    assert "another writer committed" in str(info.value) and s3_root in str(info.value)
    # The winner's commit is whole; the loser's segment was written but is named by no manifest.
    assert_consistent(first, base | {("b", 2)}, cursor=2)
    assert len(OrderStore(s3_root).segments("sales")) == len(base) + 1
    assert OrderStore(s3_root).collect_garbage(["sales"]) == 1
    assert_consistent(first, base | {("b", 2)}, cursor=2)
    # Having re-read its cursor, the loser goes on without losing anything.
    monkeypatch.undo()
    assert second.cursor("sales") == 2
    second.append("sales", sale_rows(("c", 3)), cursor=3)
    assert_consistent(first, base | {("b", 2), ("c", 3)}, cursor=3)


def test_a_compaction_racing_an_append_loses_and_deletes_nothing(
    s3_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = OrderStore(s3_root)
    writer.append("sales", sale_rows(("a", 1)), cursor=1)
    writer.append("sales", sale_rows(("b", 2)), cursor=2)
    compactor = OrderStore(s3_root)
    commit_in_between(compactor, monkeypatch, lambda: writer.append("sales", sale_rows(("c", 3)), cursor=3))
    with pytest.raises(store_module.ConcurrentWriteError):
        compactor.compact(collect_garbage=False)
    # The compaction's merged segment never became live, and the segments it would have
    # replaced were not deleted: the append's commit stands whole.
    assert_consistent(writer, {("a", 1), ("b", 2), ("c", 3)}, cursor=3)
    assert len(writer.segments("sales")) == 3


# -- stale ETags -------------------------------------------------------------------------------------


def test_a_stale_etag_is_refused_by_the_conditional_write(s3_root: str) -> None:
    url = fileio.join(s3_root, "probe.json")
    first = fileio.write_bytes_if(url, b"one", etag=None)
    with pytest.raises(fileio.WriteConflict):
        fileio.write_bytes_if(url, b"again", etag=None)  # it exists already
    data, tag = fileio.read_bytes_tagged(url)
    assert (data, tag) == (b"one", first)
    second = fileio.write_bytes_if(url, b"two", etag=tag)
    with pytest.raises(fileio.WriteConflict):
        fileio.write_bytes_if(url, b"three", etag=first)  # stale
    assert fileio.read_bytes_tagged(url) == (b"two", second)
    fileio.filesystem(url)[0].rm_file(fileio.filesystem(url)[1])
    with pytest.raises(fileio.WriteConflict):
        fileio.write_bytes_if(url, b"four", etag=second)  # deleted since it was read
    assert not fileio.exists(url)


def test_a_commit_over_a_manifest_rewritten_since_it_was_read_is_refused(s3_root: str) -> None:
    """The same (generation, etag) passes the store's own re-check, but the bytes are not the ones
    the commit was built on (an edited or restored manifest): S3 refuses the stale ETag."""
    store = OrderStore(s3_root)
    store.append("sales", sale_rows(("a", 1)), cursor=1)
    assert store.cursor("sales") == 1
    rewritten = fileio.read_json(store.manifest_url)
    rewritten["resources"]["sales"]["cursor"] = 7  # someone else's cursor, same token
    fileio.write_json(store.manifest_url, rewritten)

    with pytest.raises(store_module.ConcurrentWriteError):
        store.append("sales", sale_rows(("b", 2)), cursor=2)
    assert fileio.read_json(store.manifest_url) == rewritten
    assert OrderStore(s3_root).cursor("sales") == 7


# -- recovery ----------------------------------------------------------------------------------------


def test_full_refresh_after_a_truncated_manifest_on_s3(
    s3_root: str, manifest_puts: list[dict[str, Any]]
) -> None:
    store = OrderStore(s3_root)
    client = seeded_client(sales=4, customers=2)
    extract_orders(client, store)
    broken = fileio.read_bytes(store.manifest_url)[:40]
    fileio.write_bytes(store.manifest_url, broken)
    with pytest.raises(StoreError) as info:
        extract_orders(client, store)
    assert type(info.value).__name__ == "StoreCorruptError"
    assert store.manifest_url in str(info.value) and "full_refresh=true" in str(info.value)
    manifest_puts.clear()

    result = extract_orders(client, store, full_refresh=True)

    assert result["full_refresh"] is True
    assert stored(store, "sales") == {(r["id"], r["version"]) for r in client.feed("/sales")}
    (folder,) = [n for n in fileio.listdir(store.uri) if n.startswith("damaged-")]
    aside = fileio.join(store.uri, folder)
    assert fileio.read_bytes(fileio.join(aside, "manifest.json")) == broken
    assert len(fileio.listdir(fileio.join(aside, "segments", "sales"))) == 1  # set aside, not lost
    # The new generation's first manifest was created only because none was there any more.
    assert manifest_puts[0].get("IfNoneMatch") == "*"
    assert all(p.get("IfMatch") for p in manifest_puts[1:])


@pytest.mark.parametrize(
    ("root", "conditional"),
    [
        ("s3://bucket/store", True),
        ("/data/store", False),  # the flock instead
        ("file:///data/store", False),
        ("gs://bucket/store", False),
        ("az://container/store", False),
        ("memory://tests/store", False),
    ],
)
def test_only_s3_commits_with_a_conditional_write(root: str, conditional: bool) -> None:
    """gs, az and memory:// keep the optimistic re-check (documented): no conditional write here."""
    assert fileio.has_conditional_write(root) is conditional
    assert OrderStore(root)._conditional is conditional
