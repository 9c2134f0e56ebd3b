"""Exact JSON for the simulator: Decimals are written as the digits they hold, never via float.

The pipeline must parse `1499.995` as a decimal; if the simulator went through `float` the text on
the wire would already be wrong, so the encoder writes Decimal values verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

_encode_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def dumps(obj: Any) -> str:
    """Serialise `obj` to compact JSON, writing Decimal values exactly (no exponent, no float)."""
    parts: list[str] = []
    _encode(obj, parts)
    return "".join(parts)


def _encode(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_encode_str(obj))
    elif isinstance(obj, Decimal):
        out.append(decimal_text(obj))
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(json.dumps(obj))
    elif isinstance(obj, Mapping):
        out.append("{")
        first = True
        for key, value in obj.items():
            if not first:
                out.append(",")
            first = False
            out.append(_encode_str(str(key)))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    else:
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def decimal_text(value: Decimal) -> str:
    """A Decimal as a JSON number literal with exactly its digits (1499.995 -> "1499.995")."""
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    return format(value, "f")


def loads(text: str | bytes) -> Any:
    """Parse JSON with every non-integer number as Decimal (the inverse of `dumps`)."""
    return json.loads(text, parse_float=Decimal)


def fmt_ts(value: datetime) -> str:
    """The 2.0 wire form of an instant: `2025-11-20T02:40:51+00:00` (UTC, seconds, explicit offset)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def parse_ts(text: str) -> datetime:
    """Inverse of `fmt_ts` (also accepts a trailing `Z`)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)
