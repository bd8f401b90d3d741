"""Item metadata: validation, filters, and an inverted index that turns a filter into a label set."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from embedsvc.errors import InvalidInput, quoted

Value = Union[str, float, int, bool]
MAX_KEY_BYTES = 128
MAX_STRING_BYTES = 4096
MAX_KEYS = 64


_KIND_NAMES = {"b": "boolean", "n": "number", "s": "string"}


def _shown(value: Value) -> Value:
    """7.0 as 7 in messages (numbers cross the wire as doubles)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _typed(value: Value) -> tuple:
    """A hashable key that keeps True apart from 1 and "1", while 1 == 1.0."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value))
    return ("s", value)


def validate_metadata(metadata: Optional[Mapping[str, Any]], where: str = "") -> dict[str, Value]:
    """Checks keys and values; returns a plain dict (numbers kept as given)."""
    if not metadata:
        return {}
    prefix = f"{where}: " if where else ""
    if len(metadata) > MAX_KEYS:
        raise InvalidInput(f"{prefix}metadata has {len(metadata)} keys; at most {MAX_KEYS} are allowed")
    out = {}
    for key, value in metadata.items():
        if isinstance(key, str) and not _is_utf8(key):
            raise InvalidInput(f"{prefix}metadata key {quoted(key)} is not valid UTF-8 (lone surrogate)")
        if isinstance(value, str) and not _is_utf8(value):
            raise InvalidInput(f"{prefix}metadata value of {quoted(key)} is not valid UTF-8 (lone surrogate)")
        if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
            raise InvalidInput(f"{prefix}metadata key {quoted(key)} must be a non-empty string of at most {MAX_KEY_BYTES} bytes")
        if isinstance(value, bool) or isinstance(value, str):
            if isinstance(value, str) and len(value.encode()) > MAX_STRING_BYTES:
                raise InvalidInput(f"{prefix}metadata value of {quoted(key)} is over {MAX_STRING_BYTES} bytes")
        elif isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise InvalidInput(f"{prefix}metadata value of {quoted(key)} is {value}; numbers must be finite")
        else:
            raise InvalidInput(f"{prefix}metadata value of {quoted(key)} has type {type(value).__name__}; "
                               f"use a string, number or boolean")
        out[key] = value
    return out


def _is_utf8(text: str) -> bool:
    """False for a str with lone surrogates (a file name's undecodable bytes, a JSON "\\udcff"): no store keeps it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Condition:
    """One test on one key: equals, in (any of) or a numeric range (inclusive bounds)."""

    key: str
    equals: Optional[Value] = None
    any_of: Optional[tuple[Value, ...]] = None
    gte: Optional[float] = None
    lte: Optional[float] = None

    def __post_init__(self) -> None:
        kinds = sum([self.equals is not None, self.any_of is not None, self.gte is not None or self.lte is not None])
        if kinds != 1:
            raise InvalidInput(f"filter on {quoted(self.key)} must have exactly one of equals, in, or a range")
        if self.any_of is not None and not self.any_of:
            raise InvalidInput(f"filter on {quoted(self.key)}: 'in' needs at least one value")

    def matches(self, metadata: Mapping[str, Value]) -> bool:
        if self.key not in metadata:
            return False
        value = metadata[self.key]
        if self.equals is not None:
            return _typed(value) == _typed(self.equals)
        if self.any_of is not None:
            return _typed(value) in {_typed(v) for v in self.any_of}
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (self.gte is None or value >= self.gte) and (self.lte is None or value <= self.lte)


@dataclass(frozen=True)
class Filter:
    """All conditions must hold."""

    must: tuple[Condition, ...] = field(default_factory=tuple)

    def matches(self, metadata: Mapping[str, Value]) -> bool:
        return all(c.matches(metadata) for c in self.must)


class MetadataIndex:
    """label -> metadata, and key -> typed value -> labels, for filter evaluation without a scan."""

    def __init__(self) -> None:
        self.by_label: dict[int, dict[str, Value]] = {}
        self._postings: dict[str, dict[tuple, set[int]]] = defaultdict(lambda: defaultdict(set))

    def add(self, label: int, metadata: Mapping[str, Value]) -> None:
        self.by_label[label] = dict(metadata)
        for key, value in metadata.items():
            self._postings[key][_typed(value)].add(label)

    def remove(self, label: int) -> None:
        metadata = self.by_label.pop(label, None)
        for key, value in (metadata or {}).items():
            postings = self._postings[key][_typed(value)]
            postings.discard(label)

    def stored_kinds(self, key: str) -> set[str]:
        """The value types ("b", "n", "s") live items hold under `key`."""
        return {kind for (kind, _), labels in self._postings.get(key, {}).items() if labels}

    def check_types(self, condition: Condition) -> None:
        """Refuses a condition that cannot match because every stored value of its key has another type."""
        refuse_mistyped(condition, self.stored_kinds(condition.key))

    def labels(self, flt: Filter) -> set[int]:
        """Labels of live items matching every condition. A condition whose type no stored value of its key
        has is InvalidInput (see check_types)."""
        for condition in flt.must:
            self.check_types(condition)
        result: Optional[set[int]] = None
        for condition in flt.must:
            postings = self._postings.get(condition.key, {})
            if condition.equals is not None:
                found = set(postings.get(_typed(condition.equals), ()))
            elif condition.any_of is not None:
                found = set().union(*(postings.get(_typed(v), set()) for v in condition.any_of))
            else:
                found = set()
                for (kind, value), labels in postings.items():
                    if kind == "n" and (condition.gte is None or value >= condition.gte) and \
                            (condition.lte is None or value <= condition.lte):
                        found |= labels
            result = found if result is None else result & found
            if not result:
                return set()
        return result if result is not None else set(self.by_label)


def wanted_kinds(condition: Condition) -> set[str]:
    """The value types ("b", "n", "s") a condition can match."""
    if condition.equals is not None:
        return {_typed(condition.equals)[0]}
    if condition.any_of is not None:
        return {_typed(v)[0] for v in condition.any_of}
    return {"n"}  # a range compares numbers


def refuse_mistyped(condition: Condition, stored: set[str]) -> None:
    """InvalidInput when the key's stored values (of types `stored`) all have a type the condition cannot
    match (e.g. the number 7 against labels stored as the string "7"): an error, never a silent empty
    result. Every back end calls this with the types it holds under the key."""
    wanted = wanted_kinds(condition)
    if not stored or wanted & stored:
        return
    asked = [condition.equals] if condition.equals is not None else list(condition.any_of or [0.0])
    names = lambda kinds: " or ".join(sorted(_KIND_NAMES[k] for k in kinds))  # noqa: E731
    shown = [_shown(v) for v in asked]
    asks = "a range" if condition.gte is not None or condition.lte is not None else ", ".join(map(repr, shown))
    hint = ""
    if stored == {"s"} and condition.equals is not None:
        hint = f'; to match the string, quote it (CLI: --filter \'{condition.key}="{shown[0]}"\')'
    elif stored == {"n"} and isinstance(condition.equals, str):
        hint = f"; to match the number, leave it unquoted (CLI: --filter {condition.key}={shown[0]})"
    raise InvalidInput(f"filter on {quoted(condition.key)} asks for {asks} ({names(wanted)}), but every stored "
                       f"{quoted(condition.key)} value is a {names(stored)}{hint}")
