"""Remote models against KServe's own ModelServer: a model whose predictor starts after the
server turns ready once the predictor answers (and not before), and a predictor whose
model takes a fixed batch size gets exactly that many inputs per call, the last call padded,
with maps equal to the local ones."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saliency_service.core.repository import MANIFEST
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.server import SERVICE_NAME
from tests.conftest import RunningServer, make_config
from tests.kserve_env import kserve_python
from tests.onnx_models import small_cnn, write_package
from tests.test_remote_models import SERVER_SCRIPT, free_port, start_predictor, stop, write_remote

SIZE = 32
FIXED = 4


def fixed_batch(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """The model with its batch dimension fixed to ``size``: ONNX Runtime refuses any other."""
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = size
    onnx.checker.check_model(model)
    return model


def set_batch(folder: Path, size: int) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["input"]["shape"][0] = size
    (folder / MANIFEST).write_text(json.dumps(manifest))


def explain(stub: pb_grpc.ExplainerStub, model: str, batch: np.ndarray) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(
        model=model, input=pb.Input(tensor=array_to_tensor(batch)), seed=3,
        method=pb.METHOD_OCCLUSION, occlusion=pb.OcclusionParams(window=8, stride=4)),
        timeout=120)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.ExplainerStub]:
    """A server with a fixed-batch package served here and the same file served by KServe."""
    root = tmp_path_factory.mktemp("fixed_batch")
    local = write_package(fixed_batch(small_cnn(classes=3, size=SIZE), FIXED), root, "local")
    set_batch(local, FIXED)
    predictor, urls = start_predictor(local / "model.onnx", "plain")
    for protocol in ("v2-rest", "v2-grpc"):
        url = urls["grpc" if protocol == "v2-grpc" else "http"]
        write_remote(local, root, protocol, {"protocol": protocol, "model": "plain", "url": url,
                                             "max_batch": 16})
    running = RunningServer(make_config(root)).start()
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.ExplainerStub(channel)
    running.stop()
    stop(predictor)


@pytest.mark.parametrize("protocol", ["v2-rest", "v2-grpc"])
@pytest.mark.parametrize("images", [1, 3])
def test_fixed_batch_predictor_gets_padded_calls(fixed: pb_grpc.ExplainerStub, protocol: str,
                                                 images: int) -> None:
    batch = np.random.default_rng(images).normal(size=(images, 3, SIZE, SIZE)).astype(
        np.float32)
    local = explain(fixed, "local", batch)
    remote = explain(fixed, protocol, batch)
    difference = np.abs(tensor_to_array(remote.saliency) - tensor_to_array(local.saliency))
    assert difference.max() <= 1e-5
    assert list(remote.targets) == list(local.targets)
    # Calls of exactly FIXED inputs (not max_batch = 16): at least passes / FIXED of them.
    assert remote.cost.remote_calls >= -(-remote.cost.forward_passes // FIXED)


def start_on(model: Path, name: str, port: int, grpc_port: int, log: Path) -> subprocess.Popen:
    """KServe's ModelServer on the given ports (not waited for)."""
    with log.open("w") as output:
        return subprocess.Popen([str(kserve_python()), str(SERVER_SCRIPT), str(model), name,
                                 str(port), "--grpc-port", str(grpc_port)],
                                stdout=output, stderr=output)


def test_model_turns_ready_once_its_predictor_answers(tmp_path: Path) -> None:
    root = tmp_path / "models"
    local = write_package(small_cnn(classes=3, size=SIZE), tmp_path / "files", "plain")
    port, grpc_port = free_port(), free_port()
    write_remote(local, root, "later", {"protocol": "v2-rest", "model": "plain",
                                        "url": f"127.0.0.1:{port}"})
    running = RunningServer(make_config(root)).start()
    predictor = None
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            (status,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            assert not status.ready and "does not answer" in status.error
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(check, timeout=10).status == (
                health_pb2.HealthCheckResponse.NOT_SERVING)
            predictor = start_on(local / "model.onnx", "plain", port, grpc_port,
                                 tmp_path / "predictor.log")
            deadline = time.monotonic() + 180
            serving = health_pb2.HealthCheckResponse.SERVING
            while health.Check(check, timeout=10).status != serving:
                assert predictor.poll() is None, (tmp_path / "predictor.log").read_text()
                assert time.monotonic() < deadline, "the model never turned ready"
                time.sleep(0.5)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].ready
            # Ready only once the predictor answers its own readiness.
            assert httpx.get(f"http://127.0.0.1:{port}/v2/models/plain/ready",
                             timeout=10).status_code == 200
            batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
            assert explain(stub, "later", batch).cost.remote_calls >= 2
    finally:
        running.stop()
        if predictor is not None:
            stop(predictor)
