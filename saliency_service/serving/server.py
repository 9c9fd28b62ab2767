"""Server start-up: the Explainer service, health, reflection, metrics, reloads and shutdown.

Health: "" is live as soon as the port is bound; ``saliency.v1.Explainer`` (and HTTP
``/readyz``, flipped at the same moment) is SERVING once the repository has been loaded and
warmed up with at least one model ready, and NOT_SERVING while draining. Until the
repository has been scanned, calls for a model are answered UNAVAILABLE ("models are
loading"). Models are reloaded without a restart when the repository changes (polled every
``reload_interval_seconds``) or on SIGHUP.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from saliency_service.client.connections import server_options
from saliency_service.core import devices
from saliency_service.core.errors import Unavailable
from saliency_service.core.repository import ModelHandle, Repository
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
from saliency_service.serving.kserve_explainer import pinned_models
from saliency_service.serving.logging_setup import stop_writer
from saliency_service.serving.metrics import Metrics
from saliency_service.serving.onednn_cache import VARIABLE, reserve_kernel_cache
from saliency_service.serving.security import (
    BearerTokenInterceptor,
    load_tokens,
    server_credentials,
)
from saliency_service.serving.warmup import WarmUpBound, warm_up

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
# Once the grace period has ended: how long the workers of the requests answered then get to
# reach their next check, and how long gRPC gets to send the last replies.
WORKER_STOP_SECONDS = 0.5
REPLY_SECONDS = 0.2
# While draining, the port stays open (new calls still served, health NOT_SERVING) until calls
# have paused this long, or ``drain_notice_seconds`` have passed: gRPC cancels a call that
# reaches it after its GOAWAY was sent, so the GOAWAY goes out when no call is on its way.
QUIET_SECONDS = 0.1
# Seconds between attempts to load again the remote packages whose predictor did not
# answer: doubling from the first to the last while it still does not.
PREDICTOR_RETRY_SECONDS = (2.0, 30.0)
# A port that cannot be bound, by its flag.
PORT_FLAGS = {"gRPC": "--port", "metrics": "--metrics-port", "HTTP": "--http-port"}


class PortUnavailable(OSError):
    """A port the server was told to listen on is taken or cannot be bound."""

    def __init__(self, kind: str, host: str, port: int, reason: object) -> None:
        super().__init__(f"cannot listen on {host}:{port} for {kind} ({PORT_FLAGS[kind]}): "
                         f"{reason}; is another server running there? choose another port "
                         f"with {PORT_FLAGS[kind]} (0 picks a free one)")


def check_port_free(kind: str, host: str, port: int) -> None:
    """Raises PortUnavailable when ``host:port`` is taken, before gRPC tries it (gRPC
    reports a failed bind on stderr in its own format, then only raises)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError:
        return  # gRPC reports the address itself
    for family, kind_of_socket, protocol, _, address in addresses:
        with socket.socket(family, kind_of_socket, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise PortUnavailable(kind, host, port, exc.strerror or exc) from exc


class CallArrivals(grpc.aio.ServerInterceptor):
    """Notes when the last call arrived, so a drain can send its GOAWAY between calls."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.last = time.monotonic()
        return await continuation(handler_call_details)


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
        # Every session and program of the process follows it; raises PlacementRefused.
        devices.configure(config.device, config.onnx_providers, config.precision,
                          config.forward_engine)
        self.repository = Repository(config.models, config.intra_op_threads,
                                     pinned_models(config))
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
        self._awaiting: asyncio.Task[None] | None = None
        self._stopping = False
        # One readiness for gRPC health and HTTP /readyz, set when a load has finished.
        self._ready = False
        self._warming: WarmUpBound | None = None
        self.arrivals = CallArrivals()

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
        self.repository.load_all(self.prepare)
        self.metrics.set_models_ready(
            {(h.name, str(h.version)): h.ready for h in self.repository.handles()}
        )

    def prepare(self, handle: ModelHandle) -> None:
        """Warms a loaded package up within ``warmup_timeout_seconds``; what fails or
        outlasts it marks that package alone not ready."""
        if self._stopping:
            handle.fail("not warmed up: the server is shutting down")
        else:
            bound = WarmUpBound(handle, self.config.warmup_timeout_seconds)
            self._warming = bound
            try:
                failures = warm_up(self.core.engine, handle, bound)
            except Exception as exc:  # noqa: BLE001 - this package alone is not ready
                failures = [f"{type(exc).__name__}: {exc}"]
            finally:
                self._warming = None
            if failures:
                handle.fail("warm-up failed: " + "; ".join(failures))

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
        """The repository is loaded and warmed up with at least one model ready, and the
        server is not draining: HTTP /readyz and gRPC health say the same."""
        return self._ready and not self._stopping

    async def _update_readiness(self) -> None:
        self._ready = self.repository.any_ready()
        ready = self.ready()
        await self.health.set(
            SERVICE_NAME,
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def _await_predictors(self) -> None:
        """Loads again, every few seconds (``PREDICTOR_RETRY_SECONDS``), the remote
        packages whose predictor did not answer (a predictor that starts after the server,
        as a KServe InferenceService's does), so each turns ready once it answers."""
        loop = asyncio.get_running_loop()
        first, last = PREDICTOR_RETRY_SECONDS
        delay = first
        while True:
            await asyncio.sleep(delay)
            waiting = [h for h in self.repository.handles()
                       if h.error.startswith(f"{Unavailable.__name__}: ")]
            delay = min(delay * 2, last) if waiting else first
            if not waiting or self._reload_lock is None or self._reload_lock.locked():
                continue
            async with self._reload_lock:
                for handle in waiting:  # a copy loads and warms up; the package serves after
                    fresh = copy.copy(handle)
                    await loop.run_in_executor(None, fresh.load, self.config.intra_op_threads)
                    if fresh.ready:
                        await loop.run_in_executor(None, self.repository.replace, fresh,
                                                   self.prepare)
                    if not fresh.ready:
                        handle.error = fresh.error
                        continue
                    log.info("model %s version %d: ready (its predictor answered)",
                             fresh.name, fresh.version, extra={"event": "predictor_answered"})
                self.metrics.set_models_ready(
                    {(h.name, str(h.version)): h.ready for h in self.repository.handles()})
                await self._update_readiness()

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a failed scan must not stop polling
                log.exception("repository reload failed", extra={"event": "reload_failed"})

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> int:
        """Binds the ports, loads and warms the models and marks readiness; returns the gRPC
        port."""
        await self.listen()
        await self.load()
        return self.port

    async def listen(self) -> None:
        """Binds every port; calls for models are answered UNAVAILABLE until ``load``.

        Raises PortUnavailable (one line naming the port and its flag) when a port is taken:
        gRPC's SO_REUSEPORT is off, so a second server cannot share a port unnoticed."""
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
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            *server_options(self.config.max_connection_age_seconds,
                            self.config.max_connection_age_grace_seconds,
                            self.config.keepalive_time_seconds,
                            self.config.keepalive_timeout_seconds,
                            self.config.keepalive_min_ping_interval_seconds),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = [self.arrivals]
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
        check_port_free("gRPC", self.config.host, self.config.port)
        try:
            self.port = (
                self.server.add_secure_port(address, credentials)
                if credentials
                else self.server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise PortUnavailable("gRPC", self.config.host, self.config.port,
                                  "the address is in use or cannot be bound") from exc
        if self.port == 0:
            raise PortUnavailable("gRPC", self.config.host, self.config.port,
                                  "the address is in use or cannot be bound")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.config.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(self.config.metrics_port,
                                                       self.config.host)
            except OSError as exc:
                await self.server.stop(None)
                raise PortUnavailable("metrics", self.config.host, self.config.metrics_port,
                                      exc.strerror or exc) from exc
        if self.config.http_port >= 0:
            app = build_app(self.calls, self.metrics, tokens, self.ready,
                            self.config.max_message_bytes, explorer_routes(self.calls))
            self.http = HttpServer(app, self.config,
                                   self.config.grace_seconds + WORKER_STOP_SECONDS + 1.0)
            try:
                self.http_port = await self.http.start()
            except OSError as exc:
                await self.server.stop(None)
                self.metrics.stop()
                reason = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                raise PortUnavailable("HTTP", self.config.host, self.config.http_port,
                                      getattr(reason, "strerror", None) or reason) from exc
        log.info("listening on %s:%d (metrics on :%d, HTTP on :%d); loading the models",
                 self.config.host, self.port, self.metrics_port,
                 self.http_port if self.http is not None else -1,
                 extra={"event": "listening", "port": self.port,
                        "metrics_port": self.metrics_port, "http_port": self.http_port})

    async def load(self) -> None:
        """Loads and warms up the repository, then turns ready (SERVING, /readyz 200)."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.load_models)
            await self._update_readiness()
        if self.config.reload_interval_seconds > 0:
            self._poller = asyncio.ensure_future(self._poll(self.config.reload_interval_seconds))
        self._awaiting = asyncio.ensure_future(self._await_predictors())
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
        warming = self._warming
        if warming is not None:
            warming.stop("not warmed up: the server is shutting down")
        for task in (self._poller, self._awaiting):
            if task is not None:
                task.cancel()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._calls_pause(min(self.config.drain_notice_seconds, grace))
        self.admission.drain(ends)
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

    async def _calls_pause(self, longest: float) -> None:
        """Waits until no call has arrived for ``QUIET_SECONDS``, or ``longest`` seconds:
        calls arriving meanwhile are still served (health already says NOT_SERVING), so a
        client balancing over replicas loses none while it learns to go elsewhere."""
        ends = time.monotonic() + longest
        while True:
            now = time.monotonic()
            quiet_at = self.arrivals.last + QUIET_SECONDS
            if now >= quiet_at or now >= ends:
                return
            await asyncio.sleep(min(quiet_at, ends) - now)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(config: Config) -> None:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully and ends the process; SIGHUP
    reloads the models."""
    server = SaliencyServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reloaded(task: asyncio.Task[bool]) -> None:
        reloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("repository reload failed: %s: %s", type(task.exception()).__name__,
                      task.exception(), extra={"event": "reload_failed"})

    def on_hangup() -> None:
        task = asyncio.ensure_future(server.reload(force=True))
        reloads.add(task)
        task.add_done_callback(reloaded)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await server.listen()
    # A SIGTERM during the warm-up stops it and drains like any other.
    loading = asyncio.ensure_future(server.load())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait((loading, signalled), return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        raise loading.exception()  # type: ignore[misc]
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
