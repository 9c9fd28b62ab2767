"""Server start-up: the Explainer service, health, reflection, metrics, reloads and shutdown.

Health: "" is live as soon as the port is bound; ``saliency.v1.Explainer`` is
SERVING while at least one model is ready, and NOT_SERVING while draining.
Models are reloaded without a restart when the repository changes (polled every
``reload_interval_seconds``) or on SIGHUP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from saliency_service.client.connections import server_options
from saliency_service.core.repository import Repository
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.calls import Calls
from saliency_service.protocol.codec import Core
from saliency_service.protocol.explorer import routes as explorer_routes
from saliency_service.protocol.grpc_servicer import ExplainerServicer
from saliency_service.protocol.grpc_wire import add_service
from saliency_service.protocol.rest import build_app
from saliency_service.protocol.rest_server import HttpServer
from saliency_service.serving.admission import Admission
from saliency_service.serving.allocator import keep_freed_memory
from saliency_service.serving.config import Config
from saliency_service.serving.logging_setup import stop_writer
from saliency_service.serving.metrics import Metrics
from saliency_service.serving.onednn_cache import VARIABLE, reserve_kernel_cache
from saliency_service.serving.security import (
    BearerTokenInterceptor,
    load_tokens,
    server_credentials,
)
from saliency_service.serving.warmup import warm_up

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
# Once the grace period has ended: how long the workers of the requests answered then get to
# reach their next check, and how long gRPC gets to send the last replies.
WORKER_STOP_SECONDS = 0.5
REPLY_SECONDS = 0.2


def set_thread_counts(intra_op_threads: int) -> None:
    """Torch's intra-op threads from config, so torch and ONNX Runtime do not oversubscribe."""
    if intra_op_threads > 0:
        import torch  # noqa: PLC0415 - torch is optional at run time for ONNX-only serving

        torch.set_num_threads(intra_op_threads)


