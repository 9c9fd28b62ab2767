"""The gRPC servicer: admission, deadlines, cancellation, error mapping and metrics.

It converts nothing but messages and statuses; the work is ``service.core.Core``,
run in a bounded thread pool off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from handlers.base import CostCounter, ProgressUpdate, RequestState
from saliency.v1 import explainer_pb2 as pb
from saliency.v1 import explainer_pb2_grpc as pb_grpc
from service.core import Core
from service.errors import ResourceExhausted, ServiceError, Unavailable
from service.images import array_to_tensor
from service.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


def method_label(method: int) -> str:
    """``METHOD_VANILLA_GRADIENT`` → ``vanilla_gradient`` (the handler's name)."""
    try:
        return pb.Method.Name(method).removeprefix("METHOD_").lower()
    except ValueError:
        return f"unknown_{method}"


class Admission:
    """At most ``max_inflight`` requests executing and ``max_queue`` waiting; the rest are
    refused at once, so memory stays bounded under overload."""

    def __init__(self, max_inflight: int, max_queue: int, metrics: Metrics) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_inflight)
        self.inflight = 0
        self.waiting = 0
        self.draining = False

    async def acquire(self) -> None:
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise Unavailable("the server is shutting down; retry on another replica")
        if self._slots.locked() and self.waiting >= self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ResourceExhausted(
                f"server at capacity: {self.inflight} executing (max_inflight="
                f"{self.max_inflight}) and {self.waiting} waiting (max_queue={self.max_queue}); "
                "retry with backoff"
            )
        self.waiting += 1
        self.metrics.queued.set(self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queued.set(self.waiting)
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
        self._slots.release()

    async def idle(self) -> None:
        """Waits until nothing is executing or waiting (for graceful shutdown)."""
        while self.inflight or self.waiting:
            await asyncio.sleep(0.05)


class ExplainerServicer(pb_grpc.ExplainerServicer):
    """``saliency.v1.Explainer`` over a Core."""

    def __init__(self, core: Core, metrics: Metrics, admission: Admission,
                 executor: ThreadPoolExecutor) -> None:
        self.core = core
        self.metrics = metrics
        self.admission = admission
        self.executor = executor

    async def _run(self, context: grpc.aio.ServicerContext, model: str, method: str,
                   work: Callable[[RequestState, CostCounter], T],
                   relabel: Callable[[T], str] | None = None) -> T:
        """Admits, runs ``work`` in the pool, records metrics and maps errors to statuses.

        ``relabel`` names the method that actually ran (METHOD_AUTO resolves late).
        """
        remaining = context.time_remaining()
        state = RequestState(time.monotonic() + remaining if remaining is not None else None)
        cost = CostCounter()
        started = time.perf_counter()
        cpu_started = time.process_time()
        code = grpc.StatusCode.OK
        admitted = False
        try:
            await self.admission.acquire()
            admitted = True
            state.check()  # a request whose deadline passed while queued is not started
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(self.executor, work, state, cost)
                if relabel is not None:
                    method = relabel(result)
                return result
            except asyncio.CancelledError:
                state.cancelled.set()
                code = grpc.StatusCode.CANCELLED
                raise
        except ServiceError as exc:
            code = exc.code
            await context.abort(code, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            request_id = uuid.uuid4().hex
            log.exception("request %s (%s/%s) failed", request_id, model, method)
            await context.abort(code, f"internal error {type(exc).__name__}; request id "
                                      f"{request_id} (see the server log)")
            raise AssertionError("unreachable") from exc
        finally:
            if admitted:
                self.admission.release()
            self.metrics.observe(
                model or "unknown", method, code.name, time.perf_counter() - started,
                time.process_time() - cpu_started, dict(cost.forward_by_engine),
                cost.backward_passes)

    async def Explain(self, request: pb.ExplainRequest,  # noqa: N802 - gRPC method name
                      context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        def work(state: RequestState, cost: CostCounter) -> pb.ExplainResponse:
            return self.core.explain(request, state, cost)

        return await self._run(context, request.model, method_label(request.method), work,
                               _ran_method)

    async def ExplainStream(self, request: pb.ExplainRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.ExplainUpdate]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.ExplainUpdate] = asyncio.Queue()

        def on_progress(update: ProgressUpdate) -> None:
            progress = pb.Progress(step=update.step, total_steps=update.total_steps,
                                   best_fitness=update.best_fitness,
                                   forward_passes=update.forward_passes)
            if update.maps is not None:
                progress.saliency.CopyFrom(array_to_tensor(update.maps))
            loop.call_soon_threadsafe(queue.put_nowait, pb.ExplainUpdate(progress=progress))

        def work(state: RequestState, cost: CostCounter) -> pb.ExplainResponse:
            return self.core.explain(request, state, cost, on_progress)

        task = asyncio.ensure_future(self._run(
            context, request.model, method_label(request.method), work, _ran_method))
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = await task
        finally:
            if not task.done():
                task.cancel()
        yield pb.ExplainUpdate(result=result)

    async def Predict(self, request: pb.PredictRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        def work(state: RequestState, cost: CostCounter) -> pb.PredictResponse:
            return self.core.predict(request, cost)

        return await self._run(context, request.model, "predict", work)

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return self.core.list_models()

    async def GetModel(self, request: pb.GetModelRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            return self.core.get_model(request)
        except ServiceError as exc:
            await context.abort(exc.code, str(exc))
            raise AssertionError("unreachable") from exc


def _ran_method(response: pb.ExplainResponse) -> str:
    return method_label(response.cost.method)
