"""Exact money: JSON decimals -> integer cents, rounded half-up (tier-rules.md "Amount")."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

_CENT = Decimal("0.01")


def to_decimal(value: Any) -> Decimal:
    """A JSON number (already Decimal when parsed with parse_float=Decimal), int or numeric string.

    A binary float is converted through its shortest repr, which is what the JSON text said.
    """
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise ValueError(f"not an amount: {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation as exc:
            raise ValueError(f"not an amount: {value!r}") from exc
    raise ValueError(f"not an amount: {value!r}")


def to_cents(value: Any) -> int:
    """Round half-up to whole cents: 1499.995 -> 150000."""
    dec = to_decimal(value)
    if not dec.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    return int((dec.quantize(_CENT, rounding=ROUND_HALF_UP) * 100).to_integral_value())


def sale_amount_cents(sale: Mapping[str, Any]) -> int:
    """A sale's amount: total_price_incl, else total_price + total_tax (a missing part is 0).

    The sum is taken on exact decimals before the one rounding to cents.
    """
    incl = sale.get("total_price_incl")
    if incl is not None:
        return to_cents(incl)
    price = sale.get("total_price")
    tax = sale.get("total_tax")
    total = (to_decimal(price) if price is not None else Decimal(0)) + (
        to_decimal(tax) if tax is not None else Decimal(0)
    )
    return to_cents(total)


def format_cents(cents: int) -> str:
    """Cents as dollars with two decimals: -1234 -> '-12.34'."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(int(cents)), 100)
    return f"{sign}{whole}.{frac:02d}"
