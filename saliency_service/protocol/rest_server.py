"""uvicorn serving the HTTP API on the gRPC server's event loop, in the same process.

The process's own ``serve`` owns the signals, so uvicorn installs none; the server drains
with gRPC: ``close`` stops accepting (new connections are refused, idle keep-alive ones
closed), the calls in flight end as the drain ends them, then ``stop`` returns.

Idle sockets cannot starve the port: a connection gets ``--http-header-timeout-seconds`` to
send a complete request head (from its opening, or from its previous response), and the
connections open at once are bounded in all and per client address, a new one beyond either
bound answered 503 and closed. Requests in progress are bounded apart from connections
(``ConcurrencyLimit``), so open sockets never make requests 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from saliency_service.serving.config import Config
from saliency_service.serving.security import http_ssl_options

try:  # what uvicorn's "auto" picks
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Protocol
except ImportError:  # pragma: no cover - httptools is not installed
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Protocol  # type: ignore[assignment]

log = logging.getLogger(__name__)
# Answered whatever the load: probes must not fail because the service is busy.
UNBOUNDED_PATHS = ("/healthz", "/readyz")


def _unavailable(message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": 503, "status": "UNAVAILABLE", "message": message,
                      "request_id": request_id}}


class ConnectionGuard:
    """Bounds one HTTP server's connections: the time each gets to send a request head, how
    many are open at once, and how many of those come from one client address."""

    def __init__(self, header_timeout: float, max_connections: int,
                 max_per_client: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.per_client: Counter[str] = Counter()

    def refusal(self, client: str, open_connections: int) -> str | None:
        """Why a new connection from ``client`` is refused, or None (it is then counted)."""
        if self.per_client[client] >= self.max_per_client:
            return (f"too many connections from {client}: at most {self.max_per_client} at "
                    "once (--http-max-connections-per-client); reuse connections or close idle "
                    "ones")
        if open_connections > self.max_connections:
            return (f"too many HTTP connections: at most {self.max_connections} at once "
                    "(--http-max-connections); retry shortly")
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    def protocol_class(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol with this guard's bounds."""
        guard = self

        class GuardedProtocol(_Protocol):  # type: ignore[misc,valid-type]
            """Refuses connections beyond the bounds and closes those that are slow to
            send a request head."""

            _counted: str | None = None
            _head_timer: asyncio.TimerHandle | None = None

            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                client = self.client[0] if self.client else ""
                refusal = guard.refusal(client, len(self.connections))
                if refusal is not None:
                    log.info("HTTP connection refused: %s", refusal,
                             extra={"event": "connection_refused", "peer": client})
                    body = json.dumps(_unavailable(refusal, uuid.uuid4().hex)).encode()
                    transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: "
                                    b"application/json\r\nconnection: close\r\n"
                                    b"content-length: %d\r\n\r\n%s" % (len(body), body))
                    transport.close()
                    return
                self._counted = client
                self._arm()

            def connection_lost(self, exc: Exception | None) -> None:
                if self._counted is not None:
                    guard.release(self._counted)
                    self._counted = None
                self._disarm()
                super().connection_lost(exc)

            def on_response_complete(self) -> None:
                super().on_response_complete()
                if not self.transport.is_closing():
                    self._arm()  # the next request's head is due within the timeout too

            def _arm(self) -> None:
                self._disarm()
                self._head_timer = self.loop.call_later(guard.header_timeout, self._expire)

            def _disarm(self) -> None:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None

            def _expire(self) -> None:
                self._head_timer = None
                if self.cycle is not None and not self.cycle.response_complete:
                    return  # a request is being served; its response re-arms the timer
                if not self.transport.is_closing():
                    log.debug("HTTP connection from %s closed: no request head within %g s",
                              self._counted, guard.header_timeout,
                              extra={"event": "header_timeout", "peer": self._counted})
                    self.transport.close()

        return GuardedProtocol


class ConcurrencyLimit:
    """ASGI wrapper answering 503 beyond ``limit`` requests in progress (as gRPC's
    ``maximum_concurrent_rpcs``), health probes excepted."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNBOUNDED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            message = (f"the server holds {self.limit} HTTP requests already "
                       "(--max-concurrent-rpcs); retry shortly")
            await JSONResponse(_unavailable(message, uuid.uuid4().hex),
                               status_code=503)(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are saliency_service.serving.server.serve's


class HttpServer:
    """One uvicorn server for ``app`` on ``config.host:config.http_port``."""

    def __init__(self, app: ASGIApp, config: Config, drain_seconds: float) -> None:
        self.guard = ConnectionGuard(config.http_header_timeout_seconds,
                                     config.http_max_connections,
                                     config.http_max_connections_per_client)
        self.config = uvicorn.Config(
            ConcurrencyLimit(app, config.concurrent_rpcs), host=config.host,
            port=config.http_port, lifespan="off", log_config=None, access_log=False,
            server_header=False, http=self.guard.protocol_class(),
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
