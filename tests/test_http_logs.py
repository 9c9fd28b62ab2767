"""Client faults over HTTP are logged as one line each, without a traceback, and a client
that goes away is recorded as cancelled, not as an internal error."""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import RunningServer, make_config
from tests.production_support import scrape, value
from tests.test_http_api import HOSTILE_JSON

TENSOR = {"shape": [1, 3, 32, 32], "dtype": "DTYPE_FLOAT32",
          "data": base64.b64encode(np.zeros((1, 3, 32, 32), np.float32).tobytes()).decode()}


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, http_port=0)).start()
    yield running
    running.stop()


def bad_requests() -> list[tuple[str, str, bytes, str]]:
    """(method, path, body, content type) of client mistakes of every kind."""
    kserve = [("POST", path, text.encode(), "application/json") for _, path, text, _ in
              HOSTILE_JSON]
    return [*kserve,
            ("POST", "/v1/models/tiny:predict", b'{"instances": ["@@"]}', "application/json"),
            ("POST", "/v1/models/nope:predict", b'{"instances": [[[[1.0]]]]}',
             "application/json"),
            ("POST", "/v1/models/tiny:explain", b"{not json", "application/json"),
            ("POST", "/api/v1/explain", b"--x\r\nbroken", "multipart/form-data; boundary=x"),
            ("POST", "/api/v1/predict", b'{"model": "tiny", "colour": 1}', "application/json"),
            ("GET", "/api/v1/models/nope", b"", ""),
            ("GET", "/api/v1/models/tiny?version=" + "9" * 30, b"", "")]


def test_each_client_fault_is_one_line_without_a_traceback(
        web: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    sent: list[str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as http:
        for round_ in range(5):
            for index, (method, path, body, content_type) in enumerate(bad_requests()):
                request_id = f"fault-{round_}-{index}"
                response = http.request(method, path, content=body, headers={
                    "content-type": content_type, "x-request-id": request_id})
                assert 400 <= response.status_code < 500, (path, response.text)
                sent.append(request_id)
    time.sleep(0.2)  # the last lines are queued on the server's loop after the replies
    records = list(caplog.records)
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info or r.exc_text
                or "Traceback" in r.getMessage()]
    lines = [r for r in records if getattr(r, "request_id", None) in sent]
    by_request = {request_id: 0 for request_id in sent}
    for record in lines:
        by_request[record.request_id] += 1  # type: ignore[attr-defined]
    assert set(by_request.values()) == {1}, [k for k, v in by_request.items() if v != 1]
    assert all(r.levelno in (logging.INFO, logging.WARNING) for r in lines)
    # (uvicorn's access log is off in the server; only pytest's capture reaches it)
    unrelated = [r for r in records if r not in lines and r.name.startswith(
        ("saliency_service", "uvicorn.error", "python_multipart"))]
    assert not unrelated, [r.getMessage() for r in unrelated]


def test_a_client_that_leaves_a_non_streaming_call_is_recorded_as_cancelled(
        web: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = web.server.http_port
    before = scrape(web.server.metrics_port)
    body = ('{"model": "tiny", "method": "decam", "seed": 1, "input": {"tensor": '
            + __import__("json").dumps(TENSOR) + '}, "decam": {"generations": 500, '
            '"population": 256, "patience": 0}}').encode()
    head = (f"POST /api/v1/explain HTTP/1.1\r\nhost: x\r\nx-request-id: leaves\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while value(scrape(web.server.metrics_port), "saliency_inflight_requests") < 1:  # running
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while not [r for r in caplog.records if getattr(r, "request_id", "") == "leaves"]:
        assert time.monotonic() < deadline, "the call was never recorded"
        time.sleep(0.05)
    after = scrape(web.server.metrics_port)
    lines = [r for r in caplog.records if getattr(r, "request_id", "") == "leaves"]
    assert len(lines) == 1 and lines[0].code == "CANCELLED"  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

    def added(code: str) -> float:
        name = "saliency_transport_requests_total"
        return value(after, name, transport="http", code=code) - value(
            before, name, transport="http", code=code)

    assert added("CANCELLED") == 1 and added("INTERNAL") == 0
