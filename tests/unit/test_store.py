"""The order store: upsert of versions, manifest as commit point, compaction, fsspec, row parsing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync import fileio
from include.tier_sync.store import (
    CUSTOMERS_COLUMNS,
    SALES_COLUMNS,
    ConcurrentWriteError,
    MalformedRecordError,
    OrderStore,
    StoreError,
    customer_to_row,
    sale_to_row,
)

pytestmark = pytest.mark.unit

T0 = "2025-11-20T02:40:51+00:00"


def raw_sale(sid: str, version: int, amount: str = "10.00", **extra: Any) -> dict[str, Any]:
    sale: dict[str, Any] = {
        "id": sid,
        "customer_id": "c-1",
        "status": "CLOSED",
        "sale_date": T0,
        "created_at": T0,
        "updated_at": T0,
        "deleted_at": None,
        "total_price_incl": Decimal(amount),
        "version": version,
    }
    sale.update(extra)
    return sale


def raw_customer(cid: str, version: int, **extra: Any) -> dict[str, Any]:
    customer: dict[str, Any] = {
        "id": cid,
        "customer_code": f"code-{cid}",
        "first_name": "Mia",
        "last_name": "Tane",
        "name": "Mia Tane",
        "email": "mia@example.org",
        "phone": None,
        "mobile": "+64 21 555 0101",
        "enable_loyalty": True,
        "customer_group_id": "g-all",
        "created_at": T0,
        "updated_at": T0,
        "deleted_at": None,
        "version": version,
    }
    customer.update(extra)
    return customer


def sale_rows(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [sale_to_row(raw_sale(sid, v)) for sid, v in pairs]


def keys(df: pd.DataFrame) -> set[tuple[str, int]]:
    return {(str(i), int(v)) for i, v in zip(df["id"], df["version"], strict=True)}


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


def segment_files(store: OrderStore, resource: str = "sales") -> list[str]:
    return fileio.listdir(fileio.join(store.uri, "segments", resource))


# -- basic contract ----------------------------------------------------------------------------------


def test_empty_store_has_zero_cursors_and_typed_empty_frames(store: OrderStore) -> None:
    assert store.cursor("sales") == 0
    assert store.cursor("customers") == 0
    sales = store.read("sales")
    customers = store.read("customers")
    assert list(sales.columns) == list(SALES_COLUMNS)
    assert list(customers.columns) == list(CUSTOMERS_COLUMNS)
    assert len(sales) == 0 and len(customers) == 0
    assert str(sales["sale_date"].dtype) == "datetime64[us, UTC]"
    assert str(sales["amount_cents"].dtype) == "int64"


def test_columns_and_dtypes_follow_the_contract(store: OrderStore) -> None:
    store.append("sales", [sale_to_row(raw_sale("s1", 5, customer_id=None, deleted_at=T0))], cursor=5)
    store.append("customers", [customer_to_row(raw_customer("c1", 6, enable_loyalty=None))], cursor=6)
    sales = store.read("sales")
    customers = store.read("customers")
    assert list(sales.columns) == list(SALES_COLUMNS)
    assert list(customers.columns) == list(CUSTOMERS_COLUMNS)
    for col in ("sale_date", "created_at", "updated_at", "deleted_at"):
        assert str(sales[col].dtype) == "datetime64[us, UTC]"
    for col in ("created_at", "updated_at", "deleted_at"):
        assert str(customers[col].dtype) == "datetime64[us, UTC]"
    assert str(sales["amount_cents"].dtype) == "int64"
    assert str(sales["version"].dtype) == "int64"
    assert str(customers["enable_loyalty"].dtype) == "bool"
    row = sales.iloc[0]
    assert row["id"] == "s1" and pd.isna(row["customer_id"]) and pd.isna(row["state"])
    assert row["amount_cents"] == 1000
    assert row["sale_date"] == pd.Timestamp("2025-11-20T02:40:51Z")
    assert row["deleted_at"] == pd.Timestamp("2025-11-20T02:40:51Z")
    assert not customers.iloc[0]["enable_loyalty"]
    assert pd.isna(customers.iloc[0]["deleted_at"])


def test_unknown_resource_is_refused(store: OrderStore) -> None:
    with pytest.raises(StoreError, match="unknown resource"):
        store.cursor("products")


# -- upsert of versions ------------------------------------------------------------------------------


def test_every_version_is_kept_and_identical_versions_are_deduplicated(store: OrderStore) -> None:
    store.append("sales", sale_rows(("a", 1), ("b", 2), ("a", 3), ("a", 3)), cursor=3)
    # A re-read overlapping the committed range (e.g. after a crash) plus one genuinely new version.
    store.append("sales", sale_rows(("b", 2), ("a", 3), ("a", 7)), cursor=7)
    df = store.read("sales")
    assert len(df) == 4
    assert keys(df) == {("a", 1), ("b", 2), ("a", 3), ("a", 7)}
    assert sorted(df.loc[df["id"] == "a", "version"]) == [1, 3, 7]
    assert store.cursor("sales") == 7


def test_dedupe_keeps_the_last_written_row_of_an_id_version(store: OrderStore) -> None:
    store.append("sales", [sale_to_row(raw_sale("a", 4, amount="1.00"))], cursor=4)
    store.append("sales", [sale_to_row(raw_sale("a", 4, amount="2.00"))], cursor=4)
    df = store.read("sales")
    assert df["amount_cents"].tolist() == [200]


def test_customer_ids_read_as_dictionaries_from_old_and_new_segments(
    store: OrderStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sales segments keep customer_id as a Parquet dictionary (more distinct ids than Parquet's
    default 1 MB dictionary page holds); a store whose older segments were written plain (before
    that) reads the same rows, with or without asking for dictionaries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from include.tier_sync import store as store_module

    n = 40_000  # 40,000 distinct 36-character ids: a 1.4 MB dictionary
    ids = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(n)]
    with monkeypatch.context() as old:  # a segment as main wrote it
        old.setattr(store_module, "_DICTIONARY_COLUMNS", {})
        store.append("sales", [sale_to_row(raw_sale(f"s{i}", i + 1, customer_id=ids[i])) for i in range(n)], cursor=n)
    store.append(
        "sales", [sale_to_row(raw_sale(f"t{i}", n + i + 1, customer_id=ids[-1 - i])) for i in range(n)], cursor=2 * n
    )
    plain = store.read_table("sales")
    as_dict = store.read_table("sales", dictionary=("status", "state", "customer_id"))
    assert pa.types.is_dictionary(as_dict.schema.field("customer_id").type)
    assert as_dict.column("customer_id").cast(pa.string()).to_pylist() == plain.column("customer_id").to_pylist()
    assert sorted(plain.column("customer_id").to_pylist()) == sorted(ids + ids)
    newest = sorted(segment_files(store))[-1]
    fs, path = fileio.filesystem(fileio.join(store.uri, "segments", "sales", newest))
    with fs.open(path, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata.row_group(0)
        names = [meta.column(i).path_in_schema for i in range(meta.num_columns)]
        assert meta.column(names.index("customer_id")).has_dictionary_page
        assert not meta.column(names.index("id")).has_dictionary_page  # unique per sale: plain


def test_resources_are_independent(store: OrderStore) -> None:
    store.append("sales", sale_rows(("s", 10)), cursor=10)
    store.append("customers", [customer_to_row(raw_customer("c", 11))], cursor=11)
    assert store.cursors() == {"sales": 10, "customers": 11}
    assert keys(store.read("sales")) == {("s", 10)}
    assert keys(store.read("customers")) == {("c", 11)}


def test_cursor_never_moves_backwards(store: OrderStore) -> None:
    store.append("sales", sale_rows(("a", 9)), cursor=9)
    store.append("sales", sale_rows(("b", 4)), cursor=4)
    assert store.cursor("sales") == 9
    assert keys(store.read("sales")) == {("a", 9), ("b", 4)}


def test_an_empty_append_can_still_advance_the_cursor(store: OrderStore) -> None:
    store.append("sales", [], cursor=12)
    assert store.cursor("sales") == 12
    assert store.segments("sales") == []


def test_append_writes_one_new_segment_and_never_rewrites_old_ones(store: OrderStore) -> None:
    store.append("sales", sale_rows(*[(f"s{i}", i) for i in range(1, 101)]), cursor=100)
    first = segment_files(store)
    before = fileio.read_bytes(fileio.join(store.uri, "segments", "sales", first[0]))
    store.append("sales", sale_rows(("x", 101)), cursor=101)
    after = segment_files(store)
    assert len(after) == 2 and first[0] in after
    assert fileio.read_bytes(fileio.join(store.uri, "segments", "sales", first[0])) == before
    assert [s["rows"] for s in store.segments("sales")] == [100, 1]


# -- the manifest is the commit point ----------------------------------------------------------------


def test_a_segment_not_in_the_manifest_is_invisible(store: OrderStore, tmp_path: Path) -> None:
    store.append("sales", sale_rows(("a", 1)), cursor=1)
    # A valid segment from a writer that crashed before committing: on disk, never named.
    other = OrderStore(tmp_path / "other")
    other.append("sales", sale_rows(("ghost", 2)), cursor=2)
    ghost = other.segments("sales")[0]["name"]
    data = fileio.read_bytes(fileio.join(other.uri, "segments", "sales", ghost))
    fileio.write_bytes(fileio.join(store.uri, "segments", "sales", "00000099-deadbeef0000.parquet"), data)
    assert len(segment_files(store)) == 2
    assert keys(store.read("sales")) == {("a", 1)}
    assert store.cursor("sales") == 1


def test_crash_between_segment_write_and_manifest_commit(
    store: OrderStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append("sales", sale_rows(("a", 1)), cursor=1)

    def power_cut(url: str, obj: Any) -> None:
        raise OSError("simulated crash while writing the manifest")

    monkeypatch.setattr(fileio, "write_json", power_cut)
    with pytest.raises(OSError, match="simulated crash"):
        store.append("sales", sale_rows(("b", 2)), cursor=2)
    monkeypatch.undo()
    assert len(segment_files(store)) == 2  # the orphan exists on disk ...
    assert keys(store.read("sales")) == {("a", 1)}  # ... but not for readers
    assert store.cursor("sales") == 1
    assert store.collect_garbage() == 1
    assert len(segment_files(store)) == 1


def test_a_second_writer_is_refused_instead_of_losing_data(store: OrderStore) -> None:
    store.append("sales", sale_rows(("a", 1)), cursor=1)
    first, second = OrderStore(store.uri), OrderStore(store.uri)
    assert first.cursor("sales") == second.cursor("sales") == 1
    first.append("sales", sale_rows(("b", 2)), cursor=2)
    with pytest.raises(ConcurrentWriteError, match="another writer committed"):
        second.append("sales", sale_rows(("b", 2), ("c", 3)), cursor=3)
    with pytest.raises(ConcurrentWriteError):
        second.compact()
    assert keys(store.read("sales")) == {("a", 1), ("b", 2)}
    assert store.cursor("sales") == 2
    # Having re-read its cursor, the second writer may go on.
    assert second.cursor("sales") == 2
    second.append("sales", sale_rows(("c", 3)), cursor=3)
    assert keys(store.read("sales")) == {("a", 1), ("b", 2), ("c", 3)}


def test_foreign_manifest_is_refused(store: OrderStore) -> None:
    fileio.write_json(store.manifest_url, {"hello": "world"})
    with pytest.raises(StoreError, match="not an order-store manifest"):
        store.read("sales")


# -- reset and compaction ----------------------------------------------------------------------------


def test_reset_empties_the_store_and_leaves_old_segments_for_gc(store: OrderStore) -> None:
    store.append("sales", sale_rows(("a", 1)), cursor=1)
    store.append("customers", [customer_to_row(raw_customer("c", 2))], cursor=2)
    store.reset()
    assert store.cursors() == {"sales": 0, "customers": 0}
    assert len(store.read("sales")) == 0 and len(store.read("customers")) == 0
    assert len(segment_files(store)) == 1
    store.append("sales", sale_rows(("b", 3)), cursor=3)
    assert keys(store.read("sales")) == {("b", 3)}
    store.compact()
    assert segment_files(store) == [store.segments("sales")[0]["name"]]


def test_compaction_preserves_contents_and_cursors(store: OrderStore) -> None:
    for i in range(1, 8):
        store.append("sales", sale_rows((f"s{i % 3}", i), (f"s{i % 3}", i)), cursor=i)
    store.append("sales", sale_rows(("s1", 4), ("s9", 5)), cursor=7)  # overlaps earlier segments
    store.append("customers", [customer_to_row(raw_customer("c", 8))], cursor=8)
    store.append("customers", [customer_to_row(raw_customer("c", 9))], cursor=9)
    before_sales = store.read("sales").sort_values(["id", "version"]).reset_index(drop=True)
    before_customers = store.read("customers").sort_values(["id", "version"]).reset_index(drop=True)
    cursors = store.cursors()

    merged = store.compact()

    assert merged == {"sales": 8, "customers": 2}
    assert len(store.segments("sales")) == 1 and len(store.segments("customers")) == 1
    assert len(segment_files(store, "sales")) == 1
    assert store.cursors() == cursors
    after_sales = store.read("sales").sort_values(["id", "version"]).reset_index(drop=True)
    after_customers = store.read("customers").sort_values(["id", "version"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(after_sales, before_sales)
    pd.testing.assert_frame_equal(after_customers, before_customers)
    assert len(after_sales) == 8  # seven distinct versions plus s9@5
    assert store.compact() == {}


# -- raw API dict -> row -----------------------------------------------------------------------------


def test_amounts_are_exact_decimals_rounded_half_up() -> None:
    assert sale_to_row(raw_sale("s", 1, amount="1499.995"))["amount_cents"] == 150000
    assert sale_to_row(raw_sale("s", 1, amount="-59.005"))["amount_cents"] == -5901
    fallback = raw_sale("s", 1)
    fallback.pop("total_price_incl")
    fallback.update(total_price=Decimal("40.001"), total_tax=Decimal("6.004"))
    assert sale_to_row(fallback)["amount_cents"] == 4601


def test_timestamps_are_utc_in_both_spellings_and_null_is_none() -> None:
    row = sale_to_row(
        raw_sale(
            "s",
            1,
            sale_date="2025-11-20T02:40:51Z",
            created_at="2025-11-20T15:40:51+13:00",
            updated_at="2025-11-20 02:40:51",
            deleted_at=None,
        )
    )
    expected = datetime(2025, 11, 20, 2, 40, 51, tzinfo=UTC)
    assert row["sale_date"] == expected and row["sale_date"].utcoffset().total_seconds() == 0
    assert row["created_at"] == expected and row["created_at"].tzinfo == UTC
    assert row["updated_at"] == expected
    assert row["deleted_at"] is None
    missing = raw_sale("s", 1)
    del missing["sale_date"]
    assert sale_to_row(missing)["sale_date"] is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": None}, "id"),
        ({"id": ""}, "id"),
        ({"version": None}, "version"),
        ({"version": "12"}, "version"),
        ({"version": True}, "version"),
        ({"version": Decimal("1.5")}, "version"),
        ({"sale_date": "20/11/2025"}, "sale_date"),
        ({"deleted_at": 12345}, "deleted_at"),
        ({"total_price_incl": "lots"}, "total_price_incl"),
        ({"total_price_incl": None, "total_price": "n/a"}, "total_price/total_tax"),
        ({"customer_id": {"id": "x"}}, "customer_id"),
    ],
)
def test_malformed_sales_name_resource_id_and_field(change: dict[str, Any], field: str) -> None:
    raw = raw_sale("sale-42", 7)
    raw.update(change)
    with pytest.raises(MalformedRecordError) as info:
        sale_to_row(raw)
    err = info.value
    assert err.resource == "sales" and err.field == field
    assert f"field {field!r}" in str(err)
    if field != "id":
        assert err.record_id == "sale-42" and "sale-42" in str(err)


def test_malformed_customer_messages_carry_no_personal_data() -> None:
    raw = raw_customer("cust-1", 3, enable_loyalty="yes", updated_at="not a date")
    with pytest.raises(MalformedRecordError) as info:
        customer_to_row(raw)
    message = str(info.value)
    assert "customers" in message and "cust-1" in message and "enable_loyalty" in message
    for pii in ("Mia", "Tane", "mia@example.org", "+64", "yes"):
        assert pii not in message
    bad_ts = raw_customer("cust-2", 3, email="x@y.z", created_at="yesterday")
    with pytest.raises(MalformedRecordError, match="created_at") as info2:
        customer_to_row(bad_ts)
    assert "x@y.z" not in str(info2.value) and "yesterday" not in str(info2.value)


def test_customer_row_defaults_and_types() -> None:
    raw = raw_customer("c", 5, customer_code=1234)
    del raw["enable_loyalty"]
    del raw["mobile"]
    row = customer_to_row(raw)
    assert row["enable_loyalty"] is False
    assert row["customer_code"] == "1234"
    assert row["mobile"] is None
    assert set(row) == set(CUSTOMERS_COLUMNS)
    assert set(sale_to_row(raw_sale("s", 1))) == set(SALES_COLUMNS)


def test_local_root_may_be_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = OrderStore("rel/store")
    store.append("sales", sale_rows(("a", 1)), cursor=1)
    assert os.path.isfile(tmp_path / "rel" / "store" / "manifest.json")
    assert store.uri == str(tmp_path / "rel" / "store")


# -- amounts (issue 13) ------------------------------------------------------------------------------


def _without_amounts(raw: dict[str, Any], *, nulls: bool) -> dict[str, Any]:
    raw.pop("total_price_incl", None)
    if nulls:
        raw.update(total_price_incl=None, total_price=None, total_tax=None)
    return raw


@pytest.mark.parametrize("nulls", [False, True], ids=["absent", "null"])
def test_finished_sale_without_any_amount_field_is_malformed_not_zero(nulls: bool) -> None:
    raw = _without_amounts(raw_sale("sale-77", 3), nulls=nulls)
    with pytest.raises(MalformedRecordError) as info:
        sale_to_row(raw)
    err = info.value
    assert err.resource == "sales" and err.record_id == "sale-77"
    assert err.field == "total_price_incl/total_price/total_tax"
    assert "id=sale-77" in str(err) and "finished sale" in str(err)
    # `state` stands in for an empty status, so a closed state without amounts is refused too ...
    closed_state = _without_amounts(raw_sale("sale-78", 3, status=None, state="closed"), nulls=nulls)
    with pytest.raises(MalformedRecordError, match="id=sale-78"):
        sale_to_row(closed_state)
    # ... while a parked sale, which never counts, may come without totals.
    parked = _without_amounts(raw_sale("sale-79", 3, status="SAVED"), nulls=nulls)
    assert sale_to_row(parked)["amount_cents"] == 0


def test_huge_and_non_finite_amounts_are_malformed_records_not_overflow() -> None:
    huge_or_not_finite: list[Any] = [
        Decimal("1E+20"),
        Decimal("-1E+20"),
        Decimal("1E+999999"),
        "1E+20",
        1e20,
        10**30,
        Decimal("100000000000.00"),  # the hard ceiling, $100,000,000,000.00
        Decimal("99999999999.995"),  # rounds up to it
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        float("nan"),
        float("inf"),
        "Infinity",
    ]
    for value in huge_or_not_finite:
        with pytest.raises(MalformedRecordError) as info:
            sale_to_row({**raw_sale("sale-big", 2), "total_price_incl": value})
        assert info.value.record_id == "sale-big" and info.value.field == "total_price_incl", value
    for price, tax in ((Decimal("1E+20"), Decimal(0)), (Decimal("9E+999999"), Decimal("9E+999999"))):
        raw = {**raw_sale("sale-big", 2), "total_price_incl": None, "total_price": price, "total_tax": tax}
        with pytest.raises(MalformedRecordError, match="id=sale-big: field 'total_price/total_tax'"):
            sale_to_row(raw)
    # Just under the ceiling is stored exactly (plausibility is the engine's, configurable, call).
    assert sale_to_row(raw_sale("s", 1, amount="99999999999.99"))["amount_cents"] == 9_999_999_999_999


def test_text_columns_can_be_read_as_dictionaries(store: OrderStore) -> None:
    """compute_tiers reads status, state and customer_id as dictionaries: the same values, with the
    overlapping segments' dedupe still applied; a column that is not text is refused."""
    import pyarrow as pa

    store.append("sales", sale_rows(("a", 1), ("b", 2)), cursor=2)
    store.append("sales", sale_rows(("b", 2), ("c", 3)), cursor=3)  # overlaps: deduplicated
    plain = store.read_table("sales")
    coded = store.read_table("sales", dictionary=("status", "customer_id"))
    assert pa.types.is_dictionary(coded.schema.field("status").type)
    assert pa.types.is_dictionary(coded.schema.field("customer_id").type)
    assert coded.schema.field("id").type == pa.string()
    decoded = coded.cast(plain.schema)
    assert sorted(decoded.to_pylist(), key=str) == sorted(plain.to_pylist(), key=str)
    assert len(coded) == 3
    with pytest.raises(StoreError, match="version is not a text column"):
        store.read_table("sales", dictionary=("version",))


def test_each_piece_can_be_transformed_as_it_is_read(store: OrderStore) -> None:
    """read_table(each=...) sees every piece (the overlapping segments once, deduplicated) and
    returns what it made of them: compute_tiers turns customer ids into positions that way."""
    import pyarrow as pa

    store.append("sales", sale_rows(("a", 1), ("b", 2)), cursor=2)
    store.append("sales", sale_rows(("c", 3)), cursor=3)
    store.append("sales", sale_rows(("c", 3), ("d", 4)), cursor=4)  # overlaps the one before
    seen: list[int] = []

    def tag(piece: pa.Table) -> pa.Table:
        seen.append(piece.num_rows)
        return piece.set_column(1, "customer_id", pa.array(["x"] * piece.num_rows))

    table = store.read_table("sales", each=tag)
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c", "d"]
    assert set(table.column("customer_id").to_pylist()) == {"x"}
    assert sum(seen) == 4
    assert store.read_table("sales", each=tag).num_rows == 4
