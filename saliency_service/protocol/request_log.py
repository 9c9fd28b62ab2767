"""What one request did, recorded once: its metrics and its log line."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field

import grpc

from saliency_service.core.request import CostCounter
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.serving.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one request did, gathered for its metrics and its log line."""

    request_id: str
    model: str
    method: str
    transport: str = "grpc"
    code: grpc.StatusCode = grpc.StatusCode.OK
    cost: pb.Cost | None = None
    queue_seconds: float = 0.0
    cpu_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class RequestLog:
    """Records finished requests in the metrics and the structured log."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def record(self, outcome: Outcome, cost: CostCounter) -> None:
        """The figures are the response's Cost when there is one, so ``/metrics`` adds up
        to the responses."""
        if outcome.cost is not None:
            wall, cpu = outcome.cost.wall_seconds, outcome.cost.cpu_seconds
        else:
            wall = time.perf_counter() - outcome.started - outcome.queue_seconds
            cpu = outcome.cpu_seconds
        self.metrics.observe(outcome.model, outcome.method, outcome.code.name, wall, cpu,
                             dict(cost.forward_by_engine), cost.backward_passes,
                             cost.remote_calls, cost.remote_bytes)
        self.metrics.transport_requests.labels(outcome.transport, outcome.code.name).inc()
        # The line is queued on the next turn of the loop, after the reply has gone out:
        # the caller need not wait for the log record to be built.
        asyncio.get_running_loop().call_soon(functools.partial(
            log.info,
            "request %s %s",
            outcome.method,
            outcome.code.name,
            extra={
                "event": "request",
                "request_id": outcome.request_id,
                "transport": outcome.transport,
                "model": outcome.model,
                "method": outcome.method,
                "code": outcome.code.name,
                "latency_ms": round((time.perf_counter() - outcome.started) * 1000, 3),
                "queue_ms": round(outcome.queue_seconds * 1000, 3),
                "forward_passes": cost.forward_passes,
                "backward_passes": cost.backward_passes,
            },
        ))

    @staticmethod
    def internal_error(outcome: Outcome, exc: BaseException) -> None:
        log.exception(
            "request %s failed: %s", outcome.request_id, type(exc).__name__,
            extra={"event": "internal_error", "request_id": outcome.request_id,
                   "transport": outcome.transport, "model": outcome.model,
                   "method": outcome.method, "code": "INTERNAL"},
        )
