"""Start-up and shutdown edges: a model whose run never ends, calls while the repository
loads, one readiness for both transports, calls racing a drain, and a port already taken."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2

import saliency_service.serving.server as server_module
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.background import RunningServer
from saliency_service.serving.server import SaliencyServer
from tests.conftest import TINY_SHAPE, make_config
from tests.hostile_models import LOOP_SIZE, never_ending_model, write_never_ending_package
from tests.onnx_models import small_cnn, write_package
from tests.production_support import readiness
from tests.test_production_shutdown import ServeProcess, saliency_command

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def looping_repository(repository: Path, tmp_path: Path) -> Path:
    """``tiny`` and ``loop``, a model whose every run is a Loop of 2**63 - 1 trips."""
    root = tmp_path / "models"
    shutil.copytree(repository / "tiny", root / "tiny")
    write_never_ending_package(root)
    return root


def tensor_predict(model: str, size: int = TINY_SHAPE[1]) -> pb.PredictRequest:
    inputs = np.zeros((1, 3, size, size), np.float32)
    return pb.PredictRequest(model=model, input=pb.Input(tensor=array_to_tensor(inputs)))


def http_status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def grpc_error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call(*args, timeout=30)  # type: ignore[operator]
    return refused.value


def test_a_warm_up_that_never_ends_is_bounded_and_the_rest_serves(tmp_path: Path) -> None:
    """The never-ending model's run is stopped at --warmup-timeout-seconds: that model is not
    ready with the reason, a small ONNX model beside it (a 24×24 CNN whose runs take
    milliseconds, however long its whole warm-up) serves, and both readinesses say SERVING."""
    root = tmp_path / "models"
    write_never_ending_package(root)
    write_package(small_cnn(), root, "small")
    config = make_config(root, warmup_timeout_seconds=3.0, http_port=0, log_level="WARNING")
    with RunningServer(config) as running, grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        statuses = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        assert statuses["small"].ready, statuses["small"].error
        assert not statuses["loop"].ready
        assert "did not finish within 3 s (--warmup-timeout-seconds)" in statuses["loop"].error
        refused = grpc_error(stub.Predict, tensor_predict("loop", LOOP_SIZE))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert "--warmup-timeout-seconds" in refused.details()
        assert stub.Predict(tensor_predict("small", 24), timeout=30).predictions[0].top
        assert readiness(channel) == SERVING
        assert http_status(running.server.http_port, "/readyz")[0] == 200


def test_calls_during_the_warm_up_are_unavailable_and_sigterm_still_drains(
        looping_repository: Path) -> None:
    """While the never-ending model warms up (the default bound is far off): a call for a
    model the scan found is UNAVAILABLE on both transports, an unknown one NOT_FOUND naming
    the models found, /readyz and gRPC health both say not ready; SIGTERM then stops the
    warm-up and the process exits 0 promptly, through the drain."""
    server = ListeningProcess(looping_repository, "--http-port", "0")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            scanned = time.monotonic() + 60
            while "models are loading" in grpc_error(stub.Predict, tensor_predict("tiny")
                                                     ).details():
                assert time.monotonic() < scanned, "the repository was never scanned"
                time.sleep(0.05)
            for model in ("tiny", "loop"):
                refused = grpc_error(stub.Predict, tensor_predict(model))
                assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
                assert "warming up" in refused.details()
                status, body = http_status(server.http_port, f"/api/v1/models/{model}")
                assert status == 503 and "warming up" in body
            refused = grpc_error(stub.Predict, tensor_predict("nosuch"))
            assert refused.code() == grpc.StatusCode.NOT_FOUND
            assert "'loop', 'tiny'" in refused.details()
            assert http_status(server.http_port, "/api/v1/models/nosuch")[0] == 404
            assert readiness(channel) == NOT_SERVING
            assert http_status(server.http_port, "/readyz")[0] == 503
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        exited = time.monotonic() - signalled
        events = [entry.get("event") for entry in server.rest_of_log()]
        print(f"\nSIGTERM during a warm-up that never ends: exit 0 after {exited:.2f} s")
        assert "draining" in events and "stopped" in events
    finally:
        server.kill()


class ListeningProcess(ServeProcess):
    """``saliency serve`` followed until its ports are bound (models still loading)."""

    def __init__(self, models: Path, *flags: str) -> None:
        self._until = "listening"
        super().__init__(models, *flags)

    def wait_for_event(self, event: str, timeout: float = 30.0) -> dict:
        if event == "serving" and getattr(self, "_until", None) == "listening":
            self._until = ""
            entry = super().wait_for_event("listening", timeout)
            self.http_port = int(re.search(r"HTTP on :(-?\d+)", entry["message"]).group(1))
            return entry
        return super().wait_for_event(event, timeout)


def test_import_of_a_model_that_never_ends_fails_after_its_timeout(tmp_path: Path) -> None:
    source = tmp_path / "loop.onnx"
    onnx.save(never_ending_model(), str(source))
    result = subprocess.run(
        [*saliency_command(), "import", str(source), "--name", "loop", "--models",
         str(tmp_path / "models"), "--timeout", "1"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "within 1 s (--timeout)" in lines[0]
    assert not (tmp_path / "models" / "loop").exists()


@pytest.fixture
def bound_only(repository: Path) -> Iterator[tuple[SaliencyServer, str]]:
    """A server whose ports are bound but whose repository has not been scanned yet."""
    server = SaliencyServer(make_config(repository, log_level="WARNING"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.listen(), loop).result(60)
    try:
        yield server, f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_before_the_scan_every_model_call_is_unavailable(
        bound_only: tuple[SaliencyServer, str]) -> None:
    _, address = bound_only
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for model in ("tiny", "nosuch"):
            refused = grpc_error(stub.Predict, tensor_predict(model))
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "models are loading" in refused.details()
        assert readiness(channel) == NOT_SERVING


def test_calls_racing_the_drain_are_unavailable_never_cancelled(
        repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Predict calls every half millisecond while the server drains: each is answered (OK
    while the notice lasts, UNAVAILABLE after); none is cancelled by gRPC for arriving after
    its GOAWAY. The pause that ends the notice is 2 s here, not 0.1 s: this client shares the
    in-process server's interpreter, and on a loaded machine its own stalls would look like
    a pause between calls."""
    monkeypatch.setattr(server_module, "QUIET_SECONDS", 2.0)
    running = RunningServer(make_config(repository, grace_seconds=10.0,
                                        drain_notice_seconds=10.0, inline_below_ms=0,
                                        max_queue=1000,
                                        log_level="WARNING")).start()
    codes: collections.Counter[str] = collections.Counter()
    details: dict[str, str] = {}
    futures = []
    stopped = threading.Event()
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        request = tensor_predict("tiny")
        stub.Predict(request, timeout=30)

        def answered(future: grpc.Future) -> None:
            error = future.exception()
            code = "OK" if error is None else error.code().name
            codes[code] += 1
            if error is not None:
                details[code] = error.details()

        def fire(count: int) -> None:
            for index in range(count):
                future = stub.Predict.future(request, timeout=60)
                future.add_done_callback(answered)
                futures.append(future)
                if index == count // 3:
                    threading.Thread(target=lambda: (running.stop(grace=10.0),
                                                     stopped.set())).start()
                time.sleep(0.0005)

        fire(400)
        for future in futures:
            future.exception(timeout=60)
        assert stopped.wait(60)
    print(f"\ncalls racing a drain: {dict(codes)}")
    assert set(codes) <= {"OK", "UNAVAILABLE"}, details
    assert sum(codes.values()) == 400
    assert all("shutting down" in text or "failed to connect" in text
               for code, text in details.items() if code == "UNAVAILABLE")


