"""Idle and half-open HTTP connections cannot starve the port: a connection that has not
sent a complete request head within ``http_header_timeout_seconds`` is closed, and the
connections one client address may hold are bounded, so other clients are served meanwhile.

The attacking sockets come from other loopback addresses (127.0.0.2, 127.0.0.3) than the
probes (127.0.0.1), as separate clients would. No verdict depends on speed: the test waits
for the server to close the sockets, with a bound far beyond the timeout.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from saliency_service.protocol.rest_server import ConnectionGuard
from tests.conftest import RunningServer, make_config

PER_CLIENT = 20
HEADER_TIMEOUT = 1.0
TENSOR = {"shape": [1, 3, 32, 32], "dtype": "DTYPE_FLOAT32",
          "data": __import__("base64").b64encode(
              np.zeros((1, 3, 32, 32), np.float32).tobytes()).decode()}


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(
        repository, http_port=0, http_header_timeout_seconds=HEADER_TIMEOUT,
        http_max_connections=500, http_max_connections_per_client=PER_CLIENT)).start()
    yield running
    running.stop()


def connect(port: int, source: str, head: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                    source_address=(source, 0))
    if head:
        sock.sendall(head)
    return sock


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sent before it closed ``sock`` (waits up to 30 s)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def probe(port: int) -> tuple[int, int]:
    """/healthz and a valid Predict, each on a new connection from 127.0.0.1."""
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as http:
        health = http.get("/healthz").status_code
    with httpx.Client(base_url=base, timeout=30) as http:
        predict = http.post("/api/v1/predict",
                            json={"model": "tiny", "input": {"tensor": TENSOR}}).status_code
    return health, predict


def test_idle_and_half_open_connections_do_not_starve_other_clients(
        web: RunningServer) -> None:
    port = web.server.http_port
    idle = [connect(port, "127.0.0.2") for _ in range(100)]
    half_open = [connect(port, "127.0.0.3", b"POST /api/v1/predict HTTP/1.1\r\nhost: x\r\n")
                 for _ in range(50)]
    try:
        assert probe(port) == (200, 200)  # while they are all open
        answers = [closed_by_server(sock) for sock in idle + half_open]
        # The first PER_CLIENT of each address were accepted, then closed for want of a
        # request head, without a word; the others were refused at once with a 503.
        for group in (answers[:100], answers[100:]):
            assert group[:PER_CLIENT] == [b""] * PER_CLIENT
            refused = group[PER_CLIENT:]
            assert all(a.startswith(b"HTTP/1.1 503 ") for a in refused)
            assert b"--http-max-connections-per-client" in refused[0]
        assert probe(port) == (200, 200)
        # Their places are free again: the attacking address is served like any other.
        with connect(port, "127.0.0.2", b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n") as sock:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in idle + half_open:
            sock.close()


def test_a_keep_alive_connection_gets_the_timeout_again_after_each_response(
        web: RunningServer) -> None:
    port = web.server.http_port
    with connect(port, "127.0.0.4", b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n") as sock:
        first = sock.recv(65536)
        while not first.endswith(b'"SERVING"}'):  # the whole response, head and body
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # the head never ends
        assert closed_by_server(sock) == b""


def test_connections_are_counted_per_client_and_in_all() -> None:
    guard = ConnectionGuard(10.0, max_connections=3, max_per_client=2)
    assert guard.refusal("a", 1) is None and guard.refusal("a", 2) is None
    assert "--http-max-connections-per-client" in str(guard.refusal("a", 3))
    assert guard.refusal("b", 3) is None
    assert "--http-max-connections)" in str(guard.refusal("c", 4))
    guard.release("a")
    assert guard.refusal("a", 3) is None


def test_requests_beyond_the_concurrency_bound_are_503_but_probes_are_answered(
        repository: Path) -> None:
    running = RunningServer(make_config(repository, http_port=0, max_concurrent_rpcs=1)).start()
    port = running.server.http_port
    try:
        # A request in progress for as long as the test wants: its body is not all sent.
        with connect(port, "127.0.0.1", b"POST /api/v1/predict HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 20\r\n\r\n{") \
                as sock, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            busy = http.post("/api/v1/predict", json={"model": "tiny", "input": {"tensor": TENSOR}})
            while busy.status_code == 200:  # until the server has read the held request's head
                busy = http.post("/api/v1/predict",
                                 json={"model": "tiny", "input": {"tensor": TENSOR}})
            assert busy.status_code == 503
            assert "--max-concurrent-rpcs" in busy.json()["error"]["message"]
            assert http.get("/healthz").status_code == 200
            assert http.get("/readyz").status_code == 200
            sock.sendall(b' "model": "tiny"}   ')
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")  # no input: answered
            deadline = time.monotonic() + 30  # its place is freed once its reply has gone
            while http.post("/api/v1/predict", json={
                    "model": "tiny", "input": {"tensor": TENSOR}}).status_code != 200:
                assert time.monotonic() < deadline
    finally:
        running.stop()
