"""The gRPC servicer: reads a call's framing, runs it through ``protocol.calls``, and
answers a domain error with its status from ``saliency_service.protocol.status``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from saliency_service.core.errors import ServiceError
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.calls import CallInfo, Calls, request_id_from
from saliency_service.protocol.status import status_of
from saliency_service.protocol.stream_updates import LatestUpdates, drained, superseded

T = TypeVar("T")
REQUEST_ID_KEY = "x-request-id"


def call_info(context: grpc.aio.ServicerContext) -> CallInfo:
    """The call's request id (the client's ``x-request-id`` when sane) and deadline; the id
    goes back to the client in the trailing metadata."""
    value = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY),
                 None)
    request_id = request_id_from(value)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    remaining = context.time_remaining()
    return CallInfo("grpc", request_id,
                    time.monotonic() + remaining if remaining is not None else None)


async def answered(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    """The call's reply, or the status of the domain error it raised."""
    try:
        return await call
    except ServiceError as exc:
        await context.abort(status_of(exc), str(exc))
        raise AssertionError("unreachable") from exc  # abort raises


class ExplainerServicer(pb_grpc.ExplainerServicer):
    """``saliency.v1.Explainer`` over the service's calls."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext,
    ) -> pb.ExplainResponse:
        return await answered(context, self.calls.explain(request, call_info(context)))

    async def ExplainStream(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ExplainUpdate]:
        pending: LatestUpdates[pb.ExplainUpdate] = LatestUpdates(supersede=superseded)

        def on_progress(progress: pb.Progress) -> None:
            pending.put(pb.ExplainUpdate(progress=progress))

        task = asyncio.ensure_future(answered(
            context, self.calls.explain(request, call_info(context), on_progress)))
        async for update in drained(pending, task):
            yield update
        yield pb.ExplainUpdate(result=await task)

    async def Predict(  # noqa: N802 - gRPC method name
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext,
    ) -> pb.PredictResponse:
        return await answered(context, self.calls.predict(request, call_info(context)))

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext,
    ) -> pb.ListModelsResponse:
        return self.calls.list_models()

    async def GetModel(  # noqa: N802 - gRPC method name
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext,
    ) -> pb.ModelInfo:
        async def get() -> pb.ModelInfo:
            return self.calls.get_model(request)

        return await answered(context, get())


__all__ = ["REQUEST_ID_KEY", "ExplainerServicer", "answered", "call_info"]
