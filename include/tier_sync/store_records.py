"""API records -> order-store rows: the store's resources, their Arrow schemas and the parsing.

Split out of `store` (which re-exports every name here), so the manifest and commit logic stays
one module a reader can hold in mind. A record the store cannot hold raises MalformedRecordError
naming resource, id and field, never the values.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa

from include.tier_sync.money import AMOUNT_FIELDS, AmountError, has_amount, sale_amount_cents
from include.tier_sync.rules import is_finished_sale
from include.tier_sync.store_manifest import CUSTOMERS, RESOURCES, SALES  # noqa: F401 (re-exported: the resources live there)

_TS = pa.timestamp("us", tz="UTC")

SALES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("customer_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("state", pa.string()),
        pa.field("sale_date", _TS),
        pa.field("created_at", _TS),
        pa.field("updated_at", _TS),
        pa.field("deleted_at", _TS),
        pa.field("amount_cents", pa.int64(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
    ]
)

CUSTOMERS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("customer_code", pa.string()),
        pa.field("first_name", pa.string()),
        pa.field("last_name", pa.string()),
        pa.field("name", pa.string()),
        pa.field("email", pa.string()),
        pa.field("phone", pa.string()),
        pa.field("mobile", pa.string()),
        pa.field("enable_loyalty", pa.bool_(), nullable=False),
        pa.field("customer_group_id", pa.string()),
        pa.field("created_at", _TS),
        pa.field("updated_at", _TS),
        pa.field("deleted_at", _TS),
        pa.field("version", pa.int64(), nullable=False),
    ]
)

SCHEMAS: Mapping[str, pa.Schema] = {SALES: SALES_SCHEMA, CUSTOMERS: CUSTOMERS_SCHEMA}
SALES_COLUMNS: tuple[str, ...] = tuple(SALES_SCHEMA.names)
CUSTOMERS_COLUMNS: tuple[str, ...] = tuple(CUSTOMERS_SCHEMA.names)

# The nullable string and timestamp columns, in schema order (the row converters fill them).
_SALE_STRINGS = tuple(f.name for f in SALES_SCHEMA if f.nullable and f.type == pa.string())
_SALE_TIMESTAMPS = tuple(f.name for f in SALES_SCHEMA if f.type == _TS)
_CUSTOMER_STRINGS = tuple(f.name for f in CUSTOMERS_SCHEMA if f.nullable and f.type == pa.string())
_CUSTOMER_TIMESTAMPS = tuple(f.name for f in CUSTOMERS_SCHEMA if f.type == _TS)


class MalformedRecordError(ValueError):
    """An API record the store cannot hold. Names resource, record id and field, never the values."""

    def __init__(self, resource: str, record_id: str | None, field: str, problem: str) -> None:
        self.resource = resource
        self.record_id = record_id
        self.field = field
        self.problem = problem
        rid = record_id if record_id is not None else "<no id>"
        super().__init__(f"malformed {resource} record id={rid}: field {field!r} {problem}")


# -- raw API dict -> row ---------------------------------------------------------------------------


def _record_id(resource: str, raw: Mapping[str, Any]) -> str:
    if not isinstance(raw, Mapping):
        raise MalformedRecordError(resource, None, "<record>", "is not a JSON object")
    value = raw.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise MalformedRecordError(resource, None, "id", "is missing or not a string")
    return str(value)


def _version(resource: str, rid: str, raw: Mapping[str, Any]) -> int:
    value = raw.get("version")
    if isinstance(value, bool):
        raise MalformedRecordError(resource, rid, "version", "is not an integer")
    if isinstance(value, int):
        out = value
    elif isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        out = int(value)
    else:
        raise MalformedRecordError(resource, rid, "version", "is missing or not an integer")
    if out < 0:
        raise MalformedRecordError(resource, rid, "version", "is negative")
    return out


def _timestamp(resource: str, rid: str, raw: Mapping[str, Any], field: str) -> datetime | None:
    value = raw.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedRecordError(resource, rid, field, "is not an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise MalformedRecordError(resource, rid, field, "is not an ISO-8601 timestamp") from None
    # The API documents every instant as UTC; a legacy offset-less form is read as UTC too.
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _string(resource: str, rid: str, raw: Mapping[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        return str(value)
    raise MalformedRecordError(resource, rid, field, "is not a string")


def sale_to_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One API sale (2.0 shape, JSON numbers as Decimal) -> one row of the sales columns."""
    rid = _record_id(SALES, raw)
    row: dict[str, Any] = {"id": rid}
    for field in _SALE_STRINGS:
        row[field] = _string(SALES, rid, raw, field)
    for field in _SALE_TIMESTAMPS:
        row[field] = _timestamp(SALES, rid, raw, field)
    row["amount_cents"] = _sale_amount(rid, raw, finished=is_finished_sale(row["status"], row["state"]))
    row["version"] = _version(SALES, rid, raw)
    return row


def _sale_amount(rid: str, raw: Mapping[str, Any], *, finished: bool) -> int:
    """The sale's amount in cents (tier-rules.md "Amount"), or MalformedRecordError naming the field.

    A finished sale with none of the amount fields is refused rather than stored as $0: it would
    count as a zero sale and silently cost its customer a tier. An unfinished one never counts, so
    its 0 is harmless. A value beyond money's hard ceiling is refused here, before it could
    overflow the int64 column.
    """
    if not has_amount(raw):
        if finished:
            raise MalformedRecordError(
                SALES,
                rid,
                "/".join(AMOUNT_FIELDS),
                "is missing or null on a finished sale, which needs total_price_incl or total_price "
                '(+ total_tax) (docs/tier-rules.md "Amount"); fix the sale in Lightspeed',
            )
        return 0
    field = "total_price_incl" if raw.get("total_price_incl") is not None else "total_price/total_tax"
    try:
        return sale_amount_cents(raw)
    except AmountError as exc:
        raise MalformedRecordError(SALES, rid, field, exc.reason) from None
    except (ValueError, TypeError, ArithmeticError):
        raise MalformedRecordError(SALES, rid, field, "is not a decimal amount") from None


def customer_to_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One API customer -> one row of the customers columns (a missing `enable_loyalty` is False)."""
    rid = _record_id(CUSTOMERS, raw)
    row: dict[str, Any] = {"id": rid}
    for field in _CUSTOMER_STRINGS:
        row[field] = _string(CUSTOMERS, rid, raw, field)
    loyalty = raw.get("enable_loyalty")
    if loyalty is None:
        row["enable_loyalty"] = False
    elif isinstance(loyalty, bool):
        row["enable_loyalty"] = loyalty
    else:
        raise MalformedRecordError(CUSTOMERS, rid, "enable_loyalty", "is not a boolean")
    for field in _CUSTOMER_TIMESTAMPS:
        row[field] = _timestamp(CUSTOMERS, rid, raw, field)
    row["version"] = _version(CUSTOMERS, rid, raw)
    return row


ROW_CONVERTERS = {SALES: sale_to_row, CUSTOMERS: customer_to_row}
