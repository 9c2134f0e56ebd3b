"""The data-quality gate's suite, in code: the columns it reads and every expectation it holds.

Kept apart from validation.py (which reads the master, finds the baseline, runs the suites and
writes the report) so the rules of the gate can be read on their own. GX is imported only
inside functions: it costs ~6 s and must stay out of DAG parsing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from include.tier_sync.money import format_cents
from include.tier_sync.rules import ALL_TIERS, TierRules

SUITE_NAME = "customer_tier_sync.master"
WARNINGS_SUITE_NAME = "customer_tier_sync.master.warnings"
DOCS_SITE_NAME = "tier_sync_data_docs"

# Master CSV columns the gate reads (contracts.md). Email is used only to count shared addresses:
# no email, name or phone ever enters the GX batch, so none reaches the JSON, Data Docs or alerts.
CUSTOMER_ID = "Customer ID"
LIFETIME_VALUE = "Lifetime Value"
ORDER_COUNT = "Order Count"
PURCHASES_30D = "Purchases Last 30 Days"
LOYALTY_MEMBER = "Loyalty Member"
TIER = "Tier"
EMAIL = "Email"
REQUIRED_COLUMNS: tuple[str, ...] = (
    CUSTOMER_ID,
    LIFETIME_VALUE,
    ORDER_COUNT,
    PURCHASES_30D,
    LOYALTY_MEMBER,
    TIER,
)

# Derived columns added to the batch (the raw string columns stay, so Data Docs show bad values).
CSV_LINE = "csv_line"
LTV_CENTS = "lifetime_value_cents"
ORDERS_INT = "order_count_int"
P30_INT = "purchases_30d_int"
RULE_TIER = "rule_tier"
TIER_CHANGED = "tier_changed"
HAS_ORDERS_FOR_VALUE = "orders_behind_positive_value"
EMAIL_SHARED_BY = "email_shared_by"
TEXT_CELLS_INERT = "text_cells_inert"  # no cell of the row starts with = + - @ TAB CR LF (spreadsheet.py)

# The check name of the Lifetime Value bound (its failure details name the customers).
LTV_PLAUSIBLE = "lifetime_value_plausible"

_QUIET_LOGGERS = ("great_expectations", "great_expectations.data_context.types.base", "altair", "tqdm")



# --------------------------------------------------------------------------------------------
# GX import, quietly


def quiet_gx_logging() -> None:
    """Set GX's loggers to WARNING; call before *and* after importing it (one logger pins INFO)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _import_gx() -> Any:
    quiet_gx_logging()
    import great_expectations as gx
    import great_expectations.data_context.types.base  # sets its own logger to INFO on import

    quiet_gx_logging()
    return gx


# --------------------------------------------------------------------------------------------
# The suite, in code


def _meta(check: str, column: str | None) -> dict[str, Any]:
    return {"check": check, "column": column}


