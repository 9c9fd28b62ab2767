"""The one path every transport's calls take: limits, admission, execution, metrics, logs.

A transport (the gRPC servicer, the HTTP API) reads its own framing — request id, deadline,
cancellation — into a ``CallInfo``, calls ``Calls`` with the ``saliency.v1`` messages, and
turns a raised ``ServiceError`` into its own status with ``protocol.status``. The work runs
on ``protocol.codec.Core`` in a bounded thread pool off the event loop (cheap one-item
requests on an idle server run on it: see ``Calls._runs_inline``).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from saliency_service.core.errors import (
    Internal,
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
)
from saliency_service.core.request import CostCounter, ProgressUpdate, RequestState
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core, method_label, method_name
from saliency_service.protocol.images import MAX_TENSOR_DIMS, array_to_tensor
from saliency_service.protocol.inputs import check_batch
from saliency_service.protocol.request_log import Outcome, RequestLog
from saliency_service.protocol.status import status_of
from saliency_service.serving.admission import SHUTTING_DOWN_STOPPED, Admission, deadline_passed
from saliency_service.serving.config import Config
from saliency_service.serving.metrics import Metrics

T = TypeVar("T")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_from(value: str | bytes | None) -> str:
    """The client's request id when it is a sane token, else a fresh one."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return text if text and _REQUEST_ID.match(text) else uuid.uuid4().hex


@dataclass(frozen=True)
class CallInfo:
    """What a transport knows about one call."""

    transport: str  # "grpc" or "http": the transport label of the metrics and logs
    request_id: str
    deadline: float | None = None  # on the time.monotonic() clock


def check_limits(request: pb.ExplainRequest | pb.PredictRequest, config: Config) -> None:
    """Refuses work beyond the configured per-request limits before it takes a slot.

    Repeated fields are bounded by their length alone, before any value is read: this runs
    on the event loop, where converting millions of values would hold up every call.
    Raises InvalidInput naming the field or the limit (and its flag) that the request
    exceeds.
    """
    source = request.input
    kind = source.WhichOneof("kind")
    batch = 0
    if kind == "images":
        batch = len(source.images.images)
    elif kind == "tensor" and source.tensor.shape:
        dimensions = len(source.tensor.shape)
        if dimensions > MAX_TENSOR_DIMS:
            raise InvalidInput(f"input.tensor.shape has {dimensions} dimensions; at most "
                               f"{MAX_TENSOR_DIMS} are accepted (model inputs are 4-D)")
        batch = int(source.tensor.shape[0])
    check_batch(batch, config)
    if not isinstance(request, pb.ExplainRequest):
        return
    indices = len(request.target.per_item.indices)
    if request.target.WhichOneof("kind") == "per_item" and indices > max(batch, 1):
        raise InvalidInput(f"target.per_item has {indices} indices for a batch of "
                           f"{max(batch, 1)}: give one class index per batch item")


def progress_message(update: ProgressUpdate) -> pb.Progress:
    progress = pb.Progress(step=update.step, total_steps=update.total_steps,
                           best_fitness=update.best_fitness,
                           forward_passes=update.forward_passes)
    if update.maps is not None:
        progress.saliency.CopyFrom(array_to_tensor(update.maps))
    return progress


