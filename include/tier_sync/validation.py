"""The data-quality gate: a Great Expectations 1.x suite (validation_suite.py) over the run's master CSV.

Nothing may reach git or the POS unless the master passed this gate. The suite is built in code
(versioned with the project) and run with the GX core API inside the task, because the Airflow GX
provider cannot be installed beside Airflow 3.3.2. GX is imported only inside functions (it costs
~6 s and must stay out of DAG parsing) and its loggers are quieted first (it floods INFO lines).

Row-level checks name the failing customers (their ids, never emails or names); aggregate checks
compare against the baseline of the run ledger: the last *published* run up to this one, a published
run of the same day included, so one broken run (or a broken re-run of a good day) cannot poison a
baseline or slip past it.
Placeholder emails are reported as a warning, in their own suite, and never fail the run.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio, ledger, spreadsheet
from include.tier_sync.money import format_cents
from include.tier_sync.rules import NO_TIER, TierRules, assign_tiers
from include.tier_sync.runtime import iso
from include.tier_sync.validation_suite import (
    CSV_LINE,
    CUSTOMER_ID,
    DOCS_SITE_NAME,
    EMAIL,
    EMAIL_SHARED_BY,
    HAS_ORDERS_FOR_VALUE,
    LIFETIME_VALUE,
    LOYALTY_MEMBER,
    LTV_CENTS,
    LTV_PLAUSIBLE,
    ORDER_COUNT,
    ORDERS_INT,
    P30_INT,
    PURCHASES_30D,
    REQUIRED_COLUMNS,
    RULE_TIER,
    TEXT_CELLS_INERT,
    TIER,
    TIER_CHANGED,
    _import_gx,
    build_suite,
    build_warning_suite,
    quiet_gx_logging,
)

if TYPE_CHECKING:
    import pandas as pd

    from include.tier_sync.ledger import RunPaths

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5
MAX_NAMED_IDS = 20  # customer ids a failed Lifetime Value bound lists in its details
_INT_RE = re.compile(r"^-?\d+$")
_MONEY_RE = re.compile(r"^-?\d+(\.\d{1,2})?$")


class DataQualityError(Exception):
    """The master CSV failed the gate; `.summary` is the compact, JSON-able result."""

    def __init__(self, summary: Mapping[str, Any]) -> None:
        self.summary: dict[str, Any] = dict(summary)
        super().__init__(format_summary(self.summary))


@dataclass(frozen=True)
class Baseline:
    """The ledger's baseline (last published run up to this one): what row-count and tier-change checks compare with."""

    run_key: str | None = None
    row_count: int | None = None
    tiers: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Reading and deriving (pure pandas; no GX)


def _money_cents(text: str) -> float:
    value = text.strip()
    if not _MONEY_RE.match(value):
        return math.nan
    try:
        dec = Decimal(value)
    except InvalidOperation:
        return math.nan
    return float(int(dec * 100))


def _whole(text: str) -> float:
    value = text.strip()
    return float(int(value)) if _INT_RE.match(value) else math.nan


def read_master(url: str) -> pd.DataFrame:
    """The master CSV as strings ('None' is a tier, not a null); an empty file is zero rows."""
    import pandas as pd

    data = fileio.read_bytes(url)
    if not data.strip():
        return pd.DataFrame()
    # As stored (no raw_value): the gate checks what a spreadsheet would see.
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding=spreadsheet.ENCODING)


def _rule_tiers(
    ltv: pd.Series, orders: pd.Series, p30: pd.Series, loyal: pd.Series, rules: TierRules
) -> pd.Series:
    """The engine's own rule (`rules.assign_tiers`) on the parsed CSV; None where an input could not
    be parsed (those rows fail their own parse checks instead)."""
    import pandas as pd

    choice = assign_tiers(
        ltv.to_numpy(dtype=float),
        orders.to_numpy(dtype=float),
        p30.to_numpy(dtype=float),
        (loyal == "true").to_numpy(dtype=bool),
        rules,
    )
    unknown = ltv.isna() | orders.isna() | p30.isna() | ~loyal.isin(["true", "false"])
    out = pd.Series(choice, index=ltv.index, dtype=object)
    out[unknown] = None
    return out


