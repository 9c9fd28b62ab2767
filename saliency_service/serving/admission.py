"""Admission: at most ``max_inflight`` requests executing and a bounded, cost-aware queue;
what a request hears while the server drains."""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import dataclass, field

from saliency_service.core.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from saliency_service.core.request import RequestState
from saliency_service.serving.metrics import Metrics

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
