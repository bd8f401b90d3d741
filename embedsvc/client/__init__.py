"""Python clients for embedsvc: `Client(address)`, and `AsyncClient(address)` for asyncio."""

from embedsvc.client.client import AsyncClient, Client, Collection, Embeddings, Hit, Item, StoredItem, UpsertStats
from embedsvc.client.errors import (AlreadyExistsError, DeadlineExceededError, EmbedsvcClientError,
                                    FailedPreconditionError, InvalidArgumentError, NotFoundError,
                                    PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                                    UnavailableError, UnknownFilterKeyWarning)

__all__ = ["AlreadyExistsError", "AsyncClient", "Client", "Collection", "DeadlineExceededError", "Embeddings",
           "EmbedsvcClientError", "FailedPreconditionError", "Hit", "InvalidArgumentError", "Item", "NotFoundError",
           "PermissionDeniedError", "ResourceExhaustedError", "StoredItem", "UnauthenticatedError", "UnavailableError",
           "UnknownFilterKeyWarning", "UpsertStats"]
