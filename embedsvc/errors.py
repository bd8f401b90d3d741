"""Domain errors of embedsvc's core.

The core never imports grpc: each error belongs to one category below, and the service layer maps
categories to status codes in one place. Messages are written for the person who must act on them.
"""

from __future__ import annotations


class EmbedsvcError(Exception):
    """Base of every error embedsvc raises on purpose."""


class InvalidInput(EmbedsvcError, ValueError):
    """The request itself is wrong (bad value, malformed image, unknown parameter)."""


class NotFound(EmbedsvcError, LookupError):
    """A named thing (model, collection, item) does not exist."""


class AlreadyExists(EmbedsvcError):
    """A thing with that name exists already."""


class FailedPrecondition(EmbedsvcError):
    """The request is valid but the system is not in a state to serve it (e.g. unfitted pooling)."""


class ResourceExhausted(EmbedsvcError):
    """A limit was reached (queue full, too many items); retry later or send less."""


class Aborted(EmbedsvcError):
    """A concurrent change (e.g. a pooling re-fit) invalidated the request; retry it."""


class Unavailable(EmbedsvcError):
    """Something the request needs is out of service for now (e.g. a read-only data directory); retry later."""


class DeadlineExceeded(EmbedsvcError):
    """Time ran out: the request (or part of it) did not arrive or finish in time."""


class PermissionDenied(EmbedsvcError):
    """The caller may not do this (here: a browser page of an origin the server does not trust)."""


# --- specific errors, each in one category -------------------------------------------------------


class UnknownModel(NotFound):
    """No model of that name is registered."""


class WeightsUnavailable(FailedPrecondition):
    """The model's weights are not on this machine and will not be downloaded."""


class UnsupportedModel(FailedPrecondition):
    """The model loads but its towers expose no token features we can pool."""


class UnknownPooling(InvalidInput):
    """No pooling of that name is registered."""


class InvalidPoolingParams(InvalidInput):
    """A pooling parameter is unknown or out of range."""


class UnsupportedTokenMode(InvalidInput):
    """The tower (ResNet, text, or a ViT with non-standard blocks) has no such token mode."""


class ModalityNotSupported(FailedPrecondition):
    """The pooling cannot be applied to this modality (e.g. spatial pyramid on text)."""


class PoolingNotFitted(FailedPrecondition):
    """A learned pooling (NetVLAD) was used before its state was fitted or loaded."""


class ImageDecodeError(InvalidInput):
    """The bytes are not a decodable image of a supported format."""


class ImageTooLarge(InvalidInput):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class EmptyText(InvalidInput):
    """A text input is empty or only whitespace."""


class DataDirLocked(FailedPrecondition):
    """Another process holds the data directory's single-writer lock."""


class StorageUnavailable(Unavailable):
    """The store's files cannot be written now (read-only, full or failing disk)."""


class NonFiniteVector(InvalidInput):
    """A computation on an input produced NaN or infinity (numerical overflow)."""


class RequestTooLarge(ResourceExhausted):
    """A request body or message is over the configured byte limit (HTTP 413)."""


class RequestTimedOut(DeadlineExceeded):
    """A client sent its request body too slowly (HTTP 408)."""


class UnsupportedMediaType(InvalidInput):
    """A write's body is missing its Content-Type or has one the endpoint does not read (HTTP 415): a type
    browsers may send cross-site without asking first (text/plain, none) never reaches a handler."""


class MisdirectedRequest(PermissionDenied):
    """The request names a Host the server does not answer for (HTTP 421): a DNS-rebinding page's name."""


class CrossOriginRefused(PermissionDenied):
    """A browser page of another origin, not in http_cors_origins, tried to change something (HTTP 403)."""


class UnusableFile(InvalidInput):
    """A source path that is not read as an image: not a regular file, over the byte limit, or unreadable."""


QUOTE_LIMIT = 100


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """`repr` of a user-supplied value for an error message, cut to `limit` characters with the full length.

    Messages become gRPC status details, which travel in metadata of limited size: quoting a 16 KB name
    whole would turn the real status into RESOURCE_EXHAUSTED "Stream removed".
    """
    text = value if isinstance(value, (str, bytes)) else repr(value)
    if len(text) <= limit:
        return repr(value)
    unit = "bytes" if isinstance(text, bytes) else "characters"
    return f"{text[:limit]!r}... ({len(text):,} {unit})"
