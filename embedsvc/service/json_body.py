"""HTTP response bodies: protobuf's JSON mapping, with vectors written without Python work per float.

`json_format.MessageToDict` converts every float on its own (the shortest decimal that reads back as the same
float32, found by trial formatting in Python): 35 ms for 32 vectors of 512, more than the forward pass. Here
the message is rendered with its `Vector.values` emptied, and the values go back in as float32 numpy arrays
that orjson writes in C, as the shortest decimals of the same float32 values. Everything else is what
MessageToDict gives with `always_print_fields_with_no_presence` (tests/test_json_body.py checks both the
equality and that no per-float Python code runs).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from embedsvc.v1 import embedsvc_pb2 as pb

VECTOR = pb.Vector.DESCRIPTOR
_HOLDS_VECTOR: dict[str, bool] = {}
_WALK: dict[str, list[FieldDescriptor]] = {}


def _holds_vector(descriptor: Descriptor) -> bool:
    """Whether a Vector can occur in messages of this type (maps aside: no map value is a Vector)."""
    if descriptor.full_name not in _HOLDS_VECTOR:
        seen, stack, found = set(), [descriptor], False
        while stack and not found:  # depth first over the message types reachable from this one
            d = stack.pop()
            found = d is VECTOR
            if d.full_name not in seen:
                seen.add(d.full_name)
                stack += [f.message_type for f in _vector_fields(d)]
        _HOLDS_VECTOR[descriptor.full_name] = found
    return _HOLDS_VECTOR[descriptor.full_name]


def _vector_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    return [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE
            and not f.message_type.GetOptions().map_entry]


def _fields_to_walk(descriptor: Descriptor) -> list[FieldDescriptor]:
    """The fields of this type under which a Vector can occur (cached: it runs per message of a response)."""
    fields = _WALK.get(descriptor.full_name)
    if fields is None:
        fields = _WALK[descriptor.full_name] = [f for f in _vector_fields(descriptor) if _holds_vector(f.message_type)]
    return fields


def _take_vectors(message: Message, out: list[np.ndarray]) -> None:
    """Appends every Vector's values (depth first, fields in descriptor order) and empties them."""
    if message.DESCRIPTOR is VECTOR:
        out.append(np.asarray(message.values, dtype=np.float32))
        message.ClearField("values")
        return
    for f in _fields_to_walk(message.DESCRIPTOR):
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
        for child in (value if f.is_repeated else [value]):
            _put_vectors(child, f.message_type, vectors)


def floats(arrays: list[np.ndarray]) -> list[Any]:
    """The float32 arrays for `dumps` to write; one holding NaN or infinities becomes the list MessageToDict
    writes for it (JSON has no such numbers: "NaN", "Infinity" strings)."""
    if not arrays or np.isfinite(np.concatenate(arrays)).all():  # one check for all: they are rare
        return arrays
    return [_json_floats(a) for a in arrays]


def _json_floats(values: np.ndarray) -> Any:
    if np.isfinite(values).all():
        return values
    return [v if math.isfinite(v) else ("NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity")
            for v in values.tolist()]


MODALITY = {v.number: v.name for v in pb.Modality.DESCRIPTOR.values}


def embed_document(model: str, modalities: Sequence[int], truncated: Sequence[bool], names: Sequence[str],
                   vectors: Sequence[np.ndarray], tokens: Optional[Sequence[Optional[pb.TokenFeatures]]] = None
                   ) -> dict:
    """What `document(wire.embed_response(...))` gives for the same arguments (tokens as messages, not bytes),
    built from the matrices without an EmbedResponse in between: Embed is the hot path over HTTP."""
    rows = []
    for matrix in vectors:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        rows.append(list(matrix) if np.isfinite(matrix).all() else [_json_floats(row) for row in matrix])
    results = []
    for i, modality in enumerate(modalities):
        result = {"modality": MODALITY.get(modality, modality), "truncated": bool(truncated[i]),
                  "embeddings": [{"pooling": name, "vector": {"values": r[i]}} for name, r in zip(names, rows)]}
        if tokens is not None and tokens[i] is not None:
            result["tokens"] = json_format.MessageToDict(tokens[i], always_print_fields_with_no_presence=True)
        results.append(result)
    return {"model": model, "results": results}


def document(message: Message) -> dict:
    """The message as MessageToDict(always_print_fields_with_no_presence=True) gives it (key order aside),
    vectors as float32 arrays. Consumes the message: its vectors are emptied."""
    vectors: list[np.ndarray] = []
    _take_vectors(message, vectors)
    out = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    if vectors:
        _put_vectors(out, message.DESCRIPTOR, iter(floats(vectors)))
    return out


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; numpy arrays as lists of numbers (float32 as their shortest decimals)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_fallback)


def _fallback(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # a layout orjson does not take (non-contiguous, big-endian)
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
