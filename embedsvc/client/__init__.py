"""Python client for embedsvc: `Client(address)`."""

from embedsvc.client.client import Client, Collection, Embeddings, Hit, Item, StoredItem, UpsertStats
from embedsvc.client.errors import (AlreadyExistsError, DeadlineExceededError, EmbedsvcClientError,
                                    FailedPreconditionError, InvalidArgumentError, NotFoundError,
                                    PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                                    UnavailableError, UnknownFilterKeyWarning)

__all__ = ["AlreadyExistsError", "Client", "Collection", "DeadlineExceededError", "Embeddings", "EmbedsvcClientError",
           "FailedPreconditionError", "Hit", "InvalidArgumentError", "Item", "NotFoundError", "PermissionDeniedError",
           "ResourceExhaustedError", "StoredItem", "UnauthenticatedError", "UnavailableError",
           "UnknownFilterKeyWarning", "UpsertStats"]
