"""Remote models: packages whose manifest names a predictor instead of a file, explained
against KServe's own ModelServer (0.21, in its own environment) serving the same ONNX file
over V1 REST, V2 REST and V2 gRPC. A remote DE-CAM, RISE or occlusion equals the local
one."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from saliency_service.core.errors import DeadlineExceeded
from saliency_service.core.repository import MANIFEST, ModelHandle
from saliency_service.core.request import CostCounter, RequestState
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import RunningServer, make_config
from tests.kserve_env import kserve_python
from tests.onnx_models import small_cnn, write_package
from tests.production_support import scrape, value

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "tests" / "kserve_onnx_server.py"
SIZE = 32
SLOW_SENTINEL = 1234.5  # tests/kserve_onnx_server.py answers such a batch after 20 s
# Package name → how its manifest calls the predictor.
PROTOCOLS = {"kserve-v1": {"protocol": "kserve-v1"}, "v2-rest": {"protocol": "v2-rest"},
             "v2-rest-binary": {"protocol": "v2-rest", "binary_data": True},
             "v2-grpc": {"protocol": "v2-grpc"}}


def endpoint(protocol: dict, urls: dict[str, str]) -> str:
    """The predictor's address for ``protocol``: its REST URL, or its gRPC host:port."""
    return urls["grpc"] if protocol["protocol"] == "v2-grpc" else urls["http"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_predictor(model: Path, name: str,
                    *extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """KServe's ModelServer serving ``model`` on loopback ports (REST and gRPC), once it
    answers; its addresses by ``http`` and ``grpc``."""
    port, grpc_port = free_port(), free_port()
    log = model.with_name(f"kserve-{port}.log")
    with log.open("w") as output:  # a file, not a pipe: KServe logs every call
        process = subprocess.Popen([str(kserve_python()), str(SERVER_SCRIPT), str(model), name,
                                    str(port), "--grpc-port", str(grpc_port), *extra],
                                   stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"KServe's ModelServer exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v2/models/{name}/ready", timeout=1).status_code == 200:
                return process, {"http": url, "grpc": f"127.0.0.1:{grpc_port}"}
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("KServe's ModelServer did not answer within 60 s")


def write_remote(local: Path, root: Path, name: str, remote: dict) -> Path:
    """A package of the local one's manifest without its file, naming ``remote``."""
    manifest = json.loads((local / MANIFEST).read_text())
    manifest.update(name=name, files={}, remote=remote)
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("predictor")
    model = small_cnn(classes=3, size=SIZE)
    local = write_package(model, folder, "plain")
    steady, steady_urls = start_predictor(local / "model.onnx", "plain")
    flaky, flaky_urls = start_predictor(local / "model.onnx", "plain", "--fail-first", "2")
    yield {"local": str(local), "steady": steady_urls, "flaky": flaky_urls}
    for process in (steady, flaky):
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Stops a predictor (killed when its grace period would keep a slow call)."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def server(predictors: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("remote_models")
    model = small_cnn(classes=3, size=SIZE)
    local = write_package(model, root, "local")
    for name, protocol in PROTOCOLS.items():
        write_remote(local, root, name, {**protocol, "model": "plain", "max_batch": 16,
                                         "url": endpoint(protocol, predictors["steady"])})
    write_remote(local, root, "flaky", {"protocol": "v2-rest", "model": "plain",
                                        "url": predictors["flaky"]["http"], "retries": 3})
    write_remote(local, root, "flaky-grpc", {"protocol": "v2-grpc", "model": "plain",
                                             "url": predictors["flaky"]["grpc"],
                                             "retries": 3})
    write_remote(local, root, "down", {"protocol": "v2-rest",
                                       "url": f"127.0.0.1:{free_port()}", "model": "plain"})
    running = RunningServer(make_config(root, max_inflight=2, max_queue=8)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def inputs(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)


METHODS = {
    "decam": dict(method=pb.METHOD_DECAM, decam=pb.DecamParams(grid=4, population=8,
                                                                generations=3)),
    "rise": dict(method=pb.METHOD_RISE, rise=pb.RiseParams(masks=64, cells=4)),
    "occlusion": dict(method=pb.METHOD_OCCLUSION,
                      occlusion=pb.OcclusionParams(window=8, stride=4)),
}


def explain(stub: pb_grpc.ExplainerStub, model: str, method: str,
            batch: np.ndarray, timeout: float = 120) -> pb.ExplainResponse:
    request = pb.ExplainRequest(model=model, input=pb.Input(tensor=array_to_tensor(batch)),
                                seed=7, **METHODS[method])
    return stub.Explain(request, timeout=timeout)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_remote_map_equals_local_map(stub: pb_grpc.ExplainerStub, protocol: str,
                                     method: str) -> None:
    batch = inputs()
    local = explain(stub, "local", method, batch)
    remote = explain(stub, protocol, method, batch)
    assert remote.cost.forward_passes == local.cost.forward_passes
    difference = np.abs(tensor_to_array(remote.saliency) - tensor_to_array(local.saliency))
    assert difference.max() <= 1e-5
    assert list(remote.targets) == list(local.targets)
    assert list(remote.predictions) == list(local.predictions)


@pytest.mark.parametrize("model", ["flaky", "flaky-grpc"])
def test_predictor_that_starts_unavailable_is_retried(stub: pb_grpc.ExplainerStub,
                                                      model: str) -> None:
    batch = inputs(1)
    assert explain(stub, model, "occlusion", batch).saliency.shape


def test_gradient_methods_are_not_offered_with_the_reason(
        stub: pb_grpc.ExplainerStub) -> None:
    model = stub.GetModel(pb.GetModelRequest(model="v2-rest"), timeout=10)
    assert {m.name for m in model.methods} == {"decam", "rise", "occlusion"}
    assert model.metadata["remote.protocol"] == "v2-rest"
    assert model.metadata["remote.model"] == "plain"
    reasons = {m.name: m.reason for m in model.unavailable_methods}
    assert "served remotely by a v2-rest predictor" in reasons["gradcam"]
    assert "feature maps" in reasons["smoe_scale"]
    request = pb.ExplainRequest(model="v2-rest", method=pb.METHOD_VANILLA_GRADIENT,
                                input=pb.Input(tensor=array_to_tensor(inputs(1))))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "served remotely" in caught.value.details()
    assert "gradients" in caught.value.details()


def test_predictor_down_means_not_ready_with_the_reason(
        stub: pb_grpc.ExplainerStub) -> None:
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert listed["v2-rest"].ready
    assert not listed["down"].ready
    request = pb.ExplainRequest(model="down", method=pb.METHOD_OCCLUSION,
                                input=pb.Input(tensor=array_to_tensor(inputs(1))))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "does not answer" in caught.value.details()
    assert "v2-rest predictor 'plain'" in caught.value.details()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deadline_shorter_than_the_predictor_is_deadline_exceeded(
        stub: pb_grpc.ExplainerStub, protocol: str) -> None:
    batch = inputs(1)
    batch[0, 0, 0, 0] = SLOW_SENTINEL
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        explain(stub, protocol, "occlusion", batch, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 15  # not the predictor's 20 s


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_remote_calls_and_bytes_are_counted_and_deadline_propagated(
        predictors: dict[str, Any], tmp_path: Path, protocol: str) -> None:
    folder = write_remote(Path(predictors["local"]), tmp_path, "remote",
                          {**PROTOCOLS[protocol], "model": "plain", "max_batch": 4,
                           "concurrency": 2,
                           "url": endpoint(PROTOCOLS[protocol], predictors["steady"])})
    handle = ModelHandle("remote", 1, folder)
    handle.load()
    assert handle.ready, handle.error
    cost = CostCounter()
    (scores,) = handle.run(inputs(10), state=RequestState(), count_remote=cost.remote)
    assert scores.shape == (10, 3)
    assert cost.remote_calls == 3  # 4 + 4 + 2
    raw_bytes = 10 * 3 * SIZE * SIZE * 4
    assert cost.remote_bytes >= raw_bytes  # JSON is wider than float32
    if protocol in ("v2-rest-binary", "v2-grpc"):  # raw bytes beside a short header
        assert cost.remote_bytes < raw_bytes + 3 * 1024
    slow = inputs(1)
    slow[0, 0, 0, 0] = SLOW_SENTINEL
    with pytest.raises(DeadlineExceeded):
        handle.run(slow, state=RequestState(time.monotonic() + 0.5))
    handle.remote.close()


def test_remote_calls_and_bytes_reach_the_metrics(server: RunningServer,
                                                  stub: pb_grpc.ExplainerStub) -> None:
    before = scrape(server.server.metrics_port)
    explain(stub, "v2-rest-binary", "occlusion", inputs(1))
    after = scrape(server.server.metrics_port)
    labels = {"model": "v2-rest-binary", "method": "occlusion"}
    calls = (value(after, "saliency_remote_calls_total", **labels)
             - value(before, "saliency_remote_calls_total", **labels))
    sent = (value(after, "saliency_remote_bytes_total", **labels)
            - value(before, "saliency_remote_bytes_total", **labels))
    assert calls >= 2  # the prediction and at least one chunk of occluded copies
    assert sent >= calls * 3 * SIZE * SIZE * 4


@pytest.fixture(scope="module")
def binary_predictor(predictors: dict[str, Any]) -> Iterator[dict[str, str]]:
    """The same ModelServer, listing binary_tensor_data in GET /v2 as Triton does."""
    process, urls = start_predictor(Path(predictors["local"]) / "model.onnx", "plain",
                                    "--extensions", "model_repository,binary_tensor_data")
    yield urls
    stop(process)


@pytest.mark.parametrize(("lists", "binary_data", "sent_binary"), [
    (True, None, True), (False, None, False), (True, False, False), (False, True, True)])
def test_binary_tensors_when_the_predictor_lists_the_extension(
        predictors: dict[str, Any], binary_predictor: dict[str, str], tmp_path: Path,
        lists: bool, binary_data: bool | None, sent_binary: bool) -> None:
    remote = {"protocol": "v2-rest", "model": "plain", "max_batch": 4,
              "url": (binary_predictor if lists else predictors["steady"])["http"]}
    if binary_data is not None:
        remote["binary_data"] = binary_data
    handle = ModelHandle("remote", 1, write_remote(Path(predictors["local"]), tmp_path,
                                                   "remote", remote))
    handle.load()
    local = ModelHandle("plain", 1, Path(predictors["local"]))
    local.load()
    assert handle.ready, handle.error
    assert handle.remote.describe()["remote.binary_data"] == str(sent_binary).lower()
    cost = CostCounter()
    batch = inputs(10)
    (scores,) = handle.run(batch, state=RequestState(), count_remote=cost.remote)
    (expected,) = local.run(batch)
    assert np.abs(scores - expected).max() <= 1e-5
    raw_bytes = 10 * 3 * SIZE * SIZE * 4
    if sent_binary:  # raw bytes beside a short header, three calls
        assert raw_bytes <= cost.remote_bytes < raw_bytes + 3 * 1024
    else:  # JSON numbers: 15 characters for a float32's 4 bytes
        assert cost.remote_bytes > 3 * raw_bytes
    handle.remote.close()
