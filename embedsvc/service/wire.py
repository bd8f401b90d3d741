"""Protobuf wire bytes for float matrices: an EmbedResponse built from numpy rows without Python floats, and
vectors read into numpy the same way.

Setting `Vector.values` from Python (a list or a numpy row) converts every float on its own: 32 inputs
x 512 dimensions cost about 2 ms, more than a small model's forward. A packed `repeated float` is, on the
wire, a tag, a length and the little-endian floats, which numpy already holds; so the response is
assembled as bytes and parsed once (a memcpy per vector in the upb runtime). Equality with the message
built field by field is tested (tests/test_batching.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedsvc.v1 import embedsvc_pb2 as pb

_LEN, _VARINT = 2, 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _key(number: int, kind: int) -> bytes:
    return _varint(number << 3 | kind)


def _field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(payload)) + payload


def embed_response(
    model: str,
    modalities: Sequence[int],
    truncated: Sequence[bool],
    names: Sequence[str],
    vectors: Sequence[np.ndarray],
    tokens: Sequence[bytes | None] | None = None,
) -> pb.EmbedResponse:
    """EmbedResponse with one result per row: `vectors` holds one [N, dim] matrix per pooling (`names`),
    `tokens` optional serialized TokenFeatures per row. Field numbers follow embedsvc.proto."""
    matrices = [np.ascontiguousarray(v, dtype="<f4") for v in vectors]
    heads = []
    for name, matrix in zip(names, matrices):
        values = _key(1, _LEN) + _varint(matrix.shape[1] * 4)  # Vector.values, packed: tag, byte length
        heads.append(_field(1, name.encode()) + _key(2, _LEN) + _varint(len(values) + matrix.shape[1] * 4) + values)
    results = []
    for i, modality in enumerate(modalities):
        body = [_key(1, _VARINT) + _varint(modality)] if modality else []
        body += [_field(2, head + matrix[i].tobytes()) for head, matrix in zip(heads, matrices)]
        if truncated[i]:
            body.append(_key(3, _VARINT) + b"\x01")
        if tokens is not None and (token := tokens[i]) is not None:
            body.append(_field(4, token))
        results.append(_field(2, b"".join(body)))
    return pb.EmbedResponse.FromString(_field(1, model.encode()) + b"".join(results))


def vector_rows(vectors: Sequence[pb.Vector]) -> list[np.ndarray]:
    """vector_values of many vectors: when each is one packed field of the same length (an upsert's usual
    case), they are read into one matrix with one copy and each vector is a row of it."""
    blobs = [v.SerializeToString() for v in vectors]
    header = _packed_header(blobs[0]) if blobs else b""
    size = len(blobs[0]) if blobs else 0
    if not header or (size - len(header)) % 4 or any(len(b) != size or not b.startswith(header) for b in blobs):
        return [vector_values(v) for v in vectors]
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), size)
    matrix = np.ascontiguousarray(raw[:, len(header) :]).view("<f4").astype(np.float32, copy=False)
    return list(matrix)


def _packed_header(data: bytes) -> bytes:
    """The tag and length before the floats when `data` is exactly one packed `values` field, else b"" (no
    values, or fields this version does not know after them)."""
    if not data.startswith(_key(1, _LEN)):
        return b""
    length, offset, shift = 0, 1, 0
    while offset < len(data):
        byte = data[offset]
        length, offset, shift = length | (byte & 0x7F) << shift, offset + 1, shift + 7
        if not byte & 0x80:
            return data[:offset] if offset + length == len(data) else b""
    return b""


def vector_values(vector: pb.Vector) -> np.ndarray:
    """Vector.values as float32, read from the packed field's wire bytes: iterating the field costs ~35 ns a
    value on the event loop (130 ms for a request of 1,024 vectors of 3,600), the bytes are one memcpy."""
    data = vector.SerializeToString()
    if not data.startswith(_key(1, _LEN)):
        return np.asarray(vector.values, dtype=np.float32)  # no values
    length, offset, shift = 0, 1, 0
    while True:
        byte = data[offset]
        length, offset, shift = length | (byte & 0x7F) << shift, offset + 1, shift + 7
        if not byte & 0x80:
            break
    return np.frombuffer(data, dtype="<f4", count=length // 4, offset=offset).astype(np.float32)  # own copy
