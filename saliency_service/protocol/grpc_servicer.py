"""The gRPC servicer: reads a call's framing, runs it through ``protocol.calls``, and
answers a domain error with its status from ``saliency_service.protocol.status``."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

import grpc

from saliency_service.core.errors import ServiceError
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.calls import CallInfo, Calls, request_id_from
from saliency_service.protocol.status import status_of

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


def superseded(older: pb.ExplainUpdate, newer: pb.ExplainUpdate) -> pb.ExplainUpdate:
    """A pending progress update once a newer one is pending: without its map when the
    newer one has a map, so a stream holds at most one map that its reader has not taken."""
    if newer.progress.HasField("saliency"):
        older.progress.ClearField("saliency")
    return older


class LatestUpdates(Generic[T]):
    """The updates of one stream not yet sent. When the reader falls behind, each pending
    update is passed to ``supersede`` with the newest (progress then drops a map a newer
    one replaces) and beyond ``max_pending`` the oldest are dropped, so a reader that never
    reads holds one map and a few scalars; a reader that keeps up sees every update. The
    result does not pass here."""

    def __init__(self, max_pending: int = 32,
                 supersede: Callable[[T, T], T] | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self.supersede = supersede
        self.dropped = 0  # updates superseded before the reader took them
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put(self, item: T) -> None:
        """Adds ``item``: the pending ones superseded by it, the oldest dropped when full
        (on the event loop)."""
        if self.supersede is not None:
            self._items = deque(self.supersede(older, item) for older in self._items)
        if len(self._items) >= self.max_pending:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> T:
        """The oldest pending item, waiting for one."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


async def drained(pending: LatestUpdates[T] | asyncio.Queue[T], task: asyncio.Future[object],
                  ) -> AsyncIterator[T]:
    """The items put in ``pending`` while ``task`` runs (and any left when it ends); cancels
    the task if the consumer goes away."""
    getter: asyncio.Future[T] | None = None
    try:
        while not task.done() or not pending.empty():
            getter = asyncio.ensure_future(pending.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        if not task.done():
            task.cancel()


__all__ = ["REQUEST_ID_KEY", "ExplainerServicer", "LatestUpdates", "answered", "call_info",
           "drained", "superseded"]
