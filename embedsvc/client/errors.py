"""Typed client errors, one per status code a caller may want to handle; each carries the code. And the warning
for a filter on keys no item holds."""

from __future__ import annotations

import grpc


class EmbedsvcClientError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(EmbedsvcClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(EmbedsvcClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(EmbedsvcClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(EmbedsvcClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(EmbedsvcClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(EmbedsvcClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(EmbedsvcClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(EmbedsvcClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(EmbedsvcClientError):
    code = grpc.StatusCode.UNAVAILABLE


class AbortedError(EmbedsvcClientError):
    """A write raced a re-fit or re-creation of its collection and stored nothing: retry it."""

    code = grpc.StatusCode.ABORTED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        DeadlineExceededError,
        UnavailableError,
        AbortedError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> EmbedsvcClientError:
    code = error.code()
    return _BY_CODE.get(code, EmbedsvcClientError)(error.details() or code.name, code)


class UnknownFilterKeyWarning(UserWarning):
    """A search's filter names metadata keys that no item of the collection holds, so it matched nothing (a typo?).
    `keys` are those keys, `collection` the collection searched."""

    def __init__(self, collection: str, keys: list[str]):
        self.collection, self.keys = collection, keys
        names = ", ".join(repr(k) for k in keys)
        super().__init__(
            f"no item of collection {collection!r} has the metadata key{'s' * (len(keys) > 1)} {names}: "
            f"the filter matches nothing"
        )
