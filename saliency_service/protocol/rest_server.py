"""uvicorn serving the HTTP API on the gRPC server's event loop, in the same process.

The process's own ``serve`` owns the signals, so uvicorn installs none; the server drains
with gRPC: ``close`` stops accepting (new connections are refused, idle keep-alive ones
closed), the calls in flight end as the drain ends them, then ``stop`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from saliency_service.serving.config import Config
from saliency_service.serving.security import http_ssl_options


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are saliency_service.serving.server.serve's


class HttpServer:
    """One uvicorn server for ``app`` on ``config.host:config.http_port``."""

    def __init__(self, app: ASGIApp, config: Config, drain_seconds: float) -> None:
        self.config = uvicorn.Config(
            app, host=config.host, port=config.http_port, lifespan="off", log_config=None,
            access_log=False, server_header=False,
            # As gRPC's maximum_concurrent_rpcs: beyond it, 503 at once.
            limit_concurrency=config.concurrent_rpcs,
            timeout_graceful_shutdown=int(drain_seconds) + 1,
            **http_ssl_options(config))
        self.server = _EmbeddedServer(self.config)
        self.task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that name it, and
        # without it a response's head and body wait on the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise OSError(f"could not bind HTTP {host}:{port}: {exc}") from exc
        self.port = int(sock.getsockname()[1])
        self.task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start
                raise OSError(f"HTTP server on port {self.port} stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    def close(self) -> None:
        """Stops accepting connections (at uvicorn's next tick)."""
        self.server.should_exit = True

    async def stop(self) -> None:
        self.close()
        if self.task is not None:
            await self.task
