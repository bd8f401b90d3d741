"""Python clients for embedsvc: `Client(address)`, and `AsyncClient(address)` for asyncio."""

from embedsvc.client.client import (AsyncClient, Client, Collection, Embeddings, FitResult, Hit, Item, ModelInfo,
                                    Models, PoolingInfo, StoredItem, UpsertStats)
from embedsvc.client.errors import (AbortedError, AlreadyExistsError, DeadlineExceededError, EmbedsvcClientError,
                                    FailedPreconditionError, InvalidArgumentError, NotFoundError,
                                    PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                                    UnavailableError, UnknownFilterKeyWarning)

__all__ = ["AbortedError", "AlreadyExistsError", "AsyncClient", "Client", "Collection", "DeadlineExceededError",
           "Embeddings", "EmbedsvcClientError", "FailedPreconditionError", "FitResult", "Hit", "InvalidArgumentError",
           "Item", "ModelInfo", "Models", "NotFoundError", "PermissionDeniedError", "PoolingInfo",
           "ResourceExhaustedError", "StoredItem", "UnauthenticatedError", "UnavailableError",
           "UnknownFilterKeyWarning", "UpsertStats"]
