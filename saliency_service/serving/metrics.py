"""Prometheus metrics on the cost of every method, served on their own port.

Each server owns a registry (several servers can live in one process, e.g. in
tests). The figures here are the same ones each response's ``Cost`` carries.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

# Weight of the newest request in the moving average of recent cost: about the last ten
# requests count, so the estimate follows contention within a second of load.
RECENT_WEIGHT = 0.2
# 1 ms … 120 s, roughly ×2.5 per bucket.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


@dataclass
class MeanCost:
    """Running mean of one (model, method)'s successful requests, for GetModel and AUTO,
    and a moving average of the recent ones, which follows the load (for admission)."""

    requests: int = 0
    wall_seconds: float = 0.0
    recent_seconds: float = 0.0

    @property
    def mean_seconds(self) -> float:
        return self.wall_seconds / self.requests if self.requests else 0.0


class Metrics:
    """The service's metric families (names as DESIGN.md gives them).

    ``observe`` takes the same figures the response's ``Cost`` carries, so the
    histogram sums and counters on ``/metrics`` add up to the responses exactly.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "saliency_requests",
            "Requests by model, method and gRPC status code.",
            ["model", "method", "code"],
            registry=r,
        )
        self.transport_requests = Counter(
            "saliency_transport_requests",
            "Requests by transport (grpc, http) and gRPC status code.",
            ["transport", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "saliency_request_seconds",
            "Wall time of successful requests' work (Cost.wall_seconds; queueing excluded).",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "saliency_queue_seconds",
            "Time admitted requests waited for a worker.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_passes = Counter(
            "saliency_forward_passes",
            "Forward passes, counted per image.",
            ["model", "method", "engine"],
            registry=r,
        )
        self.backward_passes = Counter(
            "saliency_backward_passes",
            "Backward passes, counted per image.",
            ["model", "method"],
            registry=r,
        )
        self.remote_calls = Counter(
            "saliency_remote_calls",
            "Calls to remote models' predictors (core.remote).",
            ["model", "method"],
            registry=r,
        )
        self.remote_bytes = Counter(
            "saliency_remote_bytes",
            "Bytes sent to and received from remote models' predictors (bodies).",
            ["model", "method"],
            registry=r,
        )
        self.cpu_seconds = Counter(
            "saliency_cpu_seconds",
            "Process CPU seconds spent while serving requests.",
            ["model", "method"],
            registry=r,
        )
        self.inline = Counter(
            "saliency_inline_requests",
            "Requests run on the event loop instead of a worker thread (cheap one-item tensor "
            "requests on an idle server; --inline-below-ms).",
            ["model", "method"],
            registry=r,
        )
        self.inflight = Gauge("saliency_inflight_requests", "Requests executing now.", registry=r)
        self.queued = Gauge(
            "saliency_queued_requests",
            "Requests admitted and waiting for a worker (queue depth).",
            registry=r,
        )
        self.rejected = Counter(
            "saliency_rejected",
            "Requests refused before running, by reason.",
            ["reason"],
            registry=r,
        )
        self.model_ready = Gauge(
            "saliency_model_ready",
            "1 when the model version is loaded and serving.",
            ["model", "version"],
            registry=r,
        )
        self.reloads = Counter(
            "saliency_repository_reloads",
            "Rescans of the model repository that found changes.",
            registry=r,
        )
        self._means: dict[tuple[str, str], MeanCost] = {}
        self._ready_labels: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._http: Any = None

    def observe(
        self,
        model: str,
        method: str,
        code: str,
        wall_seconds: float,
        cpu_seconds: float,
        forward_by_engine: dict[str, int],
        backward_passes: int,
        remote_calls: int = 0,
        remote_bytes: int = 0,
    ) -> None:
        """Records one finished request (successful or not)."""
        self.requests.labels(model, method, code).inc()
        for engine, count in forward_by_engine.items():
            if count:
                self.forward_passes.labels(model, method, engine).inc(count)
        if backward_passes:
            self.backward_passes.labels(model, method).inc(backward_passes)
        if remote_calls:
            self.remote_calls.labels(model, method).inc(remote_calls)
            self.remote_bytes.labels(model, method).inc(remote_bytes)
        if cpu_seconds > 0:
            self.cpu_seconds.labels(model, method).inc(cpu_seconds)
        if code == "OK":
            self.request_seconds.labels(model, method).observe(wall_seconds)
            with self._lock:
                mean = self._means.setdefault((model, method), MeanCost())
                mean.requests += 1
                mean.wall_seconds += wall_seconds
                mean.recent_seconds = (wall_seconds if mean.requests == 1 else
                                       mean.recent_seconds
                                       + RECENT_WEIGHT * (wall_seconds - mean.recent_seconds))

    def mean_cost(self, model: str, method: str) -> MeanCost:
        """Mean wall seconds of the successful requests so far (GetModel, METHOD_AUTO)."""
        with self._lock:
            found = self._means.get((model, method))
            return (MeanCost(found.requests, found.wall_seconds, found.recent_seconds)
                    if found else MeanCost())

    def set_models_ready(self, states: dict[tuple[str, str], bool]) -> None:
        """Sets ``saliency_model_ready`` for every (model, version) and drops vanished ones."""
        with self._lock:
            for labels in self._ready_labels - set(states):
                self.model_ready.remove(*labels)
            for labels, ready in states.items():
                self.model_ready.labels(*labels).set(1 if ready else 0)
            self._ready_labels = set(states)

    def exposition(self) -> bytes:
        """The text format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the ``/metrics`` HTTP endpoint; returns the bound port (0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