def prepare_frame(
    raw: pd.DataFrame, previous_tiers: Mapping[str, str] | None, rules: TierRules
) -> pd.DataFrame:
    """The GX batch: the checked raw columns plus parsed/derived ones. No PII columns.

    A required column absent from the CSV stays absent here (only Customer ID, the example key,
    is always present), so the expectations on it fail instead of passing on nulls.
    """
    import pandas as pd

    n = len(raw)
    index = pd.RangeIndex(n)

    def col(name: str) -> pd.Series:
        if name in raw.columns:
            return raw[name].astype(str).reset_index(drop=True)
        return pd.Series([""] * n, index=index, dtype=object)

    ids = col(CUSTOMER_ID).str.strip()
    frame = pd.DataFrame(index=index)
    frame[CUSTOMER_ID] = ids.where(ids != "", None).astype(object)
    for name in (LIFETIME_VALUE, ORDER_COUNT, PURCHASES_30D, LOYALTY_MEMBER, TIER):
        if name in raw.columns:
            frame[name] = col(name).astype(object)
    frame[CSV_LINE] = index + 2  # header is line 1
    frame[LTV_CENTS] = col(LIFETIME_VALUE).map(_money_cents).astype(float)
    frame[ORDERS_INT] = col(ORDER_COUNT).map(_whole).astype(float)
    frame[P30_INT] = col(PURCHASES_30D).map(_whole).astype(float)
    frame[RULE_TIER] = _rule_tiers(
        frame[LTV_CENTS], frame[ORDERS_INT], frame[P30_INT], col(LOYALTY_MEMBER), rules
    )
    positive = frame[LTV_CENTS] > 0
    frame[HAS_ORDERS_FOR_VALUE] = (~positive) | (frame[ORDERS_INT] >= 1) | frame[ORDERS_INT].isna()
    # Only a per-row flag enters the batch (no names, emails or phones): False where a cell would evaluate.
    unsafe = {row for row, _ in spreadsheet.unsafe_cells(raw.reset_index(drop=True))}
    frame[TEXT_CELLS_INERT] = pd.Series([i not in unsafe for i in range(n)], index=index, dtype=bool)
    if previous_tiers is not None:
        # A customer new since the baseline had no tier before ("None").
        before = ids.map(lambda cid: previous_tiers.get(cid, NO_TIER))
        frame[TIER_CHANGED] = (col(TIER) != before).astype(bool)
    else:
        frame[TIER_CHANGED] = False
    emails = col(EMAIL).str.strip().str.lower()
    counts = emails.map(emails[emails != ""].value_counts()).fillna(0).astype(int)
    frame[EMAIL_SHARED_BY] = counts.where(emails != "", 0).astype(int)
    return frame


