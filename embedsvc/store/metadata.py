"""Item metadata: validation, filters, and an inverted index that turns a filter into a label set."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsvc.errors import InvalidInput, quoted

Value = str | float | int | bool
MAX_KEY_BYTES = 128
MAX_STRING_BYTES = 4096
MAX_KEYS = 64
# A filter's cost grows with its conditions (each scans its key's distinct values here, and is a query of its
# own on Milvus) and values: bounded, so one request cannot hold a collection's lock, and writers, for hours.
MAX_CONDITIONS = 64
MAX_FILTER_VALUES = 4096  # over all of a filter's any-of lists


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


def validate_metadata(metadata: Mapping[str, Any] | None, where: str | Callable[[], str] = "") -> dict[str, Value]:
    """Checks keys and values; returns a plain dict (numbers kept as given). `where` (or a function making
    it, called only for a message) says whose metadata it is."""
    if not metadata:
        return {}
    if _plain(metadata):
        return dict(metadata)
    where = where() if callable(where) else where
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
            raise InvalidInput(
                f"{prefix}metadata key {quoted(key)} must be a non-empty string of at most {MAX_KEY_BYTES} bytes"
            )
        if isinstance(value, (bool, str)):
            if isinstance(value, str) and len(value.encode()) > MAX_STRING_BYTES:
                raise InvalidInput(f"{prefix}metadata value of {quoted(key)} is over {MAX_STRING_BYTES} bytes")
        elif isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise InvalidInput(f"{prefix}metadata value of {quoted(key)} is {value}; numbers must be finite")
        else:
            raise InvalidInput(
                f"{prefix}metadata value of {quoted(key)} has type {type(value).__name__}; "
                f"use a string, number or boolean"
            )
        out[key] = value
    return out


def _plain(metadata: Mapping[str, Any]) -> bool:
    """True when every key and value is plainly valid (ASCII text within the limits, a finite number, a
    boolean): the usual case, decided without encoding any text; anything else gets the full checks."""
    if len(metadata) > MAX_KEYS:
        return False
    for key, value in metadata.items():
        if type(key) is not str or not key.isascii() or not 0 < len(key) <= MAX_KEY_BYTES:
            return False
        kind = type(value)
        if kind is str:
            if not value.isascii() or len(value) > MAX_STRING_BYTES:
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is int:
            if not -(2**63) <= value < 2**64:
                return False
        elif kind is not bool:
            return False
    return True


def _is_utf8(text: str) -> bool:
    """False for a str with lone surrogates (a file name's undecodable bytes, a JSON "\\udcff"): no store keeps it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Condition:
    """One test on one key: equals, in (any of) or a numeric range (gte/lte inclusive, gt/lt exclusive bounds)."""

    key: str
    equals: Value | None = None
    any_of: tuple[Value, ...] | None = None
    gte: float | None = None
    lte: float | None = None
    gt: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        kinds = sum([self.equals is not None, self.any_of is not None, self.is_range])
        if kinds != 1:
            raise InvalidInput(f"filter on {quoted(self.key)} must have exactly one of equals, in, or a range")
        if self.any_of is not None and not self.any_of:
            raise InvalidInput(f"filter on {quoted(self.key)}: 'in' needs at least one value")

    @property
    def is_range(self) -> bool:
        return any(bound is not None for bound in (self.gte, self.lte, self.gt, self.lt))

    def in_range(self, value: float) -> bool:
        """Whether a number lies within every bound set (a NaN bound admits nothing)."""
        return (
            (self.gte is None or value >= self.gte)
            and (self.gt is None or value > self.gt)
            and (self.lte is None or value <= self.lte)
            and (self.lt is None or value < self.lt)
        )

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
        return self.in_range(value)


@dataclass(frozen=True)
class Filter:
    """All conditions must hold."""

    must: tuple[Condition, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.must) > MAX_CONDITIONS:
            raise InvalidInput(f"filter has {len(self.must)} conditions; at most {MAX_CONDITIONS} are allowed")
        values = sum(len(c.any_of) for c in self.must if c.any_of is not None)
        if values > MAX_FILTER_VALUES:
            raise InvalidInput(f"filter lists {values} values; at most {MAX_FILTER_VALUES} are allowed in all")

    def matches(self, metadata: Mapping[str, Value]) -> bool:
        return all(c.matches(metadata) for c in self.must)


class _Column:
    """One key's values over labels: a code per label (-1: absent) into a dictionary of distinct values."""

    def __init__(self, capacity: int) -> None:
        self.codes = np.full(capacity, -1, dtype=np.int32)
        self.values: list[Value] = []  # code -> the value as first stored (1 and 1.0 keep their own codes)
        self.code_of: dict[tuple, int] = {}  # (type name, value) -> code
        self.typed: list[tuple] = []  # code -> _typed(value), what filters compare
        self.live = np.zeros(0, dtype=np.int64)  # code -> live labels holding it

    def code(self, value: Value) -> int:
        key = (type(value).__name__, value)
        found = self.code_of.get(key)
        if found is None:
            found = self.code_of[key] = len(self.values)
            self.values.append(value)
            self.typed.append(_typed(value))
        return found

    def matching(self, condition: Condition) -> np.ndarray:
        """Codes whose value satisfies the condition."""
        if condition.equals is not None:
            wanted = {_typed(condition.equals)}
        elif condition.any_of is not None:
            wanted = {_typed(v) for v in condition.any_of}
        else:
            return np.array(
                [c for c, (kind, value) in enumerate(self.typed) if kind == "n" and condition.in_range(value)],
                dtype=np.int32,
            )
        return np.array([c for c, typed in enumerate(self.typed) if typed in wanted], dtype=np.int32)


class MetadataIndex:
    """Metadata in columns (per key, a code per label into its distinct values), for filters evaluated in numpy
    and start-ups that load arrays instead of parsing a JSON document per item. The items table keeps each
    item's metadata as given; this index answers filters."""

    def __init__(self) -> None:
        self.capacity = 0
        self.columns: dict[str, _Column] = {}

    def _reserve(self, top: int) -> None:
        if top <= self.capacity:
            return
        self.capacity = max(top, 1024, int(self.capacity * 1.5))
        for column in self.columns.values():
            grown = np.full(self.capacity, -1, dtype=np.int32)
            grown[: len(column.codes)] = column.codes
            column.codes = grown

    def add(self, label: int, metadata: Mapping[str, Value]) -> None:
        self.add_many([label], [metadata])

    def add_many(self, labels: list[int], metadata: list[Mapping[str, Value]]) -> None:
        """Labels are new (not live): a replaced item is removed under its old label first."""
        if not labels:
            return
        self._reserve(max(labels) + 1)
        touched: dict[str, tuple[list[int], list[int]]] = {}
        for label, meta in zip(labels, metadata):
            for key, value in meta.items():
                column = self.columns.get(key)
                if column is None:
                    column = self.columns[key] = _Column(self.capacity)
                at, codes = touched.setdefault(key, ([], []))
                at.append(label)
                codes.append(column.code(value))
        for key, (at, codes) in touched.items():
            column = self.columns[key]
            column.codes[at] = codes
            column.live = _counts_plus(column.live, np.asarray(codes, dtype=np.int64), len(column.values))

    def remove(self, label: int) -> None:
        self.remove_many(np.array([label], dtype=np.int64))

    def remove_many(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        labels = labels[labels < self.capacity]
        for column in self.columns.values():
            codes = column.codes[labels]
            held = codes[codes >= 0].astype(np.int64)
            if len(held):
                column.live = _counts_plus(column.live, held, len(column.values), -1)
                column.codes[labels] = -1

    def stored_kinds(self, key: str) -> set[str]:
        """The value types ("b", "n", "s") live items hold under `key`."""
        column = self.columns.get(key)
        if column is None:
            return set()
        return {column.typed[c][0] for c in np.flatnonzero(column.live).tolist()}

    def holds_key(self, key: str) -> bool:
        """Whether any live item has a value under `key`."""
        return bool(self.stored_kinds(key))

    def check_types(self, condition: Condition) -> None:
        """Refuses a condition that cannot match because every stored value of its key has another type."""
        refuse_mistyped(condition, self.stored_kinds(condition.key))

    def labels(self, flt: Filter) -> np.ndarray:
        """Labels (ascending) of live items matching every condition. A condition whose type no stored value of
        its key has is InvalidInput (see check_types). An empty filter matches nothing here: the store searches
        without a selection then."""
        for condition in flt.must:
            self.check_types(condition)
        mask: np.ndarray | None = None
        for condition in flt.must:
            column = self.columns.get(condition.key)
            if column is None:
                return np.empty(0, dtype=np.int64)
            codes = column.matching(condition)
            found = column.codes == codes[0] if len(codes) == 1 else np.isin(column.codes, codes)
            mask = found if mask is None else mask & found
        return np.flatnonzero(mask) if mask is not None else np.empty(0, dtype=np.int64)

    # -- checkpoints --------------------------------------------------------------------------

    def snapshot(self, size: int) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able header, arrays) of the columns over labels below `size`; copies only the code arrays."""
        header = {"keys": list(self.columns), "values": [list(c.values) for c in self.columns.values()]}
        arrays = {f"meta{i}": c.codes[:size].copy() for i, c in enumerate(self.columns.values())}
        return header, arrays

    @classmethod
    def from_snapshot(cls, header: dict, arrays: Mapping[str, np.ndarray]) -> MetadataIndex:
        self = cls()
        keys, values = header["keys"], header["values"]
        if len(keys) != len(values):
            raise ValueError("metadata snapshot keys and values differ in length")
        self.capacity = max([len(arrays[f"meta{i}"]) for i in range(len(keys))], default=0)
        for i, (key, vals) in enumerate(zip(keys, values)):
            column = _Column(self.capacity)
            for value in vals:
                column.code(value)
            if len(column.values) != len(vals):
                raise ValueError(f"metadata snapshot repeats a value of {key!r}")
            codes = np.asarray(arrays[f"meta{i}"], dtype=np.int32)
            if len(codes) and (codes.max() >= len(vals) or codes.min() < -1):
                raise ValueError(f"metadata snapshot of {key!r} has codes outside its values")
            column.codes[: len(codes)] = codes
            column.live = np.bincount(codes[codes >= 0], minlength=len(vals)).astype(np.int64)
            self.columns[key] = column
        return self


def _counts_plus(counts: np.ndarray, codes: np.ndarray, size: int, sign: int = 1) -> np.ndarray:
    if len(counts) < size:
        counts = np.concatenate([counts, np.zeros(size - len(counts), dtype=np.int64)])
    np.add.at(counts, codes, sign)
    return counts


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

    def names(kinds) -> str:
        return " or ".join(sorted(_KIND_NAMES[k] for k in kinds))

    shown = [_shown(v) for v in asked]
    asks = "a range" if condition.is_range else ", ".join(map(repr, shown))
    hint = ""
    if stored == {"s"} and condition.equals is not None:
        hint = f"; to match the string, quote it (CLI: --filter '{condition.key}=\"{shown[0]}\"')"
    elif stored == {"n"} and isinstance(condition.equals, str):
        hint = f"; to match the number, leave it unquoted (CLI: --filter {condition.key}={shown[0]})"
    raise InvalidInput(
        f"filter on {quoted(condition.key)} asks for {asks} ({names(wanted)}), but every stored "
        f"{quoted(condition.key)} value is a {names(stored)}{hint}"
    )
