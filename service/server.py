"""Server start-up: the Explainer service, health, reflection, metrics and graceful shutdown.

Health: "" is live as soon as the port is bound; ``saliency.v1.Explainer`` is
SERVING once at least one model is loaded, and NOT_SERVING while draining.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from handlers import registry
from saliency.v1 import explainer_pb2 as pb
from saliency.v1 import explainer_pb2_grpc as pb_grpc
from service.config import Config
from service.core import Core
from service.explainer import Admission, ExplainerServicer
from service.metrics import Metrics
from service.repository import Repository

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name


def set_thread_counts(intra_op_threads: int) -> None:
    """Torch's intra-op threads from config, so torch and ONNX Runtime do not oversubscribe."""
    if intra_op_threads > 0:
        import torch  # noqa: PLC0415 - torch is optional at run time for ONNX-only serving

        torch.set_num_threads(intra_op_threads)


class SaliencyServer:
    """One running server; ``start`` binds ports, ``stop`` drains and exits."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.repository = Repository(config.models, config.intra_op_threads)
        self.core = Core(self.repository, config, self.metrics)
        self.executor = ThreadPoolExecutor(max_workers=config.max_inflight,
                                           thread_name_prefix="explain")
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.admission: Admission | None = None
        self.port = 0
        self.metrics_port = 0

    def load_models(self) -> None:
        registry.load_builtin()
        self.repository.load_all()
        for handle in self.repository.handles():
            self.metrics.model_ready.labels(handle.name, str(handle.version)).set(
                1 if handle.ready else 0)

    async def start(self) -> int:
        """Loads models, binds the ports and marks readiness; returns the gRPC port."""
        set_thread_counts(self.config.intra_op_threads)
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        self.server = grpc.aio.server(options=options)
        self.admission = Admission(self.config.max_inflight, self.config.max_queue, self.metrics)
        servicer = ExplainerServicer(self.core, self.metrics, self.admission, self.executor)
        pb_grpc.add_ExplainerServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.load_models)
        ready = self.repository.any_ready()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if ready
                              else health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("serving on %s:%d (metrics on :%d); %d model(s) ready",
                 self.config.host, self.port, self.metrics_port,
                 sum(h.ready for h in self.repository.handles()))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Readiness NOT_SERVING, refuse new work, let in-flight requests finish, then stop."""
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.admission is not None:
            self.admission.draining = True
            try:
                await asyncio.wait_for(self.admission.idle(), timeout=grace)
            except TimeoutError:
                log.warning("grace period of %.1f s ended with requests still running", grace)
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(1.0)
        self.metrics.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(config: Config) -> None:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully."""
    server = SaliencyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", config.grace_seconds)
    await server.stop()
    log.info("stopped")