class Calls:
    """The service's calls over a Core, for any transport."""

    def __init__(self, core: Core, metrics: Metrics, admission: Admission,
                 executor: ThreadPoolExecutor) -> None:
        self.core = core
        self.config: Config = core.config
        self.metrics = metrics
        self.admission = admission
        self.executor = executor
        self.log = RequestLog(metrics)
        self._running: set[RequestState] = set()
        self._stopped: asyncio.Future[None] | None = None  # set when the grace period ends

    # ---- the calls ---------------------------------------------------------------------

    async def explain(self, request: pb.ExplainRequest, call: CallInfo,
                      on_progress: Callable[[pb.Progress], None] | None = None
                      ) -> pb.ExplainResponse:
        """One Explain; ``on_progress`` is called on the event loop with each update."""
        progress = None
        if on_progress is not None:
            loop = asyncio.get_running_loop()

            def progress(update: ProgressUpdate) -> None:
                loop.call_soon_threadsafe(on_progress, progress_message(update))

        prepared = None

        def prepare() -> None:  # before admission: a refused request takes no slot
            nonlocal prepared
            prepared = self.core.prepare(request)

        def work(state: RequestState, cost: CostCounter) -> pb.ExplainResponse:
            return self.core.explain(request, state, cost, progress, prepared)

        response = await self._run(call, request, method_label(request.method), work,
                                   _ran_method, prepare)
        response.request_id = call.request_id
        return response

    async def predict(self, request: pb.PredictRequest, call: CallInfo) -> pb.PredictResponse:
        def work(state: RequestState, cost: CostCounter) -> pb.PredictResponse:
            state.check()
            return self.core.predict(request, cost, state)

        return await self._run(call, request, "predict", work)

    def list_models(self) -> pb.ListModelsResponse:
        return self.core.list_models()

    def get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        return self.core.get_model(request)

    # ---- the path ----------------------------------------------------------------------

    async def _run(self, call: CallInfo, request: pb.ExplainRequest | pb.PredictRequest,
                   method: str, work: Callable[[RequestState, CostCounter], T],
                   relabel: Callable[[T], str] | None = None,
                   prepare: Callable[[], None] | None = None) -> T:
        """Checks limits, ``prepare``s (the request's own checks), admits, runs ``work``
        and records the request once.

        ``relabel`` names the method that actually ran (METHOD_AUTO resolves late). When
        the caller is cancelled or the deadline passes mid-run, the worker is told through
        the RequestState and its slot is freed only once it has stopped, so the pool never
        holds more than ``max_inflight`` requests; the request is recorded then, with the
        passes the worker made. When the grace period of a shutdown ends, the request is
        answered and recorded at once (the process may not outlive the worker), and its
        slot is freed once the worker has stopped.
        """
        outcome = Outcome(call.request_id, self._model_label(request.model), method,
                          call.transport)
        state = RequestState(call.deadline)
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
            self.log.record(outcome, cost)

        try:
            check_limits(request, self.config)
            if prepare is not None:
                prepare()
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
                    outcome.code = _cancelled_code(state)
                    worker.add_done_callback(
                        functools.partial(self._release_after, outcome, cost, state))
                    raise
                if not worker.done():  # the grace period ended first
                    raise Unavailable(SHUTTING_DOWN_STOPPED)
                result = worker.result()
            outcome.cost = getattr(result, "cost", None)
            if relabel is not None:
                outcome.method = relabel(result)
            settle()
            return result
        except ServiceError as exc:
            outcome.code = status_of(exc)
            settle()
            raise
        except asyncio.CancelledError:
            if outcome.code == grpc.StatusCode.OK:
                outcome.code = _cancelled_code(state)
            raise
        except Exception as exc:
            outcome.code = grpc.StatusCode.INTERNAL
            self.log.internal_error(outcome, exc)
            settle()
            raise Internal(
                f"internal error ({type(exc).__name__}); request id {outcome.request_id} — "
                "quote it to the operator, whose log has the traceback") from exc
        finally:
            settle()

    def _runs_inline(self, request: pb.ExplainRequest | pb.PredictRequest,
                     expected_seconds: float) -> bool:
        """Whether to run the work on the event loop rather than hand it to the pool.

        The hand-off to a worker thread and back is a large share of a small model's
        Predict; the loop is blocked meanwhile, so only work known to be short qualifies:
        a method measured under ``inline_below_ms`` on this model, one tensor item (no
        image decoding, whose cost grows with the upload), no other request executing or
        waiting (under load the pool runs requests side by side), and no torch: only
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
            return not registry.get(method_name(method)).needs_torch
        except NotFound:
            return False

    # ---- slots and shutdown ------------------------------------------------------------

    def _model_label(self, name: str) -> str:
        """The model's name when the repository has it, else ``unknown`` (bounded labels)."""
        known = {handle.name for handle in self.core.repository.handles()}
        return name if name in known else "unknown"

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

    def _release(self, state: RequestState) -> None:
        self._running.discard(state)
        self.admission.release(state)

    def _release_worker(self, state: RequestState, worker: asyncio.Future[Any]) -> None:
        """Done-callback of the worker of a request answered before it stopped: frees the
        slot (the worker's outcome is moot: the client has its status)."""
        if not worker.cancelled():
            worker.exception()
        self._release(state)

    def _release_after(self, outcome: Outcome, cost: CostCounter, state: RequestState,
                       worker: asyncio.Future[Any]) -> None:
        """Done-callback of a cancelled request's worker: frees its slot, then records it."""
        self._release_worker(state, worker)
        self.log.record(outcome, cost)


def _cancelled_code(state: RequestState) -> grpc.StatusCode:
    return (grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(state)
            else grpc.StatusCode.CANCELLED)


def _ran_method(response: Any) -> str:
    return method_label(response.cost.method)
