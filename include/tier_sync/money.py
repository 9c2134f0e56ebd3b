"""Exact money: JSON decimals -> integer cents, rounded half-up (tier-rules.md "Amount").

Every amount is bounded here (`MAX_AMOUNT_CENTS`), so a value keyed wrong (`1E+20`, NaN, a
barcode in the price) stops as a clear `AmountError` at extraction instead of overflowing int64
in the store or in a lifetime-value sum later.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

_CENT = Decimal("0.01")

# The hard ceiling on any one amount ($100,000,000,000.00): far above any sale, so it never
# rejects real data (the configurable `TierRules.max_sale_amount_cents` judges plausibility), and
# low enough that int64 sums of up to ~900,000 such amounts per customer cannot overflow.
MAX_AMOUNT_CENTS = 10**13

# The sale fields an amount is read from (tier-rules.md "Amount").
AMOUNT_FIELDS: tuple[str, ...] = ("total_price_incl", "total_price", "total_tax")

# Above this exponent a Decimal is refused before quantize, which would raise on huge values.
_MAX_ADJUSTED = 20


class AmountError(ValueError):
    """An amount that cannot be used. `reason` says why without the value (for record errors)."""

    def __init__(self, value: Any, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {value!r}")


def to_decimal(value: Any) -> Decimal:
    """A JSON number (already Decimal when parsed with parse_float=Decimal), int or numeric string.

    A binary float is converted through its shortest repr, which is what the JSON text said.
    """
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise AmountError(value, "is not a decimal amount")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation as exc:
            raise AmountError(value, "is not a decimal amount") from exc
    raise AmountError(value, "is not a decimal amount")


def to_cents(value: Any) -> int:
    """Round half-up to whole cents: 1499.995 -> 150000. NaN, infinities and anything whose cents
    reach `MAX_AMOUNT_CENTS` either way raise AmountError (a ValueError), never OverflowError."""
    dec = to_decimal(value)
    if not dec.is_finite():
        raise AmountError(value, "is not a finite amount")
    if dec and dec.adjusted() >= _MAX_ADJUSTED:
        raise AmountError(value, f"is out of range (at least {format_cents(MAX_AMOUNT_CENTS)} either way)")
    cents = int((dec.quantize(_CENT, rounding=ROUND_HALF_UP) * 100).to_integral_value())
    if abs(cents) >= MAX_AMOUNT_CENTS:
        raise AmountError(value, f"is out of range (at least {format_cents(MAX_AMOUNT_CENTS)} either way)")
    return cents


def has_amount(sale: Mapping[str, Any]) -> bool:
    """Whether the sale carries any of `AMOUNT_FIELDS` (present and not null)."""
    return any(sale.get(name) is not None for name in AMOUNT_FIELDS)


def sale_amount_cents(sale: Mapping[str, Any]) -> int:
    """A sale's amount: total_price_incl, else total_price + total_tax (a missing part is 0).

    The sum is taken on exact decimals before the one rounding to cents. A sale with none of the
    three fields gives 0 here; the store refuses that for a finished sale (`has_amount`).
    """
    incl = sale.get("total_price_incl")
    if incl is not None:
        return to_cents(incl)
    price = sale.get("total_price")
    tax = sale.get("total_tax")
    dec_price = to_decimal(price) if price is not None else Decimal(0)
    dec_tax = to_decimal(tax) if tax is not None else Decimal(0)
    for part, raw in ((dec_price, price), (dec_tax, tax)):
        if not part.is_finite() or (part and part.adjusted() >= _MAX_ADJUSTED):
            return to_cents(raw)  # raises the part's own AmountError before the sum can
    return to_cents(dec_price + dec_tax)


def format_cents(cents: int) -> str:
    """Cents as dollars with two decimals: -1234 -> '-12.34'."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(int(cents)), 100)
    return f"{sign}{whole}.{frac:02d}"
