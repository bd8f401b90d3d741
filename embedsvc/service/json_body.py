"""JSON bodies of the HTTP API: requests parsed as json_format parses them, responses rendered as MessageToDict
renders them, fast, and in pieces that each hold the GIL briefly when large.

Parsing. `json_format.Parse` runs `json.loads` over the whole body, one C call that holds the GIL until it is
done (0.6 s for 17 MiB of numbers), then builds the protobuf in Python (seconds more). On the event loop that
also runs grpc.aio, that froze both transports; in a thread, `json.loads` alone still stalls the loop that long.
So a large body is decoded here value by value: objects and arrays are walked in Python, and only leaves (a
string, a number, up to 64 KiB of a run of numbers) go to the json module's C code; the loop gets the GIL back
between steps. The values of vectors go into the protobuf in one call per 64K of them (json_format converts each
in Python, 3 s a million), and what was decoded is freed a piece at a time too. The arrays that
max_items_per_request limits are counted as they are read, and over the limit the items are no longer kept, so
a request with too many items is refused before it becomes protobuf. A small body (SMALL bytes) is decoded by
`json.loads` in one call, as json_format does, with the same count check.

Rendering. `json_format.MessageToDict` converts every float on its own (the shortest decimal that reads back as
the same float32, found by trial formatting in Python): 35 ms for 32 vectors of 512, more than the forward pass.
Here the message is rendered with its `Vector.values` emptied, and the values go back in as float32 numpy arrays
that orjson writes in C, as the shortest decimals of the same float32 values. Everything else is what
MessageToDict gives with `always_print_fields_with_no_presence` (tests/test_json_body.py checks both the
equality and that no per-float Python code runs). orjson writes a whole document in one call that holds the GIL;
`render` writes a large one in pieces (each vector by a call of its own, then the document around them).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from embedsvc.errors import InvalidInput, ResourceExhausted
from embedsvc.service.wire import vector_values
from embedsvc.v1 import embedsvc_pb2 as pb

M = TypeVar("M", bound=Message)

SMALL = 16 * 1024  # bodies up to this many bytes are decoded by json.loads in one call (about 1 ms at most)

# -- requests -----------------------------------------------------------------------------------------

# Keys of request messages whose arrays the engine limits to max_items_per_request, by the same word.
COUNTED = frozenset({"inputs", "items", "ids", "queries", "samples"})
MAX_DEPTH = 100  # json_format's own limit for nested messages
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = re.compile(r"[-+0-9.eE, \t\n\r]*")  # what a run of numbers in an array is made of
RUN_CHARS = 65536  # the most of a run of numbers decoded in one call (~1 ms)
CHUNK = 65536  # the most values a list is checked, moved or freed by in one call
_NUMBER_STARTS = frozenset("-0123456789")
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # C scanner: a value at an index (leaves only)
_FLOAT_MAX = float(np.finfo(np.float32).max)


class Numbers(list):
    """A JSON array of numbers only (ints and floats, no bools): one the protobuf can take in one call."""


class _Decoder:
    """`json.loads` of one text in short steps; `over` is (count, key) of the first limited array too long."""

    def __init__(self, text: str, max_items: int, counted: frozenset):
        self.text, self.max_items, self.counted = text, max_items, counted
        self.over: tuple[int, str] | None = None

    def decode(self):
        value, end = self._value(self._skip(0), 0, None)
        if self._skip(end) != len(self.text):
            raise self._error("Extra data", self._skip(end))
        return value

    def _skip(self, i: int) -> int:
        spaces = _WHITESPACE.match(self.text, i)
        assert spaces is not None  # `*`: it matches everywhere
        return spaces.end()

    def _error(self, message: str, i: int) -> json.JSONDecodeError:
        return json.JSONDecodeError(message, self.text, i)

    def _value(self, i: int, depth: int, key: str | None):
        char = self.text[i : i + 1]
        if char in ("{", "["):
            if depth >= MAX_DEPTH:
                raise self._error(f"nested deeper than {MAX_DEPTH} levels", i)
            return self._object(i + 1, depth + 1) if char == "{" else self._array(i + 1, depth + 1, key)
        try:
            return _SCAN(self.text, i)
        except StopIteration as stop:
            raise self._error("Expecting value", stop.value) from None

    def _object(self, i: int, depth: int):
        out: dict = {}
        try:
            return self._members(out, i, depth)
        except BaseException:
            _release(out)  # a malformed body's decoded part, a piece at a time
            raise

    def _members(self, out: dict, i: int, depth: int):
        text = self.text
        i = self._skip(i)
        if text[i : i + 1] == "}":
            return out, i + 1
        while True:
            if text[i : i + 1] != '"':
                raise self._error("Expecting property name enclosed in double quotes", i)
            key, i = _SCAN(text, i)
            i = self._skip(i)
            if text[i : i + 1] != ":":
                raise self._error("Expecting ':' delimiter", i)
            value, i = self._value(self._skip(i + 1), depth, key if depth == 1 else None)
            if key in out:
                raise ValueError(f"duplicate key {key}")  # as json_format.Parse refuses them
            out[key] = value
            i = self._skip(i)
            if text[i : i + 1] == ",":
                i = self._skip(i + 1)
            elif text[i : i + 1] == "}":
                return out, i + 1
            else:
                raise self._error("Expecting ',' delimiter", i)

    def _array(self, i: int, depth: int, key: str | None):
        out = Numbers()
        try:
            return self._elements(out, i, depth, key)
        except BaseException:
            _release(out)
            raise

    def _elements(self, out: Numbers, i: int, depth: int, key: str | None):
        text, count, numeric = self.text, 0, True
        limit = self.max_items if key in self.counted else None  # past it, count without keeping
        i = self._skip(i)
        if text[i : i + 1] == "]":
            return [], i + 1
        while True:
            if text[i : i + 1] in _NUMBER_STARTS:  # a run of numbers (a vector's values): up to RUN_CHARS at once
                run = _NUMBER_CHARS.match(text, i, i + RUN_CHARS)
                assert run is not None  # `*`: it matches everywhere
                end = run.end()
                closes = text[end : end + 1] == "]"
                last = end if closes else text.rfind(",", i, end)  # whole numbers only
                if last > i:
                    values = self._numbers(i, last)
                    count += len(values)
                    out.extend(values if limit is None else values[: max(0, limit - len(out))])
                    if closes:
                        i = end
                        break
                    i = self._skip(last + 1)
                    continue
            value, i = self._value(i, depth, None)
            numeric = numeric and type(value) in (int, float)
            count += 1
            if limit is None or count <= limit:
                out.append(value)
            i = self._skip(i)
            if text[i : i + 1] == ",":
                i = self._skip(i + 1)
            elif text[i : i + 1] == "]":
                break
            else:
                raise self._error("Expecting ',' delimiter", i)
        if limit is not None and count > limit and self.over is None and key is not None:  # a counted key
            self.over = (count, key)
        return (out if numeric else list(out)), i + 1

    def _numbers(self, i: int, end: int) -> list:
        """The comma-separated numbers in text[i:end]."""
        try:
            return json.loads("[" + self.text[i:end] + "]")
        except json.JSONDecodeError as exc:
            raise self._error(exc.msg, i + exc.pos - 1) from None


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{where} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def decode(
    text: str, max_items: int = 0, counted: frozenset = frozenset(), piecewise: bool | None = None
) -> tuple[Any, tuple[int, str] | None]:
    """`json.loads(text)` (ValueError or RecursionError when malformed; a duplicate key is refused, as json_format
    refuses it), in short steps when `piecewise` (by default: over SMALL characters); with (count, key) of the
    first array under a top-level `counted` key that holds more than `max_items` items, else None. Piecewise,
    the items of such an array past the limit are not kept."""
    if piecewise if piecewise is not None else len(text) > SMALL:
        decoder = _Decoder(text, max_items, counted)
        return decoder.decode(), decoder.over
    value = json.loads(text, object_pairs_hook=_no_duplicates)
    if counted and isinstance(value, dict):
        for key, items in value.items():
            if key in counted and isinstance(items, list) and len(items) > max_items:
                return value, (len(items), key)
    return value, None


def _no_duplicates(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key}")  # as the piecewise decoder says it
        out[key] = value
    return out


def loads(
    data: bytes,
    max_items: int = 0,
    counted: frozenset = frozenset(),
    check_count: Callable[[int, str], None] | None = None,
) -> Any:
    """A JSON body as Python values, in short steps when large (`decode`); check_count(count, key) raises for an
    array under a `counted` key over `max_items`. ValueError (or RecursionError) when it is not JSON."""
    value, over = decode(data.decode("utf-8"), max_items, counted if check_count else frozenset())
    if over:
        assert check_count is not None  # arrays are counted only with check_count
        _release(value)
        check_count(*over)
        raise ResourceExhausted(f"{over[0]} {over[1]} in one request, over the limit of {max_items}")
    return value


def parse(
    data: bytes,
    message_type: type[M],
    where: str = "request body",
    max_items: int = 0,
    check_count: Callable[[int, str], None] | None = None,
    piecewise: bool | None = None,
) -> M:
    """The body as a `message_type`, as json_format.Parse reads it (same errors, as INVALID_ARGUMENT with the
    parser's words), in short steps when `piecewise` (by default when large). With `check_count`, the request's
    limited arrays (COUNTED) are counted first: check_count(count, key) raises for one over `max_items` before
    any protobuf is built."""
    text = _text(data, where)
    if not text.strip(" \t\n\r"):  # JSON's whitespace only
        return message_type()
    descriptor = _descriptor(message_type)
    fields = {f.name for f in descriptor.fields} | {f.json_name for f in descriptor.fields}
    name = descriptor.name
    try:
        decoded, over = decode(text, max_items, COUNTED & fields if check_count else frozenset(), piecewise)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"{where} is not a valid {name} in JSON: Failed to load JSON: {exc}.") from None
    if over:
        assert check_count is not None  # arrays are counted only with check_count
        _release(decoded)
        check_count(*over)  # raises, in the engine's words; never go on with the items cut
        raise ResourceExhausted(f"{over[0]} {over[1]} in one request, over the limit of {max_items}")
    numbers: list = []
    try:
        _take_numbers(decoded, descriptor, (), numbers)
        message = json_format.ParseDict(decoded, message_type())
        for path, values in numbers:
            field = _field(message, path)
            for start in range(0, len(values), CHUNK):
                field.extend(values[start : start + CHUNK])
        return message
    except json_format.ParseError as exc:
        detail = str(exc)
    except Exception as exc:  # noqa: BLE001 - json_format.Parse turns any other into a ParseError like this
        detail = f"Failed to parse JSON: {type(exc).__name__}: {exc}."
    finally:
        _release(decoded)
        _release([values for _, values in numbers])
    raise InvalidInput(f"{where} is not a valid {name} in JSON: {detail}")


def _take_numbers(js, descriptor: Descriptor, path: tuple, taken: list) -> None:
    """Moves the values of repeated float and double fields (a vector's) out of `js`, a message's JSON object,
    into `taken` as (path, values), where json_format would accept every one of them: it converts them one at a
    time in Python (3 s a million), the protobuf takes them in one call (35 ms). Other values stay for it."""
    if not isinstance(js, dict) or descriptor.full_name.startswith("google.protobuf."):  # well-known types
        return
    fields = _fields(descriptor)
    for key, value in js.items():
        field = fields.get(key)
        if field is None:
            continue
        if field.is_repeated and field.cpp_type in _FLOATS:
            if type(value) is Numbers and _representable(value, field.cpp_type):
                taken.append(((*path, field.name), value))
                js[key] = []
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if not field.is_repeated:
                _take_numbers(value, field.message_type, (*path, field.name), taken)
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    _take_numbers(item, field.message_type, (*path, field.name, index), taken)


_FLOATS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)


@functools.cache
def _fields(descriptor: Descriptor) -> dict:
    """A message's fields by JSON name and by proto name, as json_format looks them up."""
    return {**{f.name: f for f in descriptor.fields}, **{f.json_name: f for f in descriptor.fields}}


def _representable(values: list, cpp_type: int) -> bool:
    """All finite, and within float32 for a float field (json_format refuses the others, with its words)."""
    bound = _FLOAT_MAX if cpp_type == FieldDescriptor.CPPTYPE_FLOAT else np.inf
    for start in range(0, len(values), CHUNK):
        try:
            array = np.asarray(values[start : start + CHUNK], dtype=np.float64)
        except OverflowError:  # an integer beyond any float
            return False
        if not (np.isfinite(array).all() and (np.abs(array) <= bound).all()):
            return False
    return True


def _release(value) -> None:
    """Frees a decoded body a piece at a time: dropping a list of millions of objects at once is one C call that
    holds the GIL for as long as freeing them takes (100s of ms)."""
    if isinstance(value, dict):
        for child in value.values():
            if isinstance(child, (dict, list)):
                _release(child)
        while len(value) > CHUNK:
            for _ in range(CHUNK):
                value.popitem()
    elif isinstance(value, list):
        if not isinstance(value, Numbers):
            for child in value:
                if isinstance(child, (dict, list)):
                    _release(child)
        while len(value) > CHUNK:
            del value[-CHUNK:]


def _field(message: Any, path: tuple) -> Any:
    """The field at `path` (names, and indexes into repeated fields) under the message."""
    for step in path:
        message = message[step] if isinstance(step, int) else getattr(message, step)
    return message


def parse_lines(
    data: bytes, start: int, line: int, limit: int, message_type: type[Message]
) -> tuple[list[Message], int, int]:
    """Up to `limit` messages of JSON lines (one message per line, blank lines skipped) from byte `start`,
    whose line number is `line` + 1: (messages, where the next batch starts, the last line number read)."""
    out: list[Message] = []
    while start < len(data) and len(out) < limit:
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line += 1
        chunk = data[start:end]
        start = end + 1
        if chunk.strip():
            out.append(parse(chunk, message_type, f"line {line}"))  # piecewise when the line is large
    return out, start, line


# -- responses ----------------------------------------------------------------------------------------

VECTOR = pb.Vector.DESCRIPTOR
_HOLDS_VECTOR: dict[str, bool] = {}
_WALK: dict[str, list[FieldDescriptor]] = {}


def _descriptor(message: type[Message] | Message) -> Descriptor:
    """A message type's descriptor. The stubs type it as the C (upb) class or the Python one; both have the
    interface of the Python one, which the functions here are written against."""
    return cast(Descriptor, message.DESCRIPTOR)


def _message_type(field: FieldDescriptor) -> Descriptor:
    """The message type of a field of type TYPE_MESSAGE (only fields of other types have None)."""
    assert field.message_type is not None
    return field.message_type


def _holds_vector(descriptor: Descriptor) -> bool:
    """Whether a Vector can occur in messages of this type (maps aside: no map value is a Vector)."""
    if descriptor.full_name not in _HOLDS_VECTOR:
        seen, stack, found = set(), [descriptor], False
        while stack and not found:  # depth first over the message types reachable from this one
            d = stack.pop()
            found = d is VECTOR
            if d.full_name not in seen:
                seen.add(d.full_name)
                stack += [_message_type(f) for f in _vector_fields(d)]
        _HOLDS_VECTOR[descriptor.full_name] = found
    return _HOLDS_VECTOR[descriptor.full_name]


def _vector_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    return [
        f
        for f in descriptor.fields
        if f.type == FieldDescriptor.TYPE_MESSAGE and not _message_type(f).GetOptions().map_entry
    ]


def _fields_to_walk(descriptor: Descriptor) -> list[FieldDescriptor]:
    """The fields of this type under which a Vector can occur (cached: it runs per message of a response)."""
    fields = _WALK.get(descriptor.full_name)
    if fields is None:
        fields = _WALK[descriptor.full_name] = [
            f for f in _vector_fields(descriptor) if _holds_vector(_message_type(f))
        ]
    return fields


def _take_vectors(message: Message, out: list[np.ndarray]) -> None:
    """Appends every Vector's values (depth first, fields in descriptor order) and empties them."""
    if message.DESCRIPTOR is VECTOR:
        out.append(vector_values(cast(pb.Vector, message)))  # its packed bytes: no Python float per value
        message.ClearField("values")
        return
    for f in _fields_to_walk(_descriptor(message)):
        if f.is_repeated:
            for child in getattr(message, f.name):
                _take_vectors(child, out)
        elif message.HasField(f.name):
            _take_vectors(getattr(message, f.name), out)


def _put_vectors(document: dict, descriptor: Descriptor, vectors: Iterator[Any]) -> None:
    """Puts the values back where MessageToDict wrote each emptied Vector, in the order taken."""
    if descriptor is VECTOR:
        document["values"] = next(vectors)
        return
    for f in _fields_to_walk(descriptor):
        value = document.get(f.json_name)
        if value is None:  # an unset singular message: absent from both walks
            continue
        for child in value if f.is_repeated else [value]:
            _put_vectors(child, _message_type(f), vectors)


def floats(arrays: list[np.ndarray]) -> list[Any]:
    """The float32 arrays for `dumps` to write; one holding NaN or infinities becomes the list MessageToDict
    writes for it (JSON has no such numbers: "NaN", "Infinity" strings)."""
    if not arrays or np.isfinite(np.concatenate(arrays)).all():  # one check for all: they are rare
        return arrays
    return [_json_floats(a) for a in arrays]


def _json_floats(values: np.ndarray) -> Any:
    if np.isfinite(values).all():
        return values
    return [
        v if math.isfinite(v) else ("NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity")
        for v in values.tolist()
    ]


MODALITY = {v.number: v.name for v in pb.Modality.DESCRIPTOR.values}


def embed_document(
    model: str,
    modalities: Sequence[int],
    truncated: Sequence[bool],
    names: Sequence[str],
    vectors: Sequence[np.ndarray],
    tokens: Sequence[pb.TokenFeatures | None] | None = None,
) -> dict:
    """What `document(wire.embed_response(...))` gives for the same arguments (tokens as messages, not bytes),
    built from the matrices without an EmbedResponse in between: Embed is the hot path over HTTP."""
    rows = []
    for matrix in vectors:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        rows.append(list(matrix) if np.isfinite(matrix).all() else [_json_floats(row) for row in matrix])
    results = []
    for i, modality in enumerate(modalities):
        result: dict[str, Any] = {
            "modality": MODALITY.get(modality, modality),
            "truncated": bool(truncated[i]),
            "embeddings": [{"pooling": name, "vector": {"values": r[i]}} for name, r in zip(names, rows)],
        }
        if tokens is not None and (token := tokens[i]) is not None:
            result["tokens"] = json_format.MessageToDict(token, always_print_fields_with_no_presence=True)
        results.append(result)
    return {"model": model, "results": results}


def document(message: Message) -> dict:
    """The message as MessageToDict(always_print_fields_with_no_presence=True) gives it (key order aside),
    vectors as float32 arrays. Consumes the message: its vectors are emptied."""
    vectors: list[np.ndarray] = []
    _take_vectors(message, vectors)
    out = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    if vectors:
        _put_vectors(out, _descriptor(message), iter(floats(vectors)))
    return out


def weight(value: Any, limit: int) -> int:
    """About how many bytes `dumps(value)` writes, counted only until past `limit`, so that telling a small
    document from a large one costs little on the event loop."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            total += item.size * 12  # "-0.12345678,"
        elif isinstance(item, dict):
            total += 4 * len(item) + 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            total += len(item) + 2
            if len(item) <= limit:
                stack.extend(item)
        elif isinstance(item, str):
            total += len(item) + 2
        else:
            total += 8
    return total


def render(value: Any) -> bytes:
    """`dumps(value)` in pieces, for a large document: each array is written by a call of its own, then the
    document around them (a copy of their bytes), since orjson holds the GIL for the whole of a call."""
    return dumps(_pieces(value))


def _pieces(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return orjson.Fragment(dumps(value)) if value.ndim < 2 else [_pieces(row) for row in value]
    if isinstance(value, dict):
        return {key: _pieces(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_pieces(item) for item in value]
    return value


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; numpy arrays as lists of numbers (float32 as their shortest decimals)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_fallback)


def _fallback(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # a layout orjson does not take (non-contiguous, big-endian)
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