def find_baseline(paths: RunPaths) -> Baseline:
    """The ledger's baseline: the newest published run up to this one, the same day's included."""
    found = ledger.baseline(paths)
    floor = found[0] if found else ""
    notes = [
        f"run {key} skipped as baseline: never published (failed or not validated)"
        for key in reversed(ledger.run_keys(paths))
        if floor < key < paths.key and ledger.published_master(paths, key) is None
    ]
    if found is None:
        notes.append("no previous published run: row-count and tier-change checks compare with nothing and pass")
        return Baseline(notes=tuple(notes))
    key, master = found
    if key == paths.key:
        notes.append(f"re-run of {key}: compared with what that day published")
    prev = read_master(master)
    tiers: dict[str, str] = {}
    if CUSTOMER_ID in prev.columns and TIER in prev.columns:
        tiers = dict(zip(prev[CUSTOMER_ID].astype(str), prev[TIER].astype(str), strict=True))
    return Baseline(run_key=key, row_count=len(prev), tiers=tiers, notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# Running


def _gx_context(gx: Any, docs_dir: str | None) -> Any:
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[DOCS_SITE_NAME] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suites(
    frame: pd.DataFrame, suites: Sequence[Any], docs_dir: str | None, run_name: str | None = None
) -> list[Any]:
    """Validate `frame` against each suite in one checkpoint; Data Docs go to `docs_dir` if given.

    `run_name` (the run key) names the run in Data Docs and in the JSON results.
    """
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    ctx = _gx_context(gx, docs_dir)
    batch = (
        ctx.data_sources.add_pandas("tier_sync")
        .add_dataframe_asset("master")
        .add_batch_definition_whole_dataframe("run")
    )
    definitions = []
    for suite in suites:
        registered = ctx.suites.add(suite)
        definitions.append(
            ctx.validation_definitions.add(
                gx.ValidationDefinition(name=f"{suite.name}.vd", data=batch, suite=registered)
            )
        )
    actions = [UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE_NAME])] if docs_dir else []
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="customer_tier_sync",
            validation_definitions=definitions,
            actions=actions,
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": [CUSTOMER_ID, CSV_LINE],
                "partial_unexpected_count": 20,
            },
        )
    )
    run_id = RunIdentifier(run_name=run_name) if run_name else None
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    by_suite = {vr.suite_name: vr for vr in result.run_results.values()}
    quiet_gx_logging()
    return [by_suite[s.name] for s in suites]


def _examples(result: Mapping[str, Any]) -> list[str]:
    """Up to MAX_EXAMPLES distinct customer ids (or 'line N' where the id is blank)."""
    out: list[str] = []
    for item in result.get("partial_unexpected_index_list") or []:
        if not isinstance(item, Mapping):
            continue
        cid = item.get(CUSTOMER_ID)
        label = (
            str(cid)
            if cid is not None and str(cid) not in ("", "nan", "None")
            else f"line {item.get(CSV_LINE)}"
        )
        if label not in out:
            out.append(label)
        if len(out) >= MAX_EXAMPLES:
            break
    return out


def _detail(res: Any, frame: pd.DataFrame) -> dict[str, Any]:
    cfg = res.expectation_config
    meta = dict(cfg.meta or {})
    result = dict(res.result or {})
    detail: dict[str, Any] = {
        "expectation": meta.get("check") or cfg.type,
        "type": cfg.type,
        "column": meta.get("column"),
        "unexpected_count": int(result.get("unexpected_count") or 0),
        "examples": _examples(result),
        "description": getattr(cfg, "description", None),
    }
    if "observed_value" in result:
        detail["observed"] = result["observed_value"]
    kwargs = cfg.kwargs or {}
    if detail["expectation"] == "row_count_not_dropped":
        detail["unexpected_count"] = max(0, int(meta.get("previous_row_count") or 0) - len(frame))
        detail["min_rows"] = kwargs.get("min_value")
        detail["previous_row_count"] = meta.get("previous_row_count")
    if detail["expectation"] == "tier_change_share" and len(frame):
        detail["share"] = round(float(frame[TIER_CHANGED].mean()), 4)
        detail["ceiling"] = round(1.0 - float(kwargs.get("mostly", 1.0)), 4)
    if detail["expectation"] == "tier_consistent_with_rule" and TIER in frame.columns:
        bad = frame[frame[RULE_TIER].notna() & frame[TIER].notna() & (frame[TIER] != frame[RULE_TIER])]
        pairs = (bad[TIER].astype(str) + " where the rule gives " + bad[RULE_TIER].astype(str)).value_counts()
        detail["breakdown"] = {str(k): int(v) for k, v in pairs.head(10).items()}
    if detail["expectation"] == LTV_PLAUSIBLE:
        detail.update(_implausible_ltv(frame, kwargs.get("max_value")))
    if not result:  # GX records an expectation it could not evaluate (missing column) this way
        detail["error"] = "could not be evaluated (missing column?)"
    return detail


