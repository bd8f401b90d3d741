"""The one place where domain errors become gRPC status codes, and status codes become HTTP statuses."""

from __future__ import annotations

import grpc

from embedsvc import errors

STATUS = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]

# gRPC code -> HTTP status, as Google's HTTP/gRPC mapping (google.rpc.Code) has it.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Refusals HTTP tells apart though their gRPC code is shared (first match wins).
HTTP_STATUS_OF_ERROR = [
    (errors.RequestTooLarge, 413),  # RESOURCE_EXHAUSTED
    (errors.RequestTimedOut, 408),  # DEADLINE_EXCEEDED (504 would say a gateway waited on an upstream)
    (errors.UnsupportedMediaType, 415),  # INVALID_ARGUMENT
    (errors.MisdirectedRequest, 421),  # PERMISSION_DENIED
]


def http_status_for(code: grpc.StatusCode, exc: BaseException | None = None) -> int:
    """The HTTP status of a refusal: its code's, unless its error has a status of its own (408, 413, 415,
    421)."""
    for kind, status in HTTP_STATUS_OF_ERROR:
        if isinstance(exc, kind):
            return status
    return HTTP_STATUS.get(code, 500)


# Status details travel in HTTP/2 trailers (grpc's metadata limit is 8-16 KB): a message that long would
# replace the real status with RESOURCE_EXHAUSTED "Stream removed". Messages quote input through
# errors.quoted; this cap is the second wall.
MAX_DETAILS_CHARS = 2000


def status_details(exc: BaseException) -> str:
    text = str(exc)
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return text[:MAX_DETAILS_CHARS] + f"... (message cut at {MAX_DETAILS_CHARS} of {len(text):,} characters)"
