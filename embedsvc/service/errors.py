"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from embedsvc import errors

STATUS = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Status details travel in HTTP/2 trailers (grpc's metadata limit is 8-16 KB): a message that long would
# replace the real status with RESOURCE_EXHAUSTED "Stream removed". Messages quote input through
# errors.quoted; this cap is the second wall.
MAX_DETAILS_CHARS = 2000


def status_details(exc: BaseException) -> str:
    text = str(exc)
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return text[:MAX_DETAILS_CHARS] + f"... (message cut at {MAX_DETAILS_CHARS} of {len(text):,} characters)"
