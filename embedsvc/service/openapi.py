"""The OpenAPI 3.1 document of the HTTP API, built from the proto descriptors and the HTTP route table.

Schemas come from the generated protobuf descriptors, with the names and types of protobuf's JSON
mapping (lowerCamelCase fields, 64-bit integers as strings, bytes as base64, enums by name), so the
document cannot drift from what json_format parses and renders.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

import embedsvc
from embedsvc.service import openai_api
from embedsvc.store.filter_text import FORMS
from embedsvc.v1 import embedsvc_pb2 as pb

F = FieldDescriptor
SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number"},
    F.TYPE_FLOAT: {"type": "number"},
    F.TYPE_INT32: {"type": "integer"},
    F.TYPE_UINT32: {"type": "integer", "minimum": 0},
    F.TYPE_SINT32: {"type": "integer"},
    F.TYPE_FIXED32: {"type": "integer"},
    F.TYPE_SFIXED32: {"type": "integer"},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
ERROR = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "description": "gRPC status code name, e.g. INVALID_ARGUMENT"},
        "message": {"type": "string", "description": "what went wrong and what to do about it"},
    },
}
ERROR_STATUSES = {
    "400": "INVALID_ARGUMENT or FAILED_PRECONDITION",
    "401": "UNAUTHENTICATED",
    "403": "PERMISSION_DENIED: a token without the scope, or a write from a page of another origin "
    "not in http_cors_origins",
    "404": "NOT_FOUND",
    "408": "DEADLINE_EXCEEDED: the body came slower than http_body_timeout_seconds",
    "409": "ALREADY_EXISTS",
    "413": "RESOURCE_EXHAUSTED: body over http_max_body_bytes",
    "421": "PERMISSION_DENIED: a Host the server does not answer for (http_allowed_hosts)",
    "429": "RESOURCE_EXHAUSTED: a limit, a full queue or a busy server",
    "503": "UNAVAILABLE: shutting down",
}
UNSUPPORTED_MEDIA_TYPE = "INVALID_ARGUMENT: no Content-Type, or one this endpoint does not read"

# Field notes the docs page shows beside a field's type, where the type alone does not say how to use it.
FIELD_NOTES = {
    ("SearchRequest", "filter_text"): f"the filter as text, as `embedsvc search --filter` and the search page take "
    f"it: {FORMS}. Example: objects>=2 colour=red|blue. Set filter or filterText, "
    f"not both; text that does not parse is 400 INVALID_ARGUMENT.",
    ("SearchRequest", "filter"): "the filter as conditions (equals, in, range with gte/gt/lte/lt), all of which must "
    "hold; filterText is the same as text",
    ("SearchResponse", "unknown_filter_keys"): "filter keys no item of the collection holds (a typo?), so the filter "
    "matched nothing; checked when a filtered search found no hits",
}


def _ref(descriptor) -> dict:
    return {"$ref": f"#/components/schemas/{descriptor.name}"}


def _field_schema(f: FieldDescriptor) -> dict:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _field_schema(f.message_type.fields_by_name["value"])}
    if f.type == F.TYPE_MESSAGE:
        item = _ref(f.message_type)
    elif f.type == F.TYPE_ENUM:
        assert f.enum_type is not None  # an enum field's
        item = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
    else:
        item = dict(SCALARS[f.type])
    return {"type": "array", "items": item} if f.is_repeated else item


def _message_schema(descriptor: Descriptor) -> dict:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {f.json_name: _field_schema(f) for f in descriptor.fields},
    }
    for f in descriptor.fields:
        if (descriptor.name, f.name) in FIELD_NOTES:
            schema["properties"][f.json_name]["description"] = FIELD_NOTES[descriptor.name, f.name]
    oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]  # "_gte": proto3 optional, not a choice
    if oneofs:
        schema["description"] = "; ".join(
            f"set at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs
        )
    return schema


def _all_messages(descriptor_file) -> dict:
    schemas = {}
    for message in descriptor_file.message_types_by_name.values():
        schemas[message.name] = _message_schema(message)
    return schemas


def _responses(response_schema: dict, media_type: str = "application/json") -> dict:
    out = {"200": {"description": "OK", "content": {media_type: {"schema": response_schema}}}}
    for status, what in ERROR_STATUSES.items():
        out[status] = {
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return out


@functools.lru_cache(maxsize=4)
def _document(endpoints: tuple, thumbnail_path: str, auth: bool) -> dict:
    paths: dict = {}
    for e in endpoints:
        path = e.path
        operation = {
            "operationId": e.rpc,
            "summary": e.summary,
            "tags": [e.grpc_method.split("/")[1]],
            "description": f"The HTTP form of the gRPC method {e.grpc_method}; the body and response are "
            f"its messages in protobuf's JSON mapping.",
            "responses": _responses(_ref(e.response_type.DESCRIPTOR)),
        }
        if e.path_field:
            operation["parameters"] = [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": f"collection name (fills the request's `{e.path_field}`)",
                }
            ]
        if e.body:
            content = {"application/json": {"schema": _ref(e.request_type.DESCRIPTOR)}}
            for extra in e.extra_content:
                content[extra] = {"schema": {"type": "string"}}
            operation["requestBody"] = {"required": True, "content": content}
            operation["responses"]["415"] = {
                "description": UNSUPPORTED_MEDIA_TYPE,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        paths.setdefault(path, {})[e.method.lower()] = operation
    thumbnail = thumbnail_path.replace("{id:path}", "{id}")
    paths[thumbnail] = {
        "get": {
            "operationId": "GetThumbnail",
            "summary": "The stored thumbnail (JPEG) of an image item.",
            "tags": ["embedsvc.v1.IndexService"],
            "parameters": [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in ("name", "id")
            ],
            "responses": _responses({"type": "string", "format": "binary"}, "image/jpeg"),
        }
    }
    for probe, what in (
        ("/healthz", "the process is alive"),
        ("/readyz", "ready for traffic; 503 while collections load at start-up and while shutting down"),
    ):
        paths[probe] = {
            "get": {
                "operationId": probe[1:],
                "summary": what,
                "tags": ["probes"],
                "security": [],
                "responses": {"200": {"description": "OK"}, "503": {"description": "not ready"}},
            }
        }
    schemas = _all_messages(pb.DESCRIPTOR)
    schemas["Error"] = ERROR
    openai_api.add_to_openapi(paths, schemas, {**ERROR_STATUSES, "415": UNSUPPORTED_MEDIA_TYPE})
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "embedsvc HTTP/JSON API",
            "version": embedsvc.__version__,
            "description": "CLIP pooled-embedding retrieval. Every endpoint mirrors a gRPC method of "
            "embedsvc.v1; field names follow protobuf's JSON mapping.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API token (read or write scope)"}
            },
        },
    }
    if auth:
        document["security"] = [{"bearer": []}]
    return document


def openapi_document(endpoints, thumbnail_path: str, auth: bool) -> dict:
    return _document(tuple(endpoints), thumbnail_path, auth)
