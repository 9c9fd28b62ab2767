"""Request bodies are bounded by ``--max-message-bytes`` before and while they are read,
KServe's nested lists of numbers are read without a Python object per number (and bounded
as the float32 tensor they make), and no body holds more JSON items than the decoder is
allowed to build."""

from __future__ import annotations

import json
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from saliency_service.protocol import kserve
from saliency_service.protocol.json_messages import MAX_JSON_ITEMS
from tests.conftest import RunningServer, make_config

LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, http_port=0, max_message_bytes=LIMIT)).start()
    yield running
    running.stop()


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return str(response.json()["error"]["message"])


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
        web: RunningServer) -> None:
    for length in (LIMIT + 1, 10**15):
        with socket.create_connection(("127.0.0.1", web.server.http_port), timeout=30) as sock:
            sock.sendall(f"POST /v1/models/tiny:predict HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         f"application/json\r\ncontent-length: {length}\r\n\r\n".encode())
            answer = sock.recv(65536)  # no body was sent: the head alone is answered
            while b"--max-message-bytes" not in answer and (more := sock.recv(65536)):
                answer += more
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"--max-message-bytes" in answer


def test_a_streamed_body_over_the_limit_is_refused(web: RunningServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ["'
        for _ in range(LIMIT // 65536 + 2):
            yield b"A" * 65536

    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as http:
        response = http.post("/v1/models/tiny:predict", content=chunks(),
                             headers={"content-type": "application/json"})
    assert "max_message_bytes" in error_of(response, 413)


def test_kserve_instances_are_bounded_as_the_tensor_they_make(web: RunningServer) -> None:
    # 2 bytes of text ("1,") make 4 bytes of float32: a body under the limit, a tensor over.
    numbers = LIMIT // 4 + 1
    body = b'{"instances": [[[[' + b"1," * (numbers - 1) + b"1]]]]}"
    assert len(body) < LIMIT
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as http:
        response = http.post("/v1/models/tiny:predict", content=body,
                             headers={"content-type": "application/json"})
    message = error_of(response, 413)
    assert f"[1, 1, 1, {numbers}]" in message and "--max-message-bytes" in message


def test_no_body_holds_more_json_items_than_allowed(web: RunningServer) -> None:
    body = b'{"model": "tiny", "colour": [' + b"0," * MAX_JSON_ITEMS + b"0]}"
    assert len(body) < LIMIT
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as http:
        response = http.post("/api/v1/predict", content=body,
                             headers={"content-type": "application/json"})
    assert f"more than {MAX_JSON_ITEMS} JSON items" in error_of(response, 400)


def test_nested_lists_are_read_without_a_python_object_per_number() -> None:
    array = np.round(np.random.default_rng(3).random((2, 3, 500, 500)), 3)
    body = json.dumps({"instances": array.tolist(), "top_k": 2}).encode()
    tracemalloc.start()
    try:
        parsed = kserve.parse_body(body, 1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(body), peak / len(body)  # JSON's decoder with numpy: about 6×
    request = kserve.predict_request("tiny", parsed)
    assert request.top_k == 2 and list(request.input.tensor.shape) == [2, 3, 500, 500]
    np.testing.assert_array_equal(kserve.tensor_array(request.input.tensor),
                                  array.astype(np.float32))


@pytest.mark.parametrize("instances", [
    b"[[1, 2], [3]]", b"[[1, 2], [3, 4],]", b"[[1, 2] [3, 4]]", b"[[1, , 2]]", b"[[1, 2], []]",
    b"[[1, 2], [3, x]]", b"[[1 2]]", b"[]", b"[[]]", b"[1e999, -1e999]"])
def test_irregular_nested_lists_are_left_to_json_and_its_checks(instances: bytes) -> None:
    """Anything but a regular list of numbers is read by JSON's decoder, as before: a
    mistake gets its message from there (or from the tensor checks)."""
    body = b'{"instances": ' + instances + b"}"
    try:
        expected: object = json.loads(body)["instances"]
    except ValueError:
        with pytest.raises(Exception, match="not JSON"):
            kserve.parse_body(body, 1 << 30)
        return
    parsed = kserve.parse_body(body, 1 << 30)["instances"]
    if isinstance(parsed, np.ndarray):
        np.testing.assert_array_equal(parsed, np.asarray(expected, np.float32))
    else:
        assert parsed == expected