def _implausible_ltv(frame: pd.DataFrame, bound: Any) -> dict[str, Any]:
    """The customers (ids only, up to MAX_NAMED_IDS) whose Lifetime Value breaks the bound."""
    if not isinstance(bound, int | float) or LTV_CENTS not in frame.columns:
        return {}
    over = frame.loc[frame[LTV_CENTS].abs() >= bound, CUSTOMER_ID].dropna().astype(str)
    ids = sorted(over.unique().tolist())
    return {
        "customer_ids": ids[:MAX_NAMED_IDS],
        "message": (
            f"{len(ids)} customer(s) with a Lifetime Value of at least {format_cents(int(bound))} either way "
            "(max_lifetime_value_cents): check their sales in Lightspeed for an amount keyed wrong"
        ),
    }


def validate_master(paths: RunPaths, rules: TierRules) -> dict[str, Any]:
    """Validate the run's master CSV; write the JSON report and Data Docs; raise if it failed.

    Returns the compact summary (for XCom). On failure raises DataQualityError(summary), after the
    artifacts are written, so the report/log step can always say why.
    """
    raw = read_master(paths.run_master_csv)
    baseline = find_baseline(paths)
    notes = list(baseline.notes)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        notes.append(f"master CSV lacks columns: {', '.join(missing)}")
    frame = prepare_frame(raw, baseline.tiers if baseline.run_key else None, rules)

    docs_dir: str | None = None
    if fileio.is_local(paths.data_docs_dir):
        docs_dir = fileio.local_path(paths.data_docs_dir)
        fileio.makedirs(docs_dir)
    else:
        notes.append("Data Docs skipped: the data dir is object storage (the JSON report has everything)")

    suites = [
        build_suite(rules, baseline.row_count, has_previous_tiers=baseline.run_key is not None),
        build_warning_suite(rules),
    ]
    blocking, warning = run_suites(frame, suites, docs_dir, run_name=paths.key)

    order = {(e.meta or {}).get("check"): i for i, e in enumerate(suites[0].expectations)}
    failed_details = [_detail(r, frame) for r in blocking.results if not r.success]
    failed_details.sort(key=lambda d: order.get(d["expectation"], len(order)))
    for d in failed_details:
        if d["expectation"] == "master_columns_present":
            d["unexpected_count"] = len(missing)
            d["message"] = f"missing columns: {', '.join(missing)}"
            d.pop("error", None)
    warnings = [_detail(r, frame) for r in warning.results if not r.success]
    for w in warnings:
        if w["expectation"] == "placeholder_emails":
            shared = frame.loc[
                frame[EMAIL_SHARED_BY] >= rules.placeholder_email_min_customers, EMAIL_SHARED_BY
            ]
            w["addresses"] = int(len(shared.value_counts())) if len(shared) else 0
            w["message"] = (
                f"{w['unexpected_count']} customers share {w['addresses']} email address(es) used by "
                f">= {rules.placeholder_email_min_customers} customers (placeholders?)"
            )
    stats = blocking.statistics
    docs_index = fileio.join(docs_dir, "index.html") if docs_dir else None
    summary: dict[str, Any] = {
        "success": bool(blocking.success),
        "evaluated": int(stats.get("evaluated_expectations", 0)),
        "successful": int(stats.get("successful_expectations", 0)),
        "failed": [d["expectation"] for d in failed_details],
        "failed_details": failed_details,
        "warnings": warnings,
        "notes": notes,
        "row_count": len(frame),
        "previous_run": baseline.run_key,
        "previous_row_count": baseline.row_count,
        "tier_changes": int(frame[TIER_CHANGED].sum()),
        "run_key": paths.key,
        "report": paths.run_validation_json,
        "data_docs": docs_index if docs_index and fileio.exists(docs_index) else None,
    }
    report = {
        "summary": summary,
        "rules": {
            "max_row_drop_fraction": rules.max_row_drop_fraction,
            "max_tier_change_fraction": rules.max_tier_change_fraction,
            "placeholder_email_min_customers": rules.placeholder_email_min_customers,
            "max_lifetime_value_cents": rules.max_lifetime_value_cents,
        },
        "gx": {
            "blocking": blocking.to_json_dict(),
            "warnings": warning.to_json_dict(),
        },
    }
    _write_report(paths, report)
    log.info(
        "validation %s: %d/%d expectations passed, %d rows, failed=%s, warnings=%d, report=%s",
        "passed" if summary["success"] else "FAILED",
        summary["successful"],
        summary["evaluated"],
        summary["row_count"],
        summary["failed"],
        len(warnings),
        paths.run_validation_json,
    )
    for w in warnings:
        log.warning(
            "validation warning %s: %s; examples %s", w["expectation"], w.get("message"), w["examples"]
        )
    if not summary["success"]:
        raise DataQualityError(summary)
    return summary