def repository_fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every file in ``root/<model>/<version>/``: a change in any
    package changes it."""
    entries: list[tuple[str, int, int]] = []
    if not root.is_dir():
        return ()
    for path in root.glob("*/*/*"):
        try:
            status = path.stat()
        except OSError:  # removed while scanning
            continue
        entries.append((str(path.relative_to(root)), status.st_size, status.st_mtime_ns))
    return tuple(sorted(entries))


class SaliencyServer:
    """One running server; ``start`` binds ports, ``stop`` drains and exits."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.repository = Repository(config.models, config.intra_op_threads)
        self.core = Core(self.repository, config, self.metrics)
        self.executor = ThreadPoolExecutor(
            max_workers=config.max_inflight, thread_name_prefix="explain"
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.admission = Admission(config.max_inflight, config.max_queue, self.metrics,
                                   config.max_queue_wait_ms / 1000.0)
        self.calls = Calls(self.core, self.metrics, self.admission, self.executor)
        self.servicer = ExplainerServicer(self.calls)
        self.http: HttpServer | None = None
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()
        self._reload_lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- models --------------------------------------------------------------------------

    def load_models(self) -> None:
        """(Re)loads every package; in-flight requests keep the handles they hold.

        Runs on an explain worker, like every request that runs torch: each thread that runs a
        parallel torch op gets its own OpenMP team, and once the process has more OpenMP
        threads than cores, libgomp makes every team's threads sleep between ops instead of
        spinning, so a warm-up on another thread would slow every request. A reload
        therefore waits for a free worker and holds it while it loads and warms up: admitted
        requests queue behind it meanwhile."""
        registry.load_builtin()
        self._fingerprint = repository_fingerprint(self.config.models)
        self.repository.load_all()
        for handle in self.repository.handles():
            if handle.ready:
                failures = warm_up(self.core.engine, handle)
                if failures:
                    handle.fail("warm-up failed: " + "; ".join(failures))
        self.metrics.set_models_ready(
            {(h.name, str(h.version)): h.ready for h in self.repository.handles()}
        )

    async def reload(self, force: bool = False) -> bool:
        """Reloads the repository if it changed (or ``force``); returns whether it did."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            current = await loop.run_in_executor(None, repository_fingerprint, self.config.models)
            if not force and current == self._fingerprint:
                return False
            await loop.run_in_executor(self.executor, self.load_models)
            self.metrics.reloads.inc()
            await self._update_readiness()
            log.info(
                "model repository reloaded",
                extra={
                    "event": "reload",
                    "models_ready": sum(h.ready for h in self.repository.handles()),
                },
            )
            return True

    def ready(self) -> bool:
        """At least one model is ready and the server is not draining."""
        return self.repository.any_ready() and not self._stopping

    async def _update_readiness(self) -> None:
        ready = self.ready()
        await self.health.set(
            SERVICE_NAME,
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a failed scan must not stop polling
                log.exception("repository reload failed", extra={"event": "reload_failed"})

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> int:
        """Loads models, binds the ports and marks readiness; returns the gRPC port."""
        capacity = reserve_kernel_cache()
        set_thread_counts(self.config.intra_op_threads)
        kept = keep_freed_memory()
        if kept:  # why RSS stays at its high-water mark
            log.info("freed memory is kept for reuse: %s",
                     ", ".join(f"{name}={value}" for name, value in kept.items()),
                     extra={"event": "allocator"})
        log.info("oneDNN is asked to keep up to %s compiled kernels (%s)", capacity, VARIABLE,
                 extra={"event": "kernel_cache", "capacity": capacity})
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            *server_options(self.config.max_connection_age_seconds,
                            self.config.max_connection_age_grace_seconds,
                            self.config.keepalive_time_seconds,
                            self.config.keepalive_timeout_seconds,
                            self.config.keepalive_min_ping_interval_seconds),
        ]
        interceptors = []
        tokens = load_tokens(self.config)
        if tokens:
            interceptors.append(BearerTokenInterceptor(tokens, self.metrics))
        # Bounds what a flood can hold in memory: each call may carry max_message_bytes.
        self.server = grpc.aio.server(
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=self.config.concurrent_rpcs,
        )
        add_service(self.servicer, self.server, pb.DESCRIPTOR.services_by_name["Explainer"],
                    self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        try:
            self.port = (
                self.server.add_secure_port(address, credentials)
                if credentials
                else self.server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise OSError(f"could not bind {address}: {exc}") from exc
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        if self.config.http_port >= 0:
            app = build_app(self.calls, self.metrics, tokens, self.ready,
                            self.config.max_message_bytes, explorer_routes(self.calls))
            self.http = HttpServer(app, self.config,
                                   self.config.grace_seconds + WORKER_STOP_SECONDS + 1.0)
            self.http_port = await self.http.start()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.load_models)
        await self._update_readiness()
        if self.config.reload_interval_seconds > 0:
            self._poller = asyncio.ensure_future(self._poll(self.config.reload_interval_seconds))
        ready = sum(h.ready for h in self.repository.handles())
        log.info(
            "serving on %s:%d (metrics on :%d, HTTP on :%d, %s); %d model(s) ready",
            self.config.host,
            self.port,
            self.metrics_port,
            self.http_port if self.http is not None else -1,
            "TLS" if self.config.tls else "plaintext",
            ready,
            extra={
                "event": "serving",
                "port": self.port,
                "metrics_port": self.metrics_port,
                "http_port": self.http_port,
                "models_ready": ready,
            },
        )
        return self.port

    async def stop(self, grace: float | None = None) -> int:
        """Drains, then closes the ports; returns how many workers are still busy.

        Readiness turns NOT_SERVING, every connection is sent a GOAWAY and the port closes,
        so clients send new calls to other replicas (calls already sent still arrive); a
        call arriving meanwhile is refused (UNAVAILABLE). Waiting requests
        that would not finish within ``grace`` seconds are refused at once (UNAVAILABLE, so
        their clients retry elsewhere); the others run. When the grace period ends, what
        still waits is refused and what still executes is answered UNAVAILABLE, its worker
        told to stop at its next check; a worker still busy ``WORKER_STOP_SECONDS`` later is
        left to the caller (its request is answered and recorded).
        """
        grace = self.config.grace_seconds if grace is None else grace
        ends = time.perf_counter() + grace
        self._stopping = True
        self.admission.drain(ends)
        if self._poller is not None:
            self._poller.cancel()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        # gRPC's own stop sends the GOAWAY at once; its grace outlasts ours, which ends the
        # calls itself (the second stop below then closes what is left).
        goaway = (asyncio.ensure_future(self.server.stop(grace + WORKER_STOP_SECONDS + 1.0))
                  if self.server is not None else None)
        if self.http is not None:
            self.http.close()  # new HTTP connections are refused; calls in flight go on
        drained = await self.admission.idle(ends - time.perf_counter())
        if not drained:
            stopped = self.calls.stop_running()
            log.warning(
                "grace period of %.1f s ended with %d request(s) still running; answered "
                "UNAVAILABLE, their workers stop at their next check",
                grace,
                stopped,
                extra={"event": "drain_timeout"},
            )
        # The metrics endpoint's HTTP loop notices a stop only at its next half-second poll:
        # meanwhile the workers reach their next check and gRPC sends the last replies.
        closing = asyncio.get_running_loop().run_in_executor(None, self.metrics.stop)
        if not drained:
            await self.admission.idle(WORKER_STOP_SECONDS)
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(REPLY_SECONDS)
        if goaway is not None:
            await goaway
        if self.http is not None:
            await self.http.stop()
        await closing
        self.executor.shutdown(wait=False, cancel_futures=True)
        reloading = self._reload_lock is not None and self._reload_lock.locked()
        return self.admission.inflight + int(reloading)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(config: Config) -> None:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully and ends the process; SIGHUP
    reloads the models."""
    server = SaliencyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hangup() -> None:
        task = asyncio.ensure_future(server.reload(force=True))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()
    log.info(
        "signal received: draining for up to %.1f s",
        config.grace_seconds,
        extra={"event": "draining"},
    )
    busy = await server.stop()
    log.info("stopped; %d worker(s) still in a pass", busy, extra={"event": "stopped"})
    # Every request has been answered and recorded. Ending here keeps the exit within a
    # second of the grace period: Python would wait at exit for a worker still in a pass,
    # then finalize torch's modules, which is slow.
    await asyncio.sleep(0)  # the request lines queued on the loop
    stop_writer()
    sys.stdout.flush()
    os._exit(0)
