"""Exact JSON for the simulator: Decimals are written as the digits they hold, never via float.

The pipeline must parse `1499.995` as a decimal; if the simulator went through `float` the text on
the wire would already be wrong, so the encoder writes Decimal values verbatim.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

# Decimals go through the C encoder as marked strings, then the marks are replaced by the bare
# digits: exact text, at C-encoder speed (a 1000-sale page is ~3 MB of JSON).
_MARK = "\x00D"
_MARKED = re.compile(r'"\\u0000D(-?[0-9]+(?:\.[0-9]+)?)\\u0000"')


def dumps(obj: Any) -> str:
    """Serialise `obj` to compact ASCII JSON, writing Decimal values exactly (no exponent, no float)."""
    text = json.dumps(obj, default=_default, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return _MARKED.sub(lambda m: m.group(1), text)


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return f"{_MARK}{decimal_text(obj)}\x00"
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
