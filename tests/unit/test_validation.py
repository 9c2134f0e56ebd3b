"""The data-quality gate: good data passes, each kind of bad data fails with the right names and ids."""

from __future__ import annotations

import csv
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import validation as v
from include.tier_sync.ledger import RunPaths
from include.tier_sync.rules import TierRules

pytestmark = pytest.mark.unit

COLUMNS = [
    "Customer ID",
    "Customer Code",
    "Name",
    "Email",
    "Phone",
    "Lifetime Value",
    "Order Count",
    "Avg Order Value",
    "First Order",
    "Last Order",
    "Days Since Last Order",
    "Purchases Last 30 Days",
    "Loyalty Member",
    "Tier",
    "Previous Tier",
    "Tier Changed At",
    "Last Updated",
]
AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)


def customer(
    i: int, ltv: str, orders: int, p30: int, loyal: bool, tier: str, email: str | None = None
) -> dict[str, str]:
    return {
        "Customer ID": f"cust-{i:04d}",
        "Customer Code": f"C{i:04d}",
        "Name": f"Person {i}",
        "Email": email if email is not None else f"person{i}@example.com",
        "Phone": "",
        "Lifetime Value": ltv,
        "Order Count": str(orders),
        "Avg Order Value": "",
        "First Order": "",
        "Last Order": "",
        "Days Since Last Order": "",
        "Purchases Last 30 Days": str(p30),
        "Loyalty Member": "true" if loyal else "false",
        "Tier": tier,
        "Previous Tier": "None",
        "Tier Changed At": "",
        "Last Updated": "2026-11-25T02:00:00Z",
    }


def good_rows(n: int = 100) -> list[dict[str, str]]:
    """A mix of every tier, each consistent with tier-rules.md."""
    kinds: list[tuple[str, int, int, bool, str]] = [
        ("1600.00", 6, 1, True, "Evergreen"),
        ("1500.00", 4, 0, False, "Evergreen"),
        ("800.00", 3, 0, True, "Bloom"),
        ("300.00", 2, 0, False, "Sprout"),
        ("90.00", 3, 3, False, "Sprout"),
        ("40.00", 1, 1, True, "Seed"),
        ("25.50", 1, 0, False, "First Time Buyer"),
        ("0.00", 0, 0, True, "None"),
        ("-20.00", 0, 0, False, "None"),
        ("1499.99", 5, 2, True, "Bloom"),
    ]
    return [customer(i, *kinds[i % len(kinds)]) for i in range(n)]


