"""The CLI's metadata filter syntax (`embedsvc search --filter`), typed like manifest values.

KEY=7          the number 7 (equals 7.0)       KEY="7"      the string "7" (write --filter 'KEY="7"')
KEY=true       the boolean true                KEY=red      the string "red" (not a number or boolean)
KEY=a|b|3      any of the values, each typed by the same rules ("a|b" quoted is one string)
"""

from __future__ import annotations

import math
from typing import Union

from embedsvc.errors import InvalidInput

Value = Union[str, float, int, bool]


def parse_value(raw: str) -> Value:
    """A double-quoted value is a string; otherwise a boolean, a number, or else a string."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return raw[1:-1]
    if raw in ("true", "false"):
        return raw == "true"
    try:
        number = float(raw)
    except ValueError:
        return raw
    if not math.isfinite(number):  # "nan", "inf": words, not numbers
        return raw
    return int(number) if number.is_integer() and "." not in raw and "e" not in raw.lower() else number


def _alternatives(raw: str) -> list[str]:
    """Splits on | outside double quotes."""
    parts, current, quoted = [], "", False
    for char in raw:
        if char == '"':
            quoted = not quoted
        if char == "|" and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_filters(expressions: list[str]) -> dict:
    """--filter expressions -> the client's filter dict ({key: value} equality, {key: [values]} any of)."""
    out = {}
    for expression in expressions:
        key, eq, raw = expression.partition("=")
        if not eq or not key:
            raise InvalidInput(f"--filter {expression!r} must be KEY=VALUE (or KEY=A|B for any of the values)")
        values = [parse_value(v) for v in _alternatives(raw)]
        out[key] = values if len(values) > 1 else values[0]
    return out
