"""The gRPC servicer: limits, admission, deadlines, cancellation, error mapping, metrics, logs.

It converts nothing but messages and statuses; the work is ``service.core.Core``,
run in a bounded thread pool off the event loop (except cheap one-item requests on an idle
server, which run on it: see ``ExplainerServicer._runs_inline``).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
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
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from kernel.request import CostCounter, ProgressUpdate, RequestState
from saliency.v1 import explainer_pb2 as pb
from saliency.v1 import explainer_pb2_grpc as pb_grpc
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
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
SHUTTING_DOWN_QUEUED = ("the server is shutting down and this request would not finish within "
                        "its grace period; retry on another replica")
SHUTTING_DOWN_STOPPED = ("the server is shutting down: its grace period ended before the "
                         "request finished; retry on another replica")


def remaining_seconds(expected: float, elapsed: float) -> float:
    """Run time still expected of a request estimated at ``expected`` seconds (0 = not
    measured yet) that has run ``elapsed``: the rest of the estimate, and once it has run
    past it (the estimate was wrong), as long again as it has run so far."""
    return expected - elapsed if elapsed < expected else elapsed


@dataclass
class _Waiter:
    """A request waiting for a worker: its expected seconds, when it arrived
    (time.perf_counter()) and the future that grants it one (or refuses it)."""

    cost: float
    arrived: float
    granted: asyncio.Future[None]


@dataclass
class Admission:
    """At most ``max_inflight`` requests executing and ``max_queue`` waiting, in arrival
    order; the rest are refused at once with RESOURCE_EXHAUSTED, so memory stays bounded
    under overload.

    With ``max_queue_wait_seconds`` > 0 the wait for a worker is bounded in time too, which
    a count cannot do when costs differ (a vanilla gradient behind two Integrated Gradients
    waits 15× its own run). A request is refused at once when

    - its expected wait exceeds the bound: the queue is played forward (each waiting
      request, in arrival order, takes the worker that frees first) over the executing
      requests' expected remaining time (``remaining_seconds``), at the callers' cost
      estimates (the moving average of the recent run time per model and method); or
    - it is expected to run longer than the bound and would take the last worker that
      frees within it while requests that fit the bound keep arriving (one did within this
      request's expected run time): long requests never hold every worker then, so cheap
      ones are not stuck behind them (with one worker there is nothing to keep).

    Estimates can be wrong, so a request still waiting once the bound has passed is refused
    then: no request starts after waiting longer than the bound.
    """

    max_inflight: int
    max_queue: int
    metrics: Metrics
    max_queue_wait_seconds: float = 0.0
    inflight: int = 0
    waiting: int = 0
    draining: bool = False
    # Observed maxima and totals (for tests and logs).
    peak_inflight: int = 0
    peak_waiting: int = 0
    admitted: int = 0
    # The waiting requests in arrival order, and (expected seconds, start) of each executing
    # one, keyed by the request's state.
    _queue: dict[int, _Waiter] = field(default_factory=dict, repr=False)
    _running: dict[int, tuple[float, float]] = field(default_factory=dict, repr=False)
    # When the last request that fits the bound arrived, and when the grace period ends
    # while draining (time.perf_counter()).
    _fitting_arrived: float = float("-inf")
    _drain_ends: float = float("inf")

    def _reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    def _free_in(self, now: float, queued: bool = True) -> list[float]:
        """Seconds until each worker frees (a heap), after the waiting requests had their
        turns when ``queued``."""
        free = [remaining_seconds(cost, now - started) for cost, started in
                self._running.values()]
        free += [0.0] * max(self.max_inflight - len(free), 0)
        heapq.heapify(free)
        for waiter in self._queue.values() if queued else ():
            heapq.heapreplace(free, free[0] + waiter.cost)
        return free

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait for a worker (0 while one is free)."""
        if self.inflight < self.max_inflight and not self._queue:
            return 0.0
        return self._free_in(time.perf_counter())[0]

    def _check_wait(self, expected_seconds: float, now: float) -> None:
        """Raises ResourceExhausted when a request expected to run ``expected_seconds``
        would break the queue-wait bound, for itself or for the requests after it."""
        bound = self.max_queue_wait_seconds
        fits = 0.0 < expected_seconds <= bound
        if fits:
            self._fitting_arrived = now
        free = self._free_in(now)
        wait = free[0]
        busy = f"{self.inflight} executing, {self.waiting} waiting"
        if wait > bound:
            self._reject("queue_wait")
            raise ResourceExhausted(
                f"server busy: a request would wait about {wait * 1000:.0f} ms for a worker "
                f"(max_queue_wait_ms={bound * 1000:.0f}; {busy}); retry with backoff or on "
                "another replica"
            )
        if fits or self.max_inflight < 2 or now - self._fitting_arrived > expected_seconds:
            return
        heapq.heapreplace(free, wait + expected_seconds)
        if free[0] > bound:
            self._reject("worker_reserved")
            raise ResourceExhausted(
                f"server busy: this request (about {expected_seconds * 1000:.0f} ms) would "
                f"leave no worker free within max_queue_wait_ms={bound * 1000:.0f} for the "
                f"shorter requests arriving ({busy}); retry with backoff or on another replica"
            )

    async def acquire(self, state: RequestState, expected_seconds: float = 0.0) -> float:
        """Waits for a worker; returns the seconds spent waiting.

        Raises Unavailable while draining, ResourceExhausted when the queue is full or the
        queue-wait bound would not hold, and DeadlineExceeded when the request's deadline
        passed while it waited (it is not started then). ``expected_seconds`` is this
        request's own expected run time (0 = unknown).
        """
        if self.draining:
            self._reject("shutting_down")
            raise Unavailable(SHUTTING_DOWN)
        if self.inflight + self.waiting >= self.max_inflight + self.max_queue:
            self._reject("queue_full")
            raise ResourceExhausted(
                f"server at capacity: {self.inflight} executing (max_inflight="
                f"{self.max_inflight}) and {self.waiting} waiting (max_queue={self.max_queue}); "
                "retry with backoff"
            )
        started = time.perf_counter()
        bound = self.max_queue_wait_seconds
        if bound > 0:
            self._check_wait(expected_seconds, started)
        key = id(state)
        if self.inflight < self.max_inflight and not self._queue:
            self._start(key, expected_seconds, started)
            self.metrics.queue_seconds.observe(0.0)
            return 0.0
        loop = asyncio.get_running_loop()
        waiter = _Waiter(expected_seconds, started, loop.create_future())
        self._queue[key] = waiter
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        self.metrics.queued.set(self.waiting)
        timer = loop.call_later(bound, self._time_out, key) if bound > 0 else None
        try:
            await waiter.granted
        except asyncio.CancelledError:
            self._dequeue(key)
            granted = waiter.granted
            if granted.cancelled() or granted.exception() is None:  # else refused already
                if not granted.cancelled():
                    self.release(state)  # granted just before the cancellation: hand it on
                self._reject("deadline_in_queue" if deadline_passed(state)
                             else "cancelled_in_queue")
            raise
        finally:
            if timer is not None:
                timer.cancel()
        waited = time.perf_counter() - started
        if state.expired():
            self.release(state)
            self._reject("deadline_in_queue")
            raise DeadlineExceeded(
                f"the request's deadline passed after {waited:.3f} s in the queue; it was not "
                "started (raise the deadline or retry when the server is less busy)"
            )
        self.metrics.queue_seconds.observe(waited)
        return waited

    def _start(self, key: int, expected_seconds: float, now: float) -> None:
        self.inflight += 1
        self._running[key] = (expected_seconds, now)
        self.admitted += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        self.metrics.inflight.set(self.inflight)

    def _dequeue(self, key: int) -> _Waiter | None:
        waiter = self._queue.pop(key, None)
        if waiter is not None:
            self.waiting -= 1
            self.metrics.queued.set(self.waiting)
        return waiter

    def _refuse(self, key: int, reason: str, error: ServiceError) -> None:
        """Takes a waiting request out of the queue and answers it with ``error``."""
        waiter = self._dequeue(key)
        if waiter is not None and not waiter.granted.done():
            self._reject(reason)
            waiter.granted.set_exception(error)

    def _time_out(self, key: int) -> None:
        """Refuses a request that waited the whole bound (its timer, or a worker freeing
        when the loop had not yet run that timer)."""
        bound_ms = self.max_queue_wait_seconds * 1000
        self._refuse(key, "queue_timeout", ResourceExhausted(
            f"server busy: no worker freed within max_queue_wait_ms={bound_ms:.0f} "
            f"({self.inflight} executing, {self.waiting} waiting); retry with backoff or on "
            "another replica"
        ))

    def release(self, state: RequestState) -> None:
        """Frees the request's worker and hands it to the first request waiting."""
        self.inflight -= 1
        self._running.pop(id(state), None)
        self.metrics.inflight.set(self.inflight)
        if self.draining:
            self._refuse_unfinished()
        now = time.perf_counter()
        bound = self.max_queue_wait_seconds
        while self._queue and self.inflight < self.max_inflight:
            key, waiter = next(iter(self._queue.items()))
            if 0 < bound < now - waiter.arrived:
                self._time_out(key)
                continue
            self._dequeue(key)
            if not waiter.granted.done():  # not cancelled meanwhile
                self._start(key, waiter.cost, now)
                waiter.granted.set_result(None)

    def drain(self, ends: float) -> None:
        """Stops admitting (UNAVAILABLE) and refuses at once the waiting requests that would
        not finish by ``ends`` (time.perf_counter()), so their clients retry elsewhere; the
        others keep their turn."""
        self.draining = True
        self._drain_ends = ends
        self._refuse_unfinished()

    def close(self) -> None:
        """The grace period is over: refuses every request still waiting."""
        self._drain_ends = float("-inf")
        self._refuse_unfinished()

    def _refuse_unfinished(self) -> None:
        """While draining: the queue played forward, refusing each waiting request that would
        not finish before the grace period ends (it leaves its turn to those behind it)."""
        now = time.perf_counter()
        left = self._drain_ends - now
        free = self._free_in(now, queued=False)
        for key, waiter in list(self._queue.items()):
            if free[0] + waiter.cost > left or left <= 0:
                self._refuse(key, "shutting_down", Unavailable(SHUTTING_DOWN_QUEUED))
            else:
                heapq.heapreplace(free, free[0] + waiter.cost)

    async def idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds until nothing is executing or waiting; returns
        whether that came."""
        ends = time.perf_counter() + timeout
        while self.inflight or self._queue:
            left = ends - time.perf_counter()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.01))
        return True


def deadline_passed(state: RequestState, slack_seconds: float = 0.05) -> bool:
    """Whether a cancellation is the deadline's doing: gRPC cancels at the deadline, which
    our clock may see a hair later than gRPC's."""
    return state.deadline is not None and time.monotonic() >= state.deadline - slack_seconds


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
