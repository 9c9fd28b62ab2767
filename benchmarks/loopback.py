"""Loopback stand-ins for a cluster's networking, so several replicas can be measured on one
machine through the same client code that runs against Kubernetes.

- ``DnsResponder``: a UDP DNS server answering A queries for any name with the current list
  of replica addresses (127.0.0.x), as a headless Service's name resolves to its ready pods.
  A client reaches it with the target ``dns://127.0.0.1:<port>/<name>:<grpc port>``.
- ``ConnectionProxy``: one TCP address spreading each new connection over the current
  replicas, as a ClusterIP Service (kube-proxy) does; it counts connections per replica.

Both run on their own event loop in a background thread and take the replica list live
(``set_addresses`` / ``set_backends``), as the endpoints of a Service change.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Coroutine
from typing import Any

# DNS wire format (RFC 1035): answers of type A, class IN, with this time to live.
TYPE_A = 1
CLASS_IN = 1
TTL_SECONDS = 1


def loopback_addresses(count: int) -> list[str]:
    """127.0.0.1 … 127.0.0.<count>: all of 127/8 is the loopback interface on Linux."""
    return [f"127.0.0.{index + 1}" for index in range(count)]


def free_port_on(addresses: list[str]) -> int:
    """A TCP port free on every address in ``addresses`` (bound to each in turn)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise OSError(f"no port free on all of {addresses}")


class _Background:
    """An asyncio loop in a daemon thread, for servers used from blocking code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def dns_answer(query: bytes, addresses: list[str]) -> bytes:
    """The response to one DNS query: every address as an A record for an A question,
    no records (but no error) for any other type, e.g. the AAAA and SRV queries of gRPC's
    resolver."""
    (ident, _flags, questions) = struct.unpack("!HHH", query[:6])
    offset = 12
    while query[offset] != 0:  # the question's name: length-prefixed labels
        offset += 1 + query[offset]
    offset += 1
    qtype, _qclass = struct.unpack("!HH", query[offset:offset + 4])
    question = query[12:offset + 4]
    records = addresses if qtype == TYPE_A and questions == 1 else []
    header = struct.pack("!HHHHHH", ident, 0x8180, 1, len(records), 0, 0)
    answers = b"".join(
        struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL_SECONDS, 4)
        + socket.inet_aton(address)
        for address in records
    )
    return header + question + answers


class DnsResponder(asyncio.DatagramProtocol):
    """Answers every A query with the current addresses; counts the queries."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self.queries = 0
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._background: _Background | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        with contextlib.suppress(IndexError, struct.error):  # not a query we can parse
            assert self._transport is not None
            self._transport.sendto(dns_answer(data, self.addresses), addr)

    def set_addresses(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)

    def start(self) -> DnsResponder:
        self._background = _Background()

        async def bind() -> None:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: self, local_addr=("127.0.0.1", 0))
            self.port = transport.get_extra_info("sockname")[1]

        self._background.run(bind())
        return self

    def target(self, name: str, port: int) -> str:
        """The gRPC target resolving ``name`` through this responder."""
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def stop(self) -> None:
        if self._background is not None:
            if self._transport is not None:
                self._background.loop.call_soon_threadsafe(self._transport.close)
            self._background.close()
            self._background = None


class ConnectionProxy:
    """A TCP listener on one address handing each new connection to the replica with the
    fewest open connections (ties: the one that got a connection longest ago), then copying
    bytes both ways until either side closes."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = list(backends)
        self.open: Counter[tuple[str, int]] = Counter()
        self.accepted: Counter[tuple[str, int]] = Counter()
        self.port = 0
        self._order = 0
        self._last: dict[tuple[str, int], int] = {}
        self._server: asyncio.base_events.Server | None = None
        self._background: _Background | None = None

    def set_backends(self, backends: list[tuple[str, int]]) -> None:
        self.backends = list(backends)

    def _choose(self) -> tuple[str, int]:
        backends = list(self.backends)
        if not backends:
            raise ConnectionError("no backends")
        return min(backends, key=lambda b: (self.open[b], self._last.get(b, -1)))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self._choose()
        self._order += 1
        self._last[backend] = self._order
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*backend)
        except OSError:
            writer.close()
            return
        self.open[backend] += 1
        self.accepted[backend] += 1
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer),
                                 self._pipe(upstream_reader, writer))
        except asyncio.CancelledError:  # the proxy is stopping
            upstream_writer.close()
            writer.close()
        finally:
            self.open[backend] -= 1

    def start(self) -> ConnectionProxy:
        self._background = _Background()

        async def listen() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        self._background.run(listen())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _close(self) -> None:
        """Stops listening and ends every connection still copied."""
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._background is not None:
            self._background.run(self._close())
            self._background.close()
            self._background = None