def _write_report(paths: RunPaths, report: Mapping[str, Any]) -> None:
    """Per-run JSON, plus validation/latest.json when this run is the ledger's latest (backfills)."""
    fileio.write_json(paths.run_validation_json, report)
    ledger.write_latest(paths, paths.latest_validation_json, report, as_of_of=_report_as_of)


def _report_as_of(report: Any) -> str | None:
    """The as_of of a validation report (from its run key)."""
    key = (report.get("summary") or {}).get("run_key") if isinstance(report, dict) else None
    return iso(ledger.key_as_of(str(key))) if key and ledger.is_run_key(str(key)) else None


# --------------------------------------------------------------------------------------------
# Text


def format_details(details: Sequence[Mapping[str, Any]], limit: int = 12) -> list[str]:
    """One line per failed/warned expectation: name, column, count, examples (customer ids only)."""
    lines: list[str] = []
    for d in list(details)[:limit]:
        parts = [f"- {d.get('expectation')}"]
        if d.get("column"):
            parts.append(f"[{d['column']}]")
        parts.append(f"unexpected={d.get('unexpected_count', 0)}")
        if d.get("expectation") == "row_count_not_dropped":
            parts.append(
                f"rows={d.get('observed')} min={d.get('min_rows')} previous={d.get('previous_row_count')}"
            )
        if "share" in d:
            parts.append(f"share={d['share']:.1%} ceiling={d.get('ceiling', 0):.1%}")
        if d.get("breakdown"):
            parts.append("(" + "; ".join(f"{k}: {v}" for k, v in d["breakdown"].items()) + ")")
        if d.get("message"):
            parts.append(str(d["message"]))
        if d.get("error"):
            parts.append(str(d["error"]))
        if d.get("examples"):
            parts.append("e.g. " + ", ".join(str(x) for x in d["examples"]))
        lines.append(" ".join(parts))
    if len(details) > limit:
        lines.append(f"- ... and {len(details) - limit} more")
    return lines


def format_summary(summary: Mapping[str, Any]) -> str:
    """A readable multi-line message: stats, then each failed expectation with counts and ids."""
    failed = summary.get("failed_details") or []
    head = (
        f"Data validation {'passed' if summary.get('success') else 'FAILED'}: "
        f"{len(failed)} of {summary.get('evaluated', 0)} expectations failed "
        f"on {summary.get('row_count', 0)} rows (previous validated run: "
        f"{summary.get('previous_run') or 'none'}, {summary.get('previous_row_count')} rows)"
    )
    lines = [head, *format_details(failed)]
    if summary.get("warnings"):
        lines.append("Warnings (not blocking):")
        lines.extend(format_details(summary["warnings"]))
    if summary.get("report"):
        lines.append(f"Report: {summary['report']}")
    return "\n".join(lines)