def build_suite(
    rules: TierRules,
    previous_row_count: int | None,
    *,
    has_previous_tiers: bool = True,
    name: str = SUITE_NAME,
) -> Any:
    """The blocking suite. Each expectation carries `meta.check`, the name used in alerts and XCom.

    `previous_row_count` None (first run) makes the row-count floor 0: there is nothing to wipe.
    """
    gx = _import_gx()
    import great_expectations.expectations as gxe

    if previous_row_count:
        min_rows = max(1, math.ceil(previous_row_count * (1.0 - rules.max_row_drop_fraction)))
    else:
        min_rows = 0
    ceiling = min(max(float(rules.max_tier_change_fraction), 0.0), 1.0)
    tier_list = ", ".join(ALL_TIERS)
    expectations = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=[c for c in REQUIRED_COLUMNS if c != CUSTOMER_ID],
            exact_match=False,
            description="The master CSV has the columns the gate checks.",
            meta=_meta("master_columns_present", None),
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=CUSTOMER_ID,
            description="Every row has a Customer ID.",
            meta=_meta("customer_id_present", CUSTOMER_ID),
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column=CUSTOMER_ID,
            description="No Customer ID appears twice.",
            meta=_meta("customer_id_unique", CUSTOMER_ID),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=TIER,
            value_set=list(ALL_TIERS),
            description=f"Tier is one of: {tier_list}.",
            meta=_meta("tier_allowed", TIER),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=LOYALTY_MEMBER,
            value_set=["true", "false"],
            description="Loyalty Member is true or false.",
            meta=_meta("loyalty_member_boolean", LOYALTY_MEMBER),
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=LTV_CENTS,
            description="Lifetime Value is a number with at most two decimals.",
            meta=_meta("lifetime_value_numeric", LIFETIME_VALUE),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=LTV_CENTS,
            min_value=-rules.max_lifetime_value_cents,
            max_value=rules.max_lifetime_value_cents,
            strict_min=True,
            strict_max=True,
            description=(
                f"Lifetime Value is under {format_cents(rules.max_lifetime_value_cents)} either way "
                "(max_lifetime_value_cents): more is a keying error in the POS, not a customer."
            ),
            meta=_meta(LTV_PLAUSIBLE, LIFETIME_VALUE),
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=ORDERS_INT,
            description="Order Count is a whole number.",
            meta=_meta("order_count_numeric", ORDER_COUNT),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=ORDERS_INT,
            min_value=0,
            description="Order Count is not negative.",
            meta=_meta("order_count_non_negative", ORDER_COUNT),
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=P30_INT,
            description="Purchases Last 30 Days is a whole number.",
            meta=_meta("purchases_30d_numeric", PURCHASES_30D),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=P30_INT,
            min_value=0,
            description="Purchases Last 30 Days is not negative.",
            meta=_meta("purchases_30d_non_negative", PURCHASES_30D),
        ),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=ORDERS_INT,
            column_B=P30_INT,
            or_equal=True,
            ignore_row_if="either_value_is_missing",
            description="Purchases Last 30 Days never exceeds Order Count.",
            meta=_meta("purchases_30d_within_order_count", PURCHASES_30D),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=HAS_ORDERS_FOR_VALUE,
            value_set=[True],
            description="A positive Lifetime Value comes with at least one order.",
            meta=_meta("orders_behind_positive_value", ORDER_COUNT),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=TEXT_CELLS_INERT,
            value_set=[True],
            description=(
                "No text cell would evaluate as a spreadsheet formula (starts with = + - @ TAB or CR "
                "without the neutralising ' of spreadsheet.neutralise)."
            ),
            meta=_meta("text_cells_spreadsheet_safe", None),
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A=TIER,
            column_B=RULE_TIER,
            ignore_row_if="either_value_is_missing",
            description=(
                "Tier equals the tier its defining rule gives (first match wins): "
                f"Evergreen LTV >= {rules.evergreen_min_cents / 100:.2f}; Bloom >= {rules.bloom_min_cents / 100:.2f}; "
                f"Sprout >= {rules.sprout_min_cents / 100:.2f} or >= {rules.sprout_min_purchases_in_window} "
                "purchases in the window; Seed loyalty member with an order; First Time Buyer an order; "
                "else None."
            ),
            meta=_meta("tier_consistent_with_rule", TIER),
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=min_rows,
            description=(
                f"Row count did not drop more than {rules.max_row_drop_fraction:.0%} "
                f"against the previous validated run ({previous_row_count if previous_row_count is not None else 'none'})."
            ),
            meta=_meta("row_count_not_dropped", None) | {"previous_row_count": previous_row_count},
        ),
    ]
    if has_previous_tiers:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column=TIER_CHANGED,
                value_set=[False],
                mostly=1.0 - ceiling,
                description=f"At most {ceiling:.0%} of customers change tier in one run.",
                meta=_meta("tier_change_share", TIER),
            )
        )
    return gx.ExpectationSuite(name=name, expectations=expectations)


def build_warning_suite(rules: TierRules, *, name: str = WARNINGS_SUITE_NAME) -> Any:
    """Reported, never blocking: e.g. one email address on many customers (a placeholder)."""
    gx = _import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    limit = max(int(rules.placeholder_email_min_customers), 2)
    return gx.ExpectationSuite(
        name=name,
        expectations=[
            gxe.ExpectColumnValuesToBeBetween(
                column=EMAIL_SHARED_BY,
                max_value=limit - 1,
                severity=FailureSeverity.WARNING,
                description=f"No email address is shared by {limit} or more customers (a placeholder).",
                meta=_meta("placeholder_emails", EMAIL),
            )
        ],
    )


