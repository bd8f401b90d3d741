"""gRPC servicers: each RPC is one call into embedsvc.service.calls; errors mapped in one place."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from embedsvc.engine.engine import Engine
from embedsvc.errors import EmbedsvcError
from embedsvc.service import calls
from embedsvc.service.errors import status_details, status_for
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

log = logging.getLogger("embedsvc.rpc")


def rpc(method: str):
    """Times, counts and logs the RPC; turns domain errors into their status code and message."""

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await fn(self, request, context)
            except EmbedsvcError as exc:
                code = status_for(exc)
                await context.abort(code, status_details(exc))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:  # a streamed message refused on the way in (admission.py)
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:  # a bug must not take the server down
                code = grpc.StatusCode.INTERNAL
                log.exception("internal error in %s", method)
                await context.abort(code, f"internal error in {method}; the server log has details")
            finally:
                calls.record(self.engine, method, code.name, time.perf_counter() - started, context.peer(), "grpc")

        return wrapper

    return decorate


class EmbedServicer(pb_grpc.EmbedServiceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @rpc("Embed")
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        return await calls.embed(self.engine, request)

    @rpc("ListModels")
    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return await calls.list_models(self.engine, request)


class IndexServicer(pb_grpc.IndexServiceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @rpc("CreateCollection")
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context) -> pb.CollectionInfo:
        return await calls.create_collection(self.engine, request)

    @rpc("GetCollection")
    async def GetCollection(self, request: pb.GetCollectionRequest, context) -> pb.CollectionInfo:
        return await calls.get_collection(self.engine, request)

    @rpc("ListCollections")
    async def ListCollections(self, request, context) -> pb.ListCollectionsResponse:
        return await calls.list_collections(self.engine, request)

    @rpc("DropCollection")
    async def DropCollection(self, request: pb.DropCollectionRequest, context) -> pb.DropCollectionResponse:
        return await calls.drop_collection(self.engine, request)

    @rpc("Upsert")
    async def Upsert(self, request_iterator, context) -> pb.UpsertResponse:
        return await calls.upsert(self.engine, request_iterator)

    @rpc("Delete")
    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        return await calls.delete(self.engine, request)

    @rpc("Get")
    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        return await calls.get(self.engine, request)

    @rpc("Search")
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        return await calls.search(self.engine, request)

    @rpc("FitPooling")
    async def FitPooling(self, request_iterator, context) -> pb.FitPoolingResponse:
        return await calls.fit_pooling(self.engine, request_iterator)
