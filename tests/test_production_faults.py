"""Faults: a failing program becomes INTERNAL with a request id; broken packages, and
packages whose warm-up fails, stay out of service while the rest serve; packages reload
without a restart."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.logging_setup import FIELDS, JsonFormatter
from tests.conftest import RunningServer, make_config
from tests.production_support import readiness, scrape, tiny_request, value


def copy_package(source: Path, target: Path, name: str) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["name"] = name
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def faulty(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """tiny (good), broken (corrupt ONNX), missing (no ONNX file) and mismatch: a package
    whose manifest promises 16×16 inputs to a network built for 32×32, so its warm-up
    fails."""
    root = tmp_path_factory.mktemp("faulty")
    for name in ("tiny", "broken"):
        shutil.copytree(repository / name, root / name)
    tiny = repository / "tiny" / "1"
    missing = copy_package(tiny, root / "missing" / "1", "missing")
    (missing / "model.onnx").unlink()
    mismatch = copy_package(tiny, root / "mismatch" / "1", "mismatch")
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["input"]["shape"] = [-1, 3, 16, 16]
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    running = RunningServer(make_config(root)).start()
    yield running
    running.stop()


def test_handler_exception_is_internal_with_a_logged_request_id(
    faulty: RunningServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in the server itself (simulated: the session raises mid-request, which no
    request can cause) is INTERNAL with a request id, logged with its traceback."""
    caplog.set_level(logging.INFO, logger="saliency_service.protocol.request_log")
    handle = faulty.server.repository.get("tiny")
    original = handle.run
    failing = {"on": False}

    def run(*args: object, **kwargs: object) -> object:
        if failing["on"]:
            raise RuntimeError("onnxruntime session failed (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(handle, "run", run)
    inputs = np.zeros((1, 3, 32, 32), np.float32)
    with grpc.insecure_channel(faulty.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for call, request in (
            (
                stub.Predict,
                pb.PredictRequest(model="tiny", input=pb.Input(tensor=array_to_tensor(inputs))),
            ),
            (
                stub.Explain,
                pb.ExplainRequest(
                    model="tiny",
                    method=pb.METHOD_OCCLUSION,
                    input=pb.Input(tensor=array_to_tensor(inputs)),
                ),
            ),
        ):
            failing["on"] = True
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=30)
            failing["on"] = False
            assert error.value.code() == grpc.StatusCode.INTERNAL
            trailing = dict(error.value.trailing_metadata())
            request_id = trailing["x-request-id"]
            assert f"request id {request_id}" in error.value.details()
            records = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
            failure = [r for r in records if r.levelno == logging.ERROR]
            assert len(failure) == 1 and failure[0].exc_info is not None
            line = json.loads(JsonFormatter().format(failure[0]))
            assert line["request_id"] == request_id and line["model"] == "tiny"
            assert line["code"] == "INTERNAL"
            assert "Traceback" in line["traceback"] and "simulated" in line["traceback"]
            # The summary line is written as the call ends, just after the status is sent.
            eventually(
                lambda rid=request_id: any(
                    getattr(r, "request_id", None) == rid and getattr(r, "event", None) == "request"
                    for r in caplog.records
                )
            )
            summary = [
                json.loads(JsonFormatter().format(r))
                for r in caplog.records
                if getattr(r, "request_id", None) == request_id
                and getattr(r, "event", None) == "request"
            ]
            assert summary[0]["code"] == "INTERNAL" and summary[0]["latency_ms"] > 0
        # The server keeps serving, and says so.
        reply = stub.Explain(tiny_request(pb.METHOD_VANILLA_GRADIENT), timeout=30)
        assert reply.cost.backward_passes == 1
        assert readiness(channel) == health_pb2.HealthCheckResponse.SERVING


def test_request_logs_are_json_without_payloads(
    faulty: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="saliency_service.protocol.request_log")
    request = tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=2)
    with grpc.insecure_channel(faulty.address) as channel:
        call = pb_grpc.ExplainerStub(channel).Explain.with_call(
            request, timeout=30, metadata=(("x-request-id", "trace-abc.123"),)
        )
    reply, _ = call
    assert reply.request_id == "trace-abc.123"
    eventually(
        lambda: any(getattr(r, "request_id", None) == "trace-abc.123" for r in caplog.records)
    )
    lines = [
        JsonFormatter().format(r)
        for r in caplog.records
        if getattr(r, "request_id", None) == "trace-abc.123"
    ]
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["model"] == "tiny" and entry["method"] == "vanilla_gradient"
    assert entry["code"] == "OK" and entry["latency_ms"] > 0 and entry["forward_passes"] == 4
    assert set(entry) <= {"ts", "level", "logger", "message", *FIELDS}
    assert len(lines[0]) < 600  # a summary, not the 24 KiB tensor


def test_corrupt_and_missing_packages_are_not_ready_while_others_serve(
    faulty: RunningServer,
) -> None:
    with grpc.insecure_channel(faulty.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert models["tiny"].ready
        assert not models["broken"].ready and "sha256" in models["broken"].error
        assert not models["missing"].ready and "missing" in models["missing"].error
        assert not models["mismatch"].ready
        assert models["mismatch"].error.startswith("warm-up failed: predict:")
        for name in ("broken", "missing", "mismatch"):
            request = tiny_request(pb.METHOD_VANILLA_GRADIENT)
            request.model = name
            with pytest.raises(grpc.RpcError) as error:
                stub.Explain(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not ready" in error.value.details()
        assert stub.Explain(tiny_request(pb.METHOD_OCCLUSION), timeout=30).cost.forward_passes
    samples = scrape(faulty.server.metrics_port)
    for name, ready in (("tiny", 1), ("mismatch", 0), ("broken", 0), ("missing", 0)):
        assert value(samples, "saliency_model_ready", model=name, version="1") == ready
        assert ("saliency_model_ready", frozenset({("model", name), ("version", "1")})) in samples


def test_repository_poll_reloads_without_restart(repository: Path, tmp_path: Path) -> None:
    """A package fixed on disk becomes ready, a new one appears, a removed one goes, and
    readiness and ``saliency_model_ready`` follow — all while the server keeps running."""
    tiny = repository / "tiny" / "1"
    late = copy_package(tiny, tmp_path / "late" / "1", "late")
    (late / "model.onnx").unlink()
    running = RunningServer(make_config(tmp_path, reload_interval_seconds=0.1)).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)

            def ready() -> int:
                return readiness(channel)

            def metric(name: str) -> float:
                return value(
                    scrape(running.server.metrics_port),
                    "saliency_model_ready",
                    model=name,
                    version="1",
                )

            assert ready() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert metric("late") == 0
            shutil.copy(tiny / "model.onnx", late / "model.onnx")
            eventually(lambda: ready() == health_pb2.HealthCheckResponse.SERVING)
            assert metric("late") == 1
            request = tiny_request(pb.METHOD_VANILLA_GRADIENT)
            request.model = "late"
            assert stub.Explain(request, timeout=30).model == "late"

            copy_package(tiny, tmp_path / "fresh" / "1", "fresh")
            eventually(lambda: metric("fresh") == 1)
            shutil.rmtree(tmp_path / "fresh")
            eventually(
                lambda: (
                    ("saliency_model_ready", frozenset({("model", "fresh"), ("version", "1")}))
                    not in scrape(running.server.metrics_port)
                )
            )

            with (late / "model.onnx").open("ab") as handle:
                handle.write(b"corrupted")
            eventually(lambda: ready() == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert metric("late") == 0
            assert (
                value(scrape(running.server.metrics_port), "saliency_repository_reloads_total") >= 4
            )
    finally:
        running.stop()


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