def listening_socket() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("busy", ["--port", "--metrics-port", "--http-port"])
def test_a_busy_port_is_refused_in_one_line(busy: str, repository: Path,
                                            tmp_path: Path) -> None:
    """A second server on a taken port exits non-zero with one line naming the port and its
    flag; for gRPC, even when the first server is a gRPC server (no shared SO_REUSEPORT)."""
    first = None
    sock = None
    if busy == "--port":
        first = RunningServer(make_config(tmp_path / "empty", log_level="WARNING")).start()
        port = first.server.port
    else:
        sock, port = listening_socket()
    flags = {"--port": "0", "--metrics-port": "-1", "--http-port": "-1", busy: str(port)}
    try:
        result = subprocess.run(
            [*saliency_command(), "serve", "--models", str(tmp_path / "empty"),
             "--log-format", "json", *(item for pair in flags.items() for item in pair)],
            capture_output=True, text=True, timeout=120)
    finally:
        if first is not None:
            first.stop()
        if sock is not None:
            sock.close()
    assert result.returncode != 0
    plain = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, result.stderr
    assert f":{port}" in plain[0] and busy in plain[0]
    assert "Traceback" not in result.stderr
    assert not [line for line in result.stderr.splitlines()
                if line.startswith("{") and json.loads(line).get("level") == "ERROR"]
