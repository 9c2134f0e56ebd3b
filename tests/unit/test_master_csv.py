"""Master CSV, tier changes, tier history and the compute_tiers task body (reproducibility included)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from include.tier_sync import fileio
from include.tier_sync.clv import compute_customer_metrics
from include.tier_sync.ledger import RunPaths
from include.tier_sync.master_csv import (
    MASTER_COLUMNS,
    build_master,
    compute_tiers,
    div_half_up,
    format_cents_array,
    publish_run,
    to_csv_bytes,
)
from include.tier_sync.runtime import iso
from include.tier_sync.spreadsheet import raw_value
from tests.unit.test_clv import AS_OF, DAY, RULES, customer, customers_df, sale, sales_df

pytestmark = pytest.mark.unit

EXPECTED_HEADER = (
    "Customer ID,Customer Code,Name,Email,Phone,Lifetime Value,Order Count,Avg Order Value,First Order,"
    "Last Order,Days Since Last Order,Purchases Last 30 Days,Loyalty Member,Tier,Previous Tier,"
    "Tier Changed At,Last Updated"
)


class FakeStore:
    """The read side of OrderStore: every stored version as a DataFrame."""

    def __init__(self, sales: pd.DataFrame, customers: pd.DataFrame) -> None:
        self.frames = {"sales": sales, "customers": customers}

    def read(self, resource: str) -> pd.DataFrame:
        return self.frames[resource].copy()


def identity(as_of: datetime, run_id: str | None = None) -> dict[str, Any]:
    return {
        "dag_id": "customer_tier_sync",
        "run_id": run_id or f"scheduled__{iso(as_of)}",
        "logical_date": iso(as_of),
        "as_of": iso(as_of),
    }


def run(
    data_dir: Path,
    store: FakeStore,
    as_of: datetime = AS_OF,
    ident: dict[str, Any] | None = None,
    *,
    validated: bool = True,
) -> dict[str, Any]:
    """compute_tiers, then what the pipeline does once validation has passed (or failed)."""
    paths = RunPaths(str(data_dir), as_of)
    ident = ident or identity(as_of)
    out = compute_tiers(store, paths, ident, RULES)
    fileio.write_json(paths.run_validation_json, {"summary": {"success": validated}})
    out["latest"] = publish_run(paths, ident, out["tier_breakdown"]) if validated else False
    return out


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Parse with the csv module (not pandas) to prove the quoting round-trips; raw values (spreadsheet.raw_value)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return [{k: raw_value(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def by_id(path: str | Path) -> dict[str, dict[str, str]]:
    return {r["Customer ID"]: r for r in read_rows(path)}


def base_store() -> FakeStore:
    t = AS_OF - 10 * DAY
    sales = sales_df(
        sale("s1", "c1", "800.00", t),
        sale("s2", "c2", "20.00", AS_OF - 3 * DAY - timedelta(hours=5)),
        sale("s3", "c2", "10.01", AS_OF - 400 * DAY),
    )
    custs = customers_df(customer("c1"), customer("c2", loyalty=True), customer("c3"))
    return FakeStore(sales, custs)


# --- formatting ----------------------------------------------------------------------------------


def test_money_formatting_and_half_up_average() -> None:
    cents = np.array([0, 5, -5, 150_000, -1234, 100], dtype=np.int64)
    assert format_cents_array(cents).tolist() == ["0.00", "0.05", "-0.05", "1500.00", "-12.34", "1.00"]
    num = np.array([5, 4, 1001, -5, 3000], dtype=np.int64)
    den = np.array([2, 3, 2, 2, 3], dtype=np.int64)
    # 2.5 -> 3, 1.33 -> 1, 500.5 -> 501, -2.5 -> -3 (half away from zero, like money.to_cents), 1000
    assert div_half_up(num, den).tolist() == [3, 1, 501, -3, 1000]


def test_master_columns_and_values(tmp_path: Path) -> None:
    out = run(tmp_path, base_store())
    text = Path(out["master_csv"]).read_text(encoding="utf-8-sig")
    assert text.splitlines()[0] == EXPECTED_HEADER
    assert tuple(EXPECTED_HEADER.split(",")) == MASTER_COLUMNS
    rows = by_id(out["master_csv"])
    assert list(rows) == ["c1", "c2", "c3"]  # sorted by Customer ID
    c1, c2, c3 = rows["c1"], rows["c2"], rows["c3"]
    assert c1["Lifetime Value"] == "800.00"
    assert c1["Tier"] == "Bloom"
    assert c1["Loyalty Member"] == "false"
    assert c1["Customer Code"] == "CODE-c1"
    assert c1["Email"] == "c1@example.com"
    # c2: 20.00 + 10.01 = 30.01 over 2 orders -> 15.005 -> 15.01 (half-up)
    assert c2["Lifetime Value"] == "30.01"
    assert c2["Order Count"] == "2"
    assert c2["Avg Order Value"] == "15.01"
    assert c2["First Order"] == iso(AS_OF - 400 * DAY)
    assert c2["Last Order"] == "2026-11-21T21:00:00Z"
    assert c2["Days Since Last Order"] == "3"  # 3 days 5 hours -> 3 whole days
    assert c2["Purchases Last 30 Days"] == "1"
    assert c2["Tier"] == "Seed"
    assert c2["Loyalty Member"] == "true"
    # c3: no purchase
    assert c3["Tier"] == "None"
    assert c3["Lifetime Value"] == "0.00"
    assert c3["Order Count"] == "0"
    assert c3["Avg Order Value"] == c3["First Order"] == c3["Last Order"] == c3["Days Since Last Order"] == ""
    for row in rows.values():
        assert row["Last Updated"] == "2026-11-25T02:00:00Z"
    assert out["total_customers"] == 3
    assert out["tier_breakdown"] == {
        "Evergreen": 0,
        "Bloom": 1,
        "Sprout": 0,
        "Seed": 1,
        "First Time Buyer": 0,
        "None": 1,
    }
    json.dumps(out)  # an XCom must be JSON


def test_none_tier_survives_pandas_reading_with_keep_default_na(tmp_path: Path) -> None:
    out = run(tmp_path, base_store())
    df = pd.read_csv(out["master_csv"], dtype=str, keep_default_na=False, encoding="utf-8-sig")
    assert df.set_index("Customer ID").loc["c3", "Tier"] == "None"


def test_unicode_and_csv_hostile_names_round_trip(tmp_path: Path) -> None:
    hostile = {
        "c1": 'Smith, "Smithy" Jr.',
        "c2": "Zoë Nguyễn 李小龍 🌱",
        "c3": "Line one\nline two",
        "c4": "Carriage\rreturn",
        "c5": "=SUM(A1:A2)",
        "c6": "  padded  ",
    }
    custs = customers_df(*(customer(cid, name=name, email=f'{cid}"@x.com') for cid, name in hostile.items()))
    out = run(tmp_path, FakeStore(sales_df(), custs))
    rows = by_id(out["master_csv"])
    assert rows["c1"]["Name"] == 'Smith, "Smithy" Jr.'
    assert rows["c2"]["Name"] == "Zoë Nguyễn 李小龍 🌱"
    assert rows["c3"]["Name"] == "Line one\nline two"
    assert rows["c4"]["Name"] == "Carriage\nreturn"  # a bare CR is written as LF (documented)
    assert rows["c5"]["Name"] == "=SUM(A1:A2)"
    assert rows["c6"]["Name"] == "padded"
    assert rows["c1"]["Email"] == 'c1"@x.com'
    assert len(rows) == 6
    raw = Path(out["master_csv"]).read_bytes()
    assert b"\r" not in raw
    assert b'"Smith, ""Smithy"" Jr."' in raw
    raw.decode("utf-8")


# --- previous tier, changes, history --------------------------------------------------------------


def test_previous_tier_and_tier_changed_at_are_carried(tmp_path: Path) -> None:
    day1, day2, day3 = AS_OF, AS_OF + DAY, AS_OF + 2 * DAY
    t = AS_OF - 10 * DAY
    custs = customers_df(customer("c1"), customer("c2"), customer("c3"))
    store = FakeStore(sales_df(sale("s1", "c1", "300.00", t), sale("s2", "c2", "5.00", t)), custs)
    run(tmp_path, store, day1)
    first = by_id(RunPaths(str(tmp_path), day1).run_master_csv)
    assert first["c1"]["Previous Tier"] == "" and first["c1"]["Tier Changed At"] == iso(day1)
    assert first["c3"]["Tier"] == "None" and first["c3"]["Tier Changed At"] == ""  # None is no change

    # Day 2: c1 climbs to Bloom, c2 unchanged, c4 is new with a purchase.
    store = FakeStore(
        sales_df(
            sale("s1", "c1", "300.00", t),
            sale("s3", "c1", "500.00", day2 - DAY),
            sale("s2", "c2", "5.00", t),
            sale("s4", "c4", "1.00", day2 - DAY),
        ),
        customers_df(customer("c1"), customer("c2"), customer("c3"), customer("c4", created_at=day1)),
    )
    out = run(tmp_path, store, day2)
    second = by_id(out["master_csv"])
    assert (second["c1"]["Previous Tier"], second["c1"]["Tier"], second["c1"]["Tier Changed At"]) == (
        "Sprout",
        "Bloom",
        iso(day2),
    )
    assert (second["c2"]["Previous Tier"], second["c2"]["Tier Changed At"]) == ("First Time Buyer", iso(day1))
    assert (second["c4"]["Previous Tier"], second["c4"]["Tier Changed At"]) == ("", iso(day2))
    changes = read_rows(Path(out["run_dir"]) / "tier_changes.csv")
    assert changes == [
        {"Customer ID": "c1", "From": "Sprout", "To": "Bloom", "as_of": iso(day2)},
        {"Customer ID": "c4", "From": "", "To": "First Time Buyer", "as_of": iso(day2)},
    ]
    assert out["changes"] == 2

    # Day 3: nothing new; c1's change date is carried.
    out = run(tmp_path, store, day3)
    third = by_id(out["master_csv"])
    assert (third["c1"]["Previous Tier"], third["c1"]["Tier Changed At"]) == ("Bloom", iso(day2))
    assert out["changes"] == 0


def test_tier_history_upserts_by_as_of_and_stays_sorted(tmp_path: Path) -> None:
    store = base_store()
    run(tmp_path, store, AS_OF + DAY)
    run(tmp_path, store, AS_OF)  # a backfill of an earlier day
    run(tmp_path, store, AS_OF + DAY)  # a re-run: replaces, does not append
    rows = read_rows(tmp_path / "tier_history.csv")
    assert len(rows) == 12  # 2 runs x 6 tiers, zeros included
    assert [r["as_of"] for r in rows] == [iso(AS_OF)] * 6 + [iso(AS_OF + DAY)] * 6
    assert [r["tier"] for r in rows[:6]] == [
        "Evergreen",
        "Bloom",
        "Sprout",
        "Seed",
        "First Time Buyer",
        "None",
    ]
    assert [r["count"] for r in rows[:6]] == ["0", "1", "0", "1", "0", "1"]
    assert rows[0]["run_id"] == f"scheduled__{iso(AS_OF)}"


def test_rerun_under_a_new_run_id_leaves_tier_history_byte_identical(tmp_path: Path) -> None:
    """`airflow dags test` or a manual re-trigger gives the same as_of a new run id: no churn."""
    store = base_store()
    run(tmp_path, store, AS_OF)
    before = (tmp_path / "tier_history.csv").read_bytes()
    other = {**identity(AS_OF), "run_id": "manual__2026-11-25T16:00:00+00:00"}
    run(tmp_path, store, AS_OF, other)
    assert (tmp_path / "tier_history.csv").read_bytes() == before
    # Different counts for the same day do replace the rows, under the new run id.
    changed = FakeStore(sales_df(sale("s9", "c1", "2000.00", AS_OF - DAY)), base_store().read("customers"))
    run(tmp_path, changed, AS_OF, other)
    rows = read_rows(tmp_path / "tier_history.csv")
    assert {r["run_id"] for r in rows} == {"manual__2026-11-25T16:00:00+00:00"}


def test_a_run_that_failed_validation_is_never_published_nor_anyone_s_previous_run(tmp_path: Path) -> None:
    good = FakeStore(sales_df(sale("s1", "c1", "300.00", AS_OF - 3 * DAY)), customers_df(customer("c1")))
    run(tmp_path, good, AS_OF)  # c1: Sprout, validated, published
    published = (tmp_path / "customer_analytics_master.csv").read_bytes()
    history = (tmp_path / "tier_history.csv").read_bytes()

    bad = FakeStore(sales_df(sale("s1", "c1", "3000.00", AS_OF - 3 * DAY)), customers_df(customer("c1")))
    out = run(tmp_path, bad, AS_OF + DAY, validated=False)
    assert out["latest"] is False
    assert (tmp_path / "customer_analytics_master.csv").read_bytes() == published
    assert (tmp_path / "tier_history.csv").read_bytes() == history
    assert json.loads((tmp_path / "latest.json").read_text())["as_of"] == iso(AS_OF)

    # The next day compares with the last *validated* run, not with the failed one.
    out = run(tmp_path, good, AS_OF + 2 * DAY)
    row = by_id(out["master_csv"])["c1"]
    assert (row["Previous Tier"], row["Tier"], row["Tier Changed At"]) == ("Sprout", "Sprout", iso(AS_OF))


def test_latest_copies_are_not_overwritten_by_an_older_as_of(tmp_path: Path) -> None:
    t = AS_OF - 10 * DAY
    new = FakeStore(sales_df(sale("s1", "c1", "2000.00", t)), customers_df(customer("c1")))
    old = FakeStore(sales_df(sale("s1", "c1", "20.00", t)), customers_df(customer("c1")))
    out = run(tmp_path, new, AS_OF)
    assert out["latest"] is True
    latest_bytes = (tmp_path / "customer_analytics_master.csv").read_bytes()
    assert latest_bytes == Path(out["master_csv"]).read_bytes()
    out = run(tmp_path, old, AS_OF - DAY)  # backfill
    assert out["latest"] is False
    assert (tmp_path / "customer_analytics_master.csv").read_bytes() == latest_bytes
    assert json.loads((tmp_path / "latest.json").read_text())["as_of"] == iso(AS_OF)
    assert by_id(out["master_csv"])["c1"]["Tier"] == "First Time Buyer"  # its own run folder is written
    out = run(tmp_path, old, AS_OF)  # a re-run of the newest as_of does replace them
    assert out["latest"] is True
    assert by_id(tmp_path / "customer_analytics_master.csv")["c1"]["Tier"] == "First Time Buyer"
    assert by_id(tmp_path / "tier_changes.csv") == by_id(Path(out["run_dir"]) / "tier_changes.csv")


def test_previous_run_is_the_one_before_this_key_not_the_newest_file(tmp_path: Path) -> None:
    t = AS_OF - 30 * DAY
    custs = customers_df(customer("c1"))
    run(tmp_path, FakeStore(sales_df(sale("s1", "c1", "300.00", t)), custs), AS_OF - DAY)  # Sprout
    run(tmp_path, FakeStore(sales_df(sale("s1", "c1", "2000.00", t)), custs), AS_OF + DAY)  # Evergreen
    out = run(tmp_path, FakeStore(sales_df(sale("s1", "c1", "900.00", t)), custs), AS_OF)  # Bloom
    row = by_id(out["master_csv"])["c1"]
    assert (row["Previous Tier"], row["Tier"]) == ("Sprout", "Bloom")
    assert out["previous_run"].endswith("runs/20261124T020000Z/published/customer_analytics_master.csv")


# --- reproducibility -----------------------------------------------------------------------------


def test_rerun_is_byte_identical_whatever_happened_after_as_of(tmp_path: Path) -> None:
    t = AS_OF - 10 * DAY
    sales = sales_df(
        sale("s1", "c1", "300.00", t, version=1),
        sale("s2", "c2", "1500.00", t, version=2),
    )
    custs = customers_df(customer("c1"), customer("c2"), customer("c3", name='Ünïcødé, "q"'))
    out1 = run(tmp_path, FakeStore(sales, custs))
    master1 = Path(out1["master_csv"]).read_bytes()
    changes1 = (Path(out1["run_dir"]) / "tier_changes.csv").read_bytes()
    history1 = (tmp_path / "tier_history.csv").read_bytes()

    # After as_of: s1 is edited to 2000.00 and then deleted, a new big sale, c2 is deleted, c1
    # joins the loyalty programme, c4 appears. None of it may change the run of AS_OF.
    later = AS_OF + 2 * DAY
    sales2 = pd.concat(
        [
            sales,
            sales_df(
                sale("s1", "c1", "2000.00", t, version=5, updated_at=AS_OF + DAY),
                sale("s1", "c1", "2000.00", t, version=6, updated_at=later, deleted_at=later),
                sale("s9", "c3", "5000.00", AS_OF + DAY, version=7),
            ),
        ],
        ignore_index=True,
    )
    custs2 = pd.concat(
        [
            custs,
            customers_df(
                customer("c2", version=3, updated_at=later, deleted_at=later),
                customer("c1", version=4, loyalty=True, updated_at=later),
                customer("c4", created_at=later),
            ),
        ],
        ignore_index=True,
    )
    run(tmp_path, FakeStore(sales2, custs2), AS_OF + 3 * DAY)  # a later run in between
    out2 = run(tmp_path, FakeStore(sales2, custs2))
    assert Path(out2["master_csv"]).read_bytes() == master1
    assert (Path(out2["run_dir"]) / "tier_changes.csv").read_bytes() == changes1
    hist = read_rows(tmp_path / "tier_history.csv")
    assert [r for r in hist if r["as_of"] == iso(AS_OF)] == list(
        csv.DictReader(io.StringIO(history1.decode("utf-8-sig")))
    )


def test_build_master_with_no_previous_and_empty_metrics() -> None:
    metrics = compute_customer_metrics(sales_df(), customers_df(customer("c1")), AS_OF, RULES)
    master = build_master(metrics.iloc[0:0], None, AS_OF)
    assert list(master.columns) == list(MASTER_COLUMNS)
    assert master.empty


def test_the_columnar_csv_writer_writes_what_the_spreadsheet_module_writes() -> None:
    """to_csv_bytes (Arrow kernels) against spreadsheet.to_safe_csv_bytes (per cell), byte for byte."""
    from include.tier_sync import spreadsheet
    from include.tier_sync.master_csv import NUMERIC_COLUMNS

    cells = [
        "", "a", "=1+1", "'=x", "''+y", "'plain", "-12.50", "-1a", "\u0661\u0662", "-\u0661\u0662", "12\n",
        "-12\n", 'say "hi"', "a,b", "line\nbreak", "cr\ronly", "\tTab", "@at", "+1", "x'", "Zoë 李",
        " lead", "-", "'", "-.5", "1.", None,
    ]  # fmt: skip
    df = pd.DataFrame(
        {"Customer ID": cells, "Lifetime Value": cells, "Name": list(reversed(cells)), "count": cells}
    ).astype(object)
    fast = to_csv_bytes(df)
    assert fast == spreadsheet.to_safe_csv_bytes(df, numeric_columns=NUMERIC_COLUMNS)
    assert "'=1+1" in fast.decode("utf-8-sig") and '"a,b"' in fast.decode("utf-8-sig")
    as_str = df.astype("str")  # pandas' Arrow-backed str columns take the no-copy branch
    assert to_csv_bytes(as_str) == spreadsheet.to_safe_csv_bytes(as_str, numeric_columns=NUMERIC_COLUMNS)
    empty = df.iloc[0:0]
    assert to_csv_bytes(empty) == spreadsheet.to_safe_csv_bytes(empty, numeric_columns=NUMERIC_COLUMNS)
    mixed = df.assign(n=1)  # a numeric column: the spreadsheet module writes it
    assert to_csv_bytes(mixed) == spreadsheet.to_safe_csv_bytes(mixed, numeric_columns=NUMERIC_COLUMNS)


@pytest.mark.parametrize(("chosen", "expected"), [(None, "jemalloc"), ("system", "system"), ("mimalloc", "mimalloc")])
def test_engine_memory_pool_is_jemalloc_unless_the_deployer_chose_one(chosen: str | None, expected: str) -> None:
    """compute_tiers reads the store through Arrow's jemalloc pool (far less kernel time than the
    default mimalloc on that allocation pattern, bench/transform.py); ARROW_DEFAULT_MEMORY_POOL wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    code = (
        "import pyarrow as pa\n"
        "from include.tier_sync.master_csv import use_jemalloc\n"
        "before = pa.default_memory_pool().backend_name\n"
        "use_jemalloc()\n"
        "print(before, pa.default_memory_pool().backend_name)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert after == expected
    if chosen is None:
        assert before == "mimalloc"  # pyarrow's own default, which the engine replaces


def test_freed_heap_memory_is_handed_back_between_the_engine_and_the_csvs() -> None:
    """release_freed_memory (called by compute_tiers after the read and after the engine) returns
    memory the C heap kept after a free, so the next step's peak does not sit on top of it."""
    import os
    import subprocess
    import sys

    code = (
        "from include.tier_sync.master_csv import _malloc_trim, release_freed_memory\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "if _malloc_trim() is None:\n"
        "    print('no-glibc'); raise SystemExit\n"
        "blocks = [bytearray(64 << 10) for _ in range(4000)]  # 250 MiB in heap-sized blocks\n"
        "keep = bytearray(64 << 10)  # the heap's top stays in use: free() alone cannot shrink it\n"
        "del blocks\n"
        "before = rss()\n"
        "release_freed_memory()\n"
        "print(before - rss())\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    if out.stdout.strip() == "no-glibc":
        pytest.skip("not glibc: malloc_trim does not exist here")
    assert int(out.stdout.strip()) > 150 << 20
