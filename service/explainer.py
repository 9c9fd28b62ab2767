"""The gRPC servicer: request limits, deadlines, cancellation, error mapping, metrics, logs.

Admission is ``service.admission``; the statuses come from ``service.status``. The work is
``service.core.Core``,
run in a bounded thread pool off the event loop (except cheap one-item requests on an idle
server, which run on it: see ``ExplainerServicer._runs_inline``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from handlers import registry
from handlers.base import method_name
from kernel.errors import (
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
)
from kernel.request import CostCounter, ProgressUpdate, RequestState
from saliency.v1 import explainer_pb2 as pb
from saliency.v1 import explainer_pb2_grpc as pb_grpc
from service.admission import (
    SHUTTING_DOWN_STOPPED,
    Admission,
    deadline_passed,
)
from service.config import Config
from service.core import Core
from service.images import array_to_tensor
from service.metrics import Metrics
from service.status import status_of

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

def check_limits(request: pb.ExplainRequest | pb.PredictRequest, config: Config) -> None:
    """Refuses work beyond the configured per-request limits before it takes a slot.

    Raises InvalidInput naming the limit (and its flag) that the request exceeds.
    """
    source = request.input
    kind = source.WhichOneof("kind")
    batch = 0
    if kind == "images":
        batch = len(source.images.images)
    elif kind == "tensor" and source.tensor.shape:
        batch = int(source.tensor.shape[0])
    if batch > config.max_batch:
        raise InvalidInput(
            f"batch of {batch} exceeds the limit max_batch={config.max_batch} "
            "(--max-batch); split the request"
        )
    if isinstance(request, pb.ExplainRequest) and request.WhichOneof("params"):
        try:
            handler = registry.get(request.method)
        except NotFound:
            return  # METHOD_AUTO or unknown: the core decides and refuses
        which = request.WhichOneof("params")
        if which == handler.params_field:
            handler.params(getattr(request, which), config.limits())


# What a request hears while the server drains: refused on arrival, refused in the queue
# (it would not finish within the grace period), or stopped when the grace period ends.
def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The client's ``x-request-id`` when it is a sane token, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if _REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


@dataclass
class _Outcome:
    """What one request did, gathered for its metrics and its log line."""

    request_id: str
    model: str
    method: str
    code: grpc.StatusCode = grpc.StatusCode.OK
    cost: pb.Cost | None = None
    queue_seconds: float = 0.0
    cpu_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class ExplainerServicer(pb_grpc.ExplainerServicer):
    """``saliency.v1.Explainer`` over a Core."""

    def __init__(
        self, core: Core, metrics: Metrics, admission: Admission, executor: ThreadPoolExecutor
    ) -> None:
        self.core = core
        self.config: Config = core.config
        self.metrics = metrics
        self.admission = admission
        self.executor = executor
        self._running: set[RequestState] = set()
        self._stopped: asyncio.Future[None] | None = None  # set when the grace period ends

    def _stop_signal(self) -> asyncio.Future[None]:
        if self._stopped is None:  # created lazily on the server's event loop
            self._stopped = asyncio.get_running_loop().create_future()
        return self._stopped

    def stop_running(self) -> int:
        """The end of the grace period: refuses the requests still waiting, answers the
        executing ones UNAVAILABLE at once and tells their workers to stop at their next
        check; returns how many were executing."""
        self.admission.close()
        running = list(self._running)
        for state in running:
            state.cancel(Unavailable(SHUTTING_DOWN_STOPPED))
        if not self._stop_signal().done():
            self._stop_signal().set_result(None)
        return len(running)

    def _model_label(self, name: str) -> str:
        """The model's name when the repository has it, else ``unknown`` (bounded labels)."""
        known = {handle.name for handle in self.core.repository.handles()}
        return name if name in known else "unknown"

    def _finish(self, outcome: _Outcome, cost: CostCounter) -> None:
        """Records metrics and queues the request's log line; the figures are the response's
        Cost when there is one, so ``/metrics`` adds up to the responses."""
        if outcome.cost is not None:
            wall, cpu = outcome.cost.wall_seconds, outcome.cost.cpu_seconds
        else:
            wall, cpu = (
                time.perf_counter() - outcome.started - outcome.queue_seconds,
                outcome.cpu_seconds,
            )
        self.metrics.observe(
            outcome.model,
            outcome.method,
            outcome.code.name,
            wall,
            cpu,
            dict(cost.forward_by_engine),
            cost.backward_passes,
        )
        # The line is queued on the next turn of the loop, after the reply has gone out:
        # building a log record costs ~30 µs that the caller need not wait for.
        asyncio.get_running_loop().call_soon(functools.partial(
            log.info,
            "request %s %s",
            outcome.method,
            outcome.code.name,
            extra={
                "event": "request",
                "request_id": outcome.request_id,
                "model": outcome.model,
                "method": outcome.method,
                "code": outcome.code.name,
                "latency_ms": round((time.perf_counter() - outcome.started) * 1000, 3),
                "queue_ms": round(outcome.queue_seconds * 1000, 3),
                "forward_passes": cost.forward_passes,
                "backward_passes": cost.backward_passes,
            },
        ))

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        request: pb.ExplainRequest | pb.PredictRequest,
        method: str,
        work: Callable[[RequestState, CostCounter], T],
        relabel: Callable[[T], str] | None = None,
    ) -> T:
        """Checks limits, admits, runs ``work`` in the pool and maps errors to statuses.

        ``relabel`` names the method that actually ran (METHOD_AUTO resolves late). When
        the client cancels or the deadline passes mid-run, the worker is told through the
        RequestState and its slot is freed only once it has stopped, so the pool never
        holds more than ``max_inflight`` requests; the request is recorded then, with the
        passes the worker made. When the grace period of a shutdown ends, the request is
        answered and recorded at once (the process may not outlive the worker), and its
        slot is freed once the worker has stopped.
        """
        outcome = _Outcome(request_id_of(context), self._model_label(request.model), method)
        context.set_trailing_metadata(((REQUEST_ID_KEY, outcome.request_id),))
        remaining = context.time_remaining()
        state = RequestState(time.monotonic() + remaining if remaining is not None else None)
        cost = CostCounter()
        admitted = settled = False
        worker: asyncio.Future[T] | None = None  # the pool's future while a worker runs it

        def timed(state: RequestState, cost: CostCounter) -> T:
            cpu_started = time.process_time()
            try:
                return work(state, cost)
            finally:
                outcome.cpu_seconds = time.process_time() - cpu_started

        def settle() -> None:
            """Records the request and frees its slot (once no worker holds it) — before the
            client hears the status, so a scrape after any reply already counts it."""
            nonlocal settled
            if settled:
                return
            settled = True
            if admitted:
                if worker is None or worker.done():
                    self._release(state)
                else:
                    worker.add_done_callback(functools.partial(self._release_worker, state))
            self._finish(outcome, cost)

        try:
            check_limits(request, self.config)
            expected = self.metrics.mean_cost(outcome.model, method).recent_seconds
            outcome.queue_seconds = await self.admission.acquire(state, expected)
            admitted = True
            self._running.add(state)
            if self._runs_inline(request, expected):
                self.metrics.inline.labels(outcome.model, method).inc()
                result = timed(state, cost)
            else:
                worker = asyncio.get_running_loop().run_in_executor(
                    self.executor, timed, state, cost)
                try:
                    # Waiting does not cancel the worker's future when the call is cancelled.
                    await asyncio.wait((worker, self._stop_signal()),
                                       return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    state.cancel()
                    settled = True
                    outcome.code = (
                        grpc.StatusCode.DEADLINE_EXCEEDED
                        if deadline_passed(state)
                        else grpc.StatusCode.CANCELLED
                    )
                    worker.add_done_callback(
                        functools.partial(self._release_after, outcome, cost, state))
                    raise
                if not worker.done():  # the grace period ended first
                    raise Unavailable(SHUTTING_DOWN_STOPPED)
                result = worker.result()
            outcome.cost = getattr(result, "cost", None)
            if relabel is not None:
                outcome.method = relabel(result)
            if isinstance(result, pb.ExplainResponse):
                result.request_id = outcome.request_id
            settle()
            return result
        except ServiceError as exc:
            outcome.code = status_of(exc)
            settle()
            await context.abort(status_of(exc), str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        except asyncio.CancelledError:
            if outcome.code == grpc.StatusCode.OK:
                outcome.code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                    if deadline_passed(state)
                    else grpc.StatusCode.CANCELLED
                )
            raise
        except Exception as exc:
            outcome.code = grpc.StatusCode.INTERNAL
            log.exception(
                "request %s failed: %s",
                outcome.request_id,
                type(exc).__name__,
                extra={
                    "event": "internal_error",
                    "request_id": outcome.request_id,
                    "model": outcome.model,
                    "method": outcome.method,
                    "code": "INTERNAL",
                },
            )
            settle()
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(exc).__name__}); request id "
                f"{outcome.request_id} — quote it to the operator, whose log "
                "has the traceback",
            )
            raise AssertionError("unreachable") from exc
        finally:
            settle()

    def _runs_inline(self, request: pb.ExplainRequest | pb.PredictRequest,
                     expected_seconds: float) -> bool:
        """Whether to run the work on the event loop rather than hand it to the pool.

        The hand-off to a worker thread and back costs ~0.1 ms, 10% of a small model's
        Predict; the loop is blocked meanwhile, so only work known to be short qualifies:
        a method measured under ``inline_below_ms`` on this model, one tensor item (no
        image decoding, whose cost grows with the upload), and no other request executing
        or waiting (under load the pool runs requests side by side), and no torch: only
        Predict and the methods that run on ONNX Runtime alone.
        """
        if not 0.0 < expected_seconds * 1000.0 < self.config.inline_below_ms:
            return False
        if isinstance(request, pb.ExplainRequest) and not self._onnx_only(request.method):
            return False  # torch stays on the workers (see SaliencyServer.load_models)
        if self.admission.inflight != 1 or self.admission.waiting:
            return False
        source = request.input
        return source.WhichOneof("kind") == "tensor" and source.tensor.shape[:1] == [1]

    @staticmethod
    def _onnx_only(method: int) -> bool:
        """Whether the method runs on ONNX Runtime alone (METHOD_AUTO resolves later)."""
        try:
            return not registry.get(method).needs_torch
        except NotFound:
            return False

    def _release(self, state: RequestState) -> None:
        self._running.discard(state)
        self.admission.release(state)

    def _release_worker(self, state: RequestState, worker: asyncio.Future[Any]) -> None:
        """Done-callback of the worker of a request answered before it stopped: frees the
        slot (the worker's outcome is moot: the client has its status)."""
        if not worker.cancelled():
            worker.exception()
        self._release(state)

    def _release_after(self, outcome: _Outcome, cost: CostCounter, state: RequestState,
                       worker: asyncio.Future[Any]) -> None:
        """Done-callback of a cancelled request's worker: frees its slot, then records it."""
        self._release_worker(state, worker)
        self._finish(outcome, cost)

    async def Explain(  # noqa: N802 - gRPC method name
        self,
        request: pb.ExplainRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ExplainResponse:
        def work(state: RequestState, cost: CostCounter) -> pb.ExplainResponse:
            return self.core.explain(request, state, cost)

        return await self._run(context, request, method_name(request.method), work, _ran_method)

    async def ExplainStream(  # noqa: N802 - gRPC method name
        self,
        request: pb.ExplainRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ExplainUpdate]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.ExplainUpdate] = asyncio.Queue()

        def on_progress(update: ProgressUpdate) -> None:
            progress = pb.Progress(
                step=update.step,
                total_steps=update.total_steps,
                best_fitness=update.best_fitness,
                forward_passes=update.forward_passes,
            )
            if update.maps is not None:
                progress.saliency.CopyFrom(array_to_tensor(update.maps))
            loop.call_soon_threadsafe(queue.put_nowait, pb.ExplainUpdate(progress=progress))

        def work(state: RequestState, cost: CostCounter) -> pb.ExplainResponse:
            return self.core.explain(request, state, cost, on_progress)

        task = asyncio.ensure_future(
            self._run(context, request, method_name(request.method), work, _ran_method)
        )
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

    async def Predict(  # noqa: N802 - gRPC method name
        self,
        request: pb.PredictRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.PredictResponse:
        def work(state: RequestState, cost: CostCounter) -> pb.PredictResponse:
            state.check()
            return self.core.predict(request, cost)

        return await self._run(context, request, "predict", work)

    async def ListModels(  # noqa: N802 - gRPC method name
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListModelsResponse:
        return self.core.list_models()

    async def GetModel(  # noqa: N802 - gRPC method name
        self,
        request: pb.GetModelRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelInfo:
        try:
            return self.core.get_model(request)
        except ServiceError as exc:
            await context.abort(status_of(exc), str(exc))
            raise AssertionError("unreachable") from exc


def _ran_method(response: Any) -> str:
    return method_name(response.cost.method)