def write_run(
    data_dir: Path, as_of: datetime, rows: list[dict[str, str]], *, passed: bool | None = None
) -> RunPaths:
    paths = RunPaths(str(data_dir), as_of)
    os.makedirs(paths.run_dir, exist_ok=True)
    with open(paths.run_master_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if passed is not None:  # a previous run's validation verdict, as validate_master writes it
        Path(paths.run_validation_json).write_text(
            json.dumps({"summary": {"success": passed, "run_key": paths.key}})
        )
    return paths


def run_failing(paths: RunPaths, rules: TierRules | None = None) -> dict[str, Any]:
    with pytest.raises(v.DataQualityError) as info:
        v.validate_master(paths, rules or TierRules())
    return info.value.summary


def detail(summary: dict[str, Any], name: str) -> dict[str, Any]:
    found = [d for d in summary["failed_details"] + summary["warnings"] if d["expectation"] == name]
    assert found, f"{name} not in {summary['failed']} / warnings"
    return found[0]


def test_good_data_passes_and_writes_artifacts(tmp_path: Path) -> None:
    paths = write_run(tmp_path, AS_OF, good_rows())
    summary = v.validate_master(paths, TierRules())
    assert summary["success"] is True
    assert summary["failed"] == [] and summary["failed_details"] == []
    assert summary["evaluated"] >= 14 and summary["row_count"] == 100
    assert summary["previous_run"] is None and any("no previous published run" in n for n in summary["notes"])
    json.dumps(summary)  # XCom-able
    report = json.loads(Path(paths.run_validation_json).read_text())
    assert report["summary"]["success"] is True
    assert report["gx"]["blocking"]["success"] is True
    latest = json.loads(Path(paths.validation_dir, "latest.json").read_text())
    assert latest["summary"]["run_key"] == paths.key
    assert summary["data_docs"] and Path(summary["data_docs"]).is_file()
    assert Path(paths.data_docs_dir, "index.html").is_file()
    # No PII in the artifacts: emails and names never enter the GX batch.
    text = Path(paths.run_validation_json).read_text()
    assert "@example.com" not in text and "Person 1" not in text


def test_second_good_run_compares_with_previous(tmp_path: Path) -> None:
    write_run(tmp_path, AS_OF, good_rows(), passed=True)
    paths = write_run(tmp_path, AS_OF + timedelta(days=1), good_rows(98))
    summary = v.validate_master(paths, TierRules())
    assert summary["success"] and summary["previous_run"] == "20261125T020000Z"
    assert summary["previous_row_count"] == 100 and summary["tier_changes"] == 0


def test_duplicate_and_missing_ids_fail_with_examples(tmp_path: Path) -> None:
    rows = good_rows(30)
    rows.append(dict(rows[3]))
    rows.append(dict(rows[7]))
    blank = dict(rows[5])
    blank["Customer ID"] = ""
    rows.append(blank)
    summary = run_failing(write_run(tmp_path, AS_OF, rows))
    assert summary["success"] is False
    dup = detail(summary, "customer_id_unique")
    assert dup["unexpected_count"] == 4
    assert set(dup["examples"]) == {"cust-0003", "cust-0007"}
    present = detail(summary, "customer_id_present")
    assert present["unexpected_count"] == 1 and present["examples"] == ["line 34"]


def test_wiped_extraction_fails_row_count(tmp_path: Path) -> None:
    write_run(tmp_path, AS_OF, good_rows(100), passed=True)
    paths = write_run(tmp_path, AS_OF + timedelta(days=1), good_rows(10))
    summary = run_failing(paths)
    assert summary["failed"] == ["row_count_not_dropped"]
    d = detail(summary, "row_count_not_dropped")
    assert d["observed"] == 10 and d["min_rows"] == 95 and d["previous_row_count"] == 100
    assert d["unexpected_count"] == 90


def test_row_drop_within_configured_fraction_passes(tmp_path: Path) -> None:
    write_run(tmp_path, AS_OF, good_rows(100), passed=True)
    paths = write_run(tmp_path, AS_OF + timedelta(days=1), good_rows(80))
    summary = v.validate_master(paths, TierRules(max_row_drop_fraction=0.25))
    assert summary["success"]


def test_failed_previous_run_is_not_the_baseline(tmp_path: Path) -> None:
    write_run(tmp_path, AS_OF, good_rows(100), passed=True)
    write_run(tmp_path, AS_OF + timedelta(days=1), good_rows(5), passed=False)  # the wiped one
    paths = write_run(tmp_path, AS_OF + timedelta(days=2), good_rows(100))
    summary = v.validate_master(paths, TierRules())
    assert summary["success"] and summary["previous_run"] == "20261125T020000Z"
    assert any("20261126T020000Z skipped" in n for n in summary["notes"])


@pytest.mark.parametrize(
    ("bad", "expectation", "column"),
    [
        (customer(900, "2000.00", 4, 0, False, "Bloom"), "tier_consistent_with_rule", "Tier"),
        (customer(900, "40.00", 1, 0, False, "Seed"), "tier_consistent_with_rule", "Tier"),
        (
            customer(900, "40.00", 2, 3, True, "Sprout"),
            "purchases_30d_within_order_count",
            "Purchases Last 30 Days",
        ),
        (customer(900, "40.00", 1, 0, True, "Platinum"), "tier_allowed", "Tier"),
        (customer(900, "40.00", -1, 0, True, "None"), "order_count_non_negative", "Order Count"),
        (customer(900, "400.00", 0, 0, False, "Sprout"), "orders_behind_positive_value", "Order Count"),
    ],
    ids=[
        "ltv2000-bloom",
        "seed-not-member",
        "p30-over-orders",
        "unknown-tier",
        "negative-orders",
        "value-no-orders",
    ],
)
def test_impossible_rows_fail(tmp_path: Path, bad: dict[str, str], expectation: str, column: str) -> None:
    summary = run_failing(write_run(tmp_path, AS_OF, [*good_rows(40), bad]))
    d = detail(summary, expectation)
    assert d["column"] == column
    assert d["unexpected_count"] == 1 and d["examples"] == ["cust-0900"]


def test_rule_breakdown_names_expected_tier(tmp_path: Path) -> None:
    summary = run_failing(
        write_run(tmp_path, AS_OF, [*good_rows(20), customer(900, "2000.00", 4, 0, False, "Bloom")])
    )
    d = detail(summary, "tier_consistent_with_rule")
    assert d["breakdown"] == {"Bloom where the rule gives Evergreen": 1}


def test_custom_thresholds_drive_the_rule(tmp_path: Path) -> None:
    rows = [customer(1, "1200.00", 3, 0, False, "Evergreen"), customer(2, "600.00", 2, 0, False, "Bloom")]
    rules = TierRules(evergreen_min_cents=100_000, bloom_min_cents=50_000)
    assert v.validate_master(write_run(tmp_path, AS_OF, rows), rules)["success"]


def test_lifetime_value_beyond_the_bound_fails_naming_customer_ids_only(tmp_path: Path) -> None:
    rows = good_rows(30)
    rows[4] = customer(4, "10000000.00", 9, 0, True, "Evergreen", email="big@spender.example")  # $10M
    rows[7] = customer(7, "-12000000.00", 0, 0, False, "None")  # returns of a keying error
    rows[9] = customer(9, "9999999.99", 9, 0, False, "Evergreen")  # one cent under: passes
    paths = write_run(tmp_path, AS_OF, rows)
    with pytest.raises(v.DataQualityError) as info:
        v.validate_master(paths, TierRules())
    summary = info.value.summary
    assert summary["failed"] == ["lifetime_value_plausible"]
    d = detail(summary, "lifetime_value_plausible")
    assert d["column"] == "Lifetime Value" and d["unexpected_count"] == 2
    assert d["customer_ids"] == ["cust-0004", "cust-0007"]
    assert sorted(d["examples"]) == ["cust-0004", "cust-0007"]
    assert "max_lifetime_value_cents" in d["message"] and "10000000.00" in d["message"]
    assert "cust-0004" in str(info.value) and "cust-0007" in str(info.value)
    # Ids only: no name or email in the summary, the message or the report.
    report = Path(paths.run_validation_json).read_text()
    for text in (json.dumps(summary), str(info.value), report):
        assert "Person 4" not in text and "big@spender" not in text
    assert json.loads(report)["rules"]["max_lifetime_value_cents"] == 1_000_000_000
    # The bound is a setting: raised above the biggest customer, the same master passes.
    assert v.validate_master(paths, TierRules.from_mapping({"max_lifetime_value": 20_000_000}))["success"]


def test_tier_change_share_over_ceiling_fails(tmp_path: Path) -> None:
    before = [customer(i, "40.00", 1, 0, True, "Seed") for i in range(100)]
    write_run(tmp_path, AS_OF, before, passed=True)
    after = [customer(i, "300.00", 2, 0, True, "Sprout") if i < 30 else before[i] for i in range(100)]
    paths = write_run(tmp_path, AS_OF + timedelta(days=1), after)
    summary = run_failing(paths)
    assert summary["failed"] == ["tier_change_share"]
    d = detail(summary, "tier_change_share")
    assert d["unexpected_count"] == 30 and d["share"] == 0.3 and d["ceiling"] == 0.25
    assert d["examples"][0] == "cust-0000" and len(d["examples"]) == 5
    # Under a 40% ceiling the same change passes.
    assert v.validate_master(paths, TierRules(max_tier_change_fraction=0.4))["success"]


def test_placeholder_emails_reported_not_failed(tmp_path: Path) -> None:
    rows = good_rows(40)
    for i in (2, 4, 6, 8, 10, 12):
        rows[i]["Email"] = "NoEmail@Example.com" if i % 4 else "noemail@example.com"
    paths = write_run(tmp_path, AS_OF, rows)
    summary = v.validate_master(paths, TierRules())
    assert summary["success"] is True and summary["failed"] == []
    w = detail(summary, "placeholder_emails")
    assert w["unexpected_count"] == 6 and w["addresses"] == 1
    assert w["examples"] == ["cust-0002", "cust-0004", "cust-0006", "cust-0008", "cust-0010"]
    assert "example.com" not in json.dumps(summary).lower()


def test_non_numeric_values_fail_cleanly(tmp_path: Path) -> None:
    rows = good_rows(20)
    rows[3]["Lifetime Value"] = "12,50"
    rows[4]["Order Count"] = "two"
    rows[5]["Purchases Last 30 Days"] = "1.5"
    rows[6]["Loyalty Member"] = "yes"
    summary = run_failing(write_run(tmp_path, AS_OF, rows))
    assert detail(summary, "lifetime_value_numeric")["examples"] == ["cust-0003"]
    assert detail(summary, "order_count_numeric")["examples"] == ["cust-0004"]
    assert detail(summary, "purchases_30d_numeric")["examples"] == ["cust-0005"]
    assert detail(summary, "loyalty_member_boolean")["examples"] == ["cust-0006"]
    # An unparsable row is not also reported as a tier-rule breach.
    assert "tier_consistent_with_rule" not in summary["failed"]


def test_missing_column_fails(tmp_path: Path) -> None:
    paths = write_run(tmp_path, AS_OF, good_rows(10))
    text = Path(paths.run_master_csv).read_text().splitlines()
    idx = COLUMNS.index("Tier")
    Path(paths.run_master_csv).write_text(
        "\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != idx) for line in text) + "\n"
    )
    summary = run_failing(paths)
    assert summary["failed"][0] == "master_columns_present"
    d = detail(summary, "master_columns_present")
    assert d["unexpected_count"] == 1 and d["message"] == "missing columns: Tier"
    assert "tier_allowed" in summary["failed"]


def test_failure_summary_is_json_and_artifacts_exist_before_raise(tmp_path: Path) -> None:
    rows = good_rows(20)
    rows.append(dict(rows[0]))
    paths = write_run(tmp_path, AS_OF, rows)
    with pytest.raises(v.DataQualityError) as info:
        v.validate_master(paths, TierRules())
    summary = info.value.summary
    encoded = json.loads(json.dumps(summary))
    assert encoded["success"] is False and encoded["failed"] == ["customer_id_unique"]
    assert set(encoded) >= {
        "success",
        "evaluated",
        "failed",
        "failed_details",
        "warnings",
        "report",
        "data_docs",
        "row_count",
    }
    report = json.loads(Path(paths.run_validation_json).read_text())
    assert report["summary"]["failed"] == ["customer_id_unique"]
    assert Path(paths.data_docs_dir, "index.html").is_file()
    message = str(info.value)
    assert "FAILED" in message and "customer_id_unique" in message and "cust-0000" in message
    assert "unexpected=2" in message


def test_object_storage_skips_data_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-local data dir: the JSON report is still written (through fsspec), Data Docs skipped."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    paths = RunPaths("memory://tier-sync-test", AS_OF)
    buf: list[str] = [",".join(COLUMNS)]
    for row in good_rows(10):
        buf.append(",".join(row[c] for c in COLUMNS))
    fs.pipe_file(paths.run_master_csv.removeprefix("memory://"), ("\n".join(buf) + "\n").encode())
    summary = v.validate_master(paths, TierRules())
    assert summary["success"] and summary["data_docs"] is None
    assert any("Data Docs skipped" in n for n in summary["notes"])
    assert fs.exists(paths.run_validation_json.removeprefix("memory://"))


QUIET_SCRIPT = """
import logging, sys
from datetime import datetime, UTC
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from include.tier_sync.ledger import RunPaths
from include.tier_sync.rules import TierRules
from include.tier_sync.validation import validate_master
print(validate_master(RunPaths(sys.argv[1], datetime(2026, 11, 25, 2, tzinfo=UTC)), TierRules())["success"])
"""


def test_gx_stays_quiet_at_info(tmp_path: Path) -> None:
    """In a fresh interpreter with the root logger at INFO (as in a task): no GX log flood, no bars."""
    import subprocess
    import sys

    write_run(tmp_path, AS_OF, good_rows(50))
    out = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
    gx_lines = [line for line in out.stderr.splitlines() if "great_expectations" in line]
    assert len(gx_lines) < 10, gx_lines[:10]
    assert "Calculating Metrics" not in out.stderr
    assert len(out.stderr.splitlines()) < 20, out.stderr[-2000:]


def test_module_import_does_not_import_gx() -> None:
    import subprocess
    import sys

    code = "import sys, include.tier_sync.validation, include.tier_sync.alerts; print('great_expectations' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"]
