"""Metadata filters compiled into Milvus boolean expressions over an item's `filterable` JSON field.

Keys never enter an expression as text: `filterable` holds each value under its type tag and the key's UTF-8
bytes in hex, so a key is `filterable["s6b6579"]` whatever it contains. Values are bound as template
parameters where the server supports them (Milvus >= 2.5, see templates_supported) or written as escaped literals
(Milvus Lite and older servers have no templates). The type tags keep True apart from 1 and "1" while 1 == 1.0, as
the local store's filters do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from embedsvc.errors import InvalidInput
from embedsvc.store.metadata import Condition, Filter, Value


def templates_supported(server_version: str) -> bool:
    """Whether a server of this version (get_server_version: `v2.5.14`, `v2.3.5-lite`, `milvus_lite ...`) binds
    filter templates: Milvus 2.5 brought them; older servers refuse `{p0}` with 'cannot parse expression'. A
    version that is not a release number (a development build) is taken to be current."""
    if server_version.startswith("milvus_lite"):
        return False
    release = re.match(r"v?(\d+)\.(\d+)", server_version)
    return release is None or (int(release.group(1)), int(release.group(2))) >= (2, 5)


def tagged_key(key: str, value: Value) -> str:
    """The `filterable` key of a metadata value: its type tag, then the key's UTF-8 bytes in hex."""
    tag = "b" if isinstance(value, bool) else "n" if isinstance(value, (int, float)) else "s"
    return tag + key.encode("utf-8").hex()


def filterable(metadata: dict[str, Value]) -> dict[str, Any]:
    return {
        tagged_key(k, v): (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
        for k, v in metadata.items()
    }


def quote(text: str) -> str:
    """A Milvus string literal: the escapes both Milvus's and Milvus Lite's grammars define."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise InvalidInput(f"cannot use {type(value).__name__} in a filter")


class Expression:
    """Builds one boolean expression; values are bound as template parameters or written as literals."""

    def __init__(self, bind: bool):
        self.bind = bind
        self.params: dict[str, Any] = {}

    def value(self, value: Any) -> str:
        if not self.bind:
            return literal(value)
        name = f"p{len(self.params)}"
        self.params[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        return "{" + name + "}"

    def equals(self, key: str, value: Value) -> str:
        return f'filterable["{tagged_key(key, value)}"] == {self.value(value)}'

    def condition(self, condition: Condition) -> str | None:
        """The condition's expression, or None when it can match nothing (a NaN bound)."""
        if condition.equals is not None:
            return self.equals(condition.key, condition.equals)
        if condition.any_of is not None:  # Milvus Lite has no `in` on JSON paths: an `or` of equalities
            return "(" + " or ".join(self.equals(condition.key, v) for v in condition.any_of) + ")"
        field = f'filterable["{tagged_key(condition.key, 0.0)}"]'
        parts = []
        for bound, op in ((condition.gte, ">="), (condition.gt, ">"), (condition.lte, "<="), (condition.lt, "<")):
            if bound is None:
                continue
            bound = float(bound)
            if math.isnan(bound):
                return None
            parts.append(f"{field} {op} {self.value(max(-1.7976931348623157e308, min(1.7976931348623157e308, bound)))}")
        return "(" + " and ".join(parts) + ")"

    def filter(self, flt: Filter | None) -> str | None:
        """'' for no filter, None for one that matches nothing."""
        if flt is None or not flt.must:
            return ""
        parts = [self.condition(c) for c in flt.must]
        kept = [p for p in parts if p is not None]
        return " and ".join(kept) if len(kept) == len(parts) else None

    def ids(self, ids: Sequence[str]) -> str:
        return f"id in {self.value(list(ids))}"
