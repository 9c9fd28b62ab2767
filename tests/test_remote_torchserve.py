"""Remote models over TorchServe 0.12's predictions API: a real TorchServe serving the same
ONNX file as a local package through ``deploy/torchserve/scores_handler.py`` (batching up to
4 requests), explained over JSON numbers and base64 tensors. A remote DE-CAM, RISE or
occlusion equals the local one; readiness, 503 retries, counting and the deadline hold."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from benchmarks.common import TorchServeProcess, torchserve_missing
from saliency_service.core.errors import DeadlineExceeded, Unavailable
from saliency_service.core.remote import InvalidRemote, RemoteSpec
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import CostCounter, RequestState
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import RunningServer, make_config
from tests.onnx_models import small_cnn, write_package
from tests.test_remote_models import METHODS, SIZE, explain, inputs, write_remote
from tests.torchserve_scores_entry import FLAKY_SENTINEL, SLOW_SECONDS, SLOW_SENTINEL

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "deploy" / "torchserve" / "scores_handler.py"
ENTRY = ROOT / "tests" / "torchserve_scores_entry.py"
# Package name → how its manifest calls TorchServe (JSON numbers, or base64 float32 with
# readiness from the management API).
VARIANTS = {"ts-json": {}, "ts-base64": {"binary_data": True, "management": True}}


def archive_scores_model(onnx_file: Path, name: str, store: Path, batch_size: int = 4,
                         workers: int = 1, entry: Path = ENTRY) -> Path:
    """A ``.mar`` serving ``onnx_file`` through the scores handler with ``workers``
    workers, TorchServe batching up to ``batch_size`` requests (``maxBatchDelay`` 5 ms)."""
    store.mkdir(parents=True, exist_ok=True)
    config = store / f"{name}-config.yaml"
    config.write_text(f"minWorkers: {workers}\nmaxWorkers: {workers}\n"
                      f"batchSize: {batch_size}\n"
                      "maxBatchDelay: 5\nresponseTimeout: 120\n")
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    extra = ["--extra-files", str(HANDLER)] if entry != HANDLER else []
    subprocess.run([str(archiver), "--model-name", name, "--version", "1.0",
                    "--serialized-file", str(onnx_file), "--handler", str(entry), *extra,
                    "--config-file", str(config), "--export-path", str(store), "--force"],
                   check=True, capture_output=True)
    return store / f"{name}.mar"


def remote_of(process: TorchServeProcess, variant: dict[str, Any], model: str = "plain",
              **extra: Any) -> dict[str, Any]:
    """A manifest's ``remote`` object calling ``model`` on ``process``."""
    remote: dict[str, Any] = {"protocol": "torchserve", "url": process.inference_url,
                              "model": model, "max_batch": 16, **extra}
    if variant.get("binary_data"):
        remote["binary_data"] = True
    if variant.get("management"):
        remote["management_url"] = process.management_url
    return remote


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package whose ONNX file TorchServe serves."""
    folder = tmp_path_factory.mktemp("torchserve_source")
    return write_package(small_cnn(classes=3, size=SIZE), folder, "plain")


@pytest.fixture(scope="module")
def predictor(source: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    missing = torchserve_missing()
    if missing:
        pytest.skip(f"TorchServe cannot start here: {missing}")
    folder = tmp_path_factory.mktemp("torchserve_remote")
    archive_scores_model(source / "model.onnx", "plain", folder / "store")
    archive_scores_model(source / "model.onnx", "cold", folder / "store", workers=0)
    # The model API (off by default since 0.11) registers the model without workers.
    with TorchServeProcess(folder / "store", "plain=plain.mar", folder / "ts",
                           env={"TS_ENABLE_MODEL_API": "true"}) as process:
        # A model without workers: TorchServe answers its predictions 503.
        registered = httpx.post(f"{process.management_url}/models",
                                params={"url": "cold.mar", "initial_workers": 0,
                                        "synchronous": "true"},
                                timeout=120)
        assert registered.status_code == 200, registered.text
        yield {"process": process, "local": source}


@pytest.fixture(scope="module")
def server(predictor: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("torchserve_models")
    local = write_package(small_cnn(classes=3, size=SIZE), root, "local")
    process = predictor["process"]
    for name, variant in VARIANTS.items():
        write_remote(local, root, name, remote_of(process, variant))
    write_remote(local, root, "cold-managed", remote_of(process, VARIANTS["ts-base64"],
                                                        model="cold"))
    write_remote(local, root, "unknown", remote_of(process, {}, model="nosuch"))
    running = RunningServer(make_config(root, max_inflight=2, max_queue=8)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_remote_map_equals_local_map(stub: pb_grpc.ExplainerStub, variant: str,
                                     method: str) -> None:
    batch = inputs()
    local = explain(stub, "local", method, batch)
    remote = explain(stub, variant, method, batch)
    assert remote.cost.forward_passes == local.cost.forward_passes
    assert remote.cost.remote_calls >= 1 and local.cost.remote_calls == 0
    difference = np.abs(tensor_to_array(remote.saliency) - tensor_to_array(local.saliency))
    assert difference.max() <= 1e-5
    assert list(remote.targets) == list(local.targets)
    assert list(remote.predictions) == list(local.predictions)


def test_ready_models_and_reasons_of_the_others(stub: pb_grpc.ExplainerStub) -> None:
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert listed["ts-json"].ready and listed["ts-base64"].ready
    assert not listed["cold-managed"].ready
    assert not listed["unknown"].ready
    model = stub.GetModel(pb.GetModelRequest(model="ts-base64"), timeout=10)
    assert {m.name for m in model.methods} == {"decam", "rise", "occlusion"}
    assert model.metadata["remote.protocol"] == "torchserve"
    assert model.metadata["remote.platform"] == "torchserve"
    assert "1.0" in model.metadata["remote.versions"]
    for name, reason in (("cold-managed", "has no READY worker"),
                         ("unknown", "does not serve the model (OPTIONS /predictions/nosuch:"
                                     " HTTP 404")):
        request = pb.ExplainRequest(model=name, method=pb.METHOD_OCCLUSION,
                                    input=pb.Input(tensor=array_to_tensor(inputs(1))))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason in caught.value.details()
        assert "torchserve predictor" in caught.value.details()


def loaded(folder: Path) -> ModelHandle:
    handle = ModelHandle("remote", 1, folder)
    handle.load()
    assert handle.ready, handle.error
    return handle


@pytest.mark.parametrize("variant", VARIANTS)
def test_calls_and_bytes_are_counted(predictor: dict[str, Any], tmp_path: Path,
                                     variant: str) -> None:
    folder = write_remote(predictor["local"], tmp_path, "remote",
                          remote_of(predictor["process"], VARIANTS[variant], max_batch=4,
                                    concurrency=2))
    handle = loaded(folder)
    local = loaded(predictor["local"])
    cost = CostCounter()
    batch = inputs(10)
    (scores,) = handle.run(batch, state=RequestState(), count_remote=cost.remote)
    (expected,) = local.run(batch)
    assert scores.shape == (10, 3)
    assert np.abs(scores - expected).max() <= 1e-5
    assert cost.remote_calls == 3  # 4 + 4 + 2
    raw_bytes = 10 * 3 * SIZE * SIZE * 4
    if VARIANTS[variant].get("binary_data"):  # base64: 4/3 of the raw bytes, short JSON
        assert raw_bytes * 4 / 3 <= cost.remote_bytes < raw_bytes * 4 / 3 + 3 * 1024
    else:
        assert cost.remote_bytes > raw_bytes * 2  # JSON numbers are wide
    handle.remote.close()


def test_503_is_retried_then_unavailable(predictor: dict[str, Any], tmp_path: Path) -> None:
    process = predictor["process"]
    flaky = loaded(write_remote(predictor["local"], tmp_path, "flaky",
                                remote_of(process, {}, retries=3)))
    batch = inputs(1)
    batch[0, 0, 0, 0] = FLAKY_SENTINEL  # answered 503 twice, then served
    cost = CostCounter()
    (scores,) = flaky.run(batch, state=RequestState(), count_remote=cost.remote)
    assert scores.shape == (1, 3)
    assert cost.remote_calls == 3
    flaky.remote.close()
    # A model without workers: TorchServe answers 503 to every call; once the retries are
    # spent the run is Unavailable with TorchServe's own message.
    cold = ModelHandle("cold", 1, write_remote(predictor["local"], tmp_path, "cold",
                                               remote_of(process, {}, model="cold",
                                                         retries=1)))
    cold.load()  # ping and OPTIONS answer: TorchServe knows the model
    cost = CostCounter()
    with pytest.raises(Unavailable) as caught:
        cold.run(inputs(1), state=RequestState(), count_remote=cost.remote)
    assert "unavailable after 2 attempts" in str(caught.value)
    assert "HTTP 503" in str(caught.value) and "no worker" in str(caught.value)
    assert cost.remote_calls == 2
    cold.remote.close()


def test_malformed_request_is_400_with_the_reason(predictor: dict[str, Any]) -> None:
    url = f"{predictor['process'].inference_url}/predictions/plain"
    answer = httpx.post(url, json={"shape": [1, 3, SIZE, SIZE], "data": [0.0] * 5}, timeout=60)
    assert answer.status_code == 400
    assert "shape [1, 3, 32, 32] needs 3072" in answer.text


def test_manifest_fields_of_torchserve() -> None:
    spec = RemoteSpec.from_json({"protocol": "torchserve", "url": "ts:8080", "model": "m",
                                 "binary_data": True, "management_url": "ts:8081"})
    assert (spec.url, spec.management_url) == ("http://ts:8080", "http://ts:8081")
    with pytest.raises(InvalidRemote, match="management_url is TorchServe's"):
        RemoteSpec.from_json({"protocol": "v2-rest", "url": "h:1", "model": "m",
                              "management_url": "h:2"})


def test_deadline_shorter_than_the_predictor(stub: pb_grpc.ExplainerStub,
                                             predictor: dict[str, Any],
                                             tmp_path: Path) -> None:
    """Last: TorchServe's one worker is busy with the slow batch for a while after."""
    slow = inputs(1)
    slow[0, 0, 0, 0] = SLOW_SENTINEL
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        explain(stub, "ts-base64", "occlusion", slow, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < SLOW_SECONDS - 5
    handle = loaded(write_remote(predictor["local"], tmp_path, "slow",
                                 remote_of(predictor["process"], {})))
    with pytest.raises(DeadlineExceeded):
        handle.run(slow, state=RequestState(time.monotonic() + 0.5))
    handle.remote.close()


class Context:
    """What the scores handler reads of TorchServe's context, for in-process calls."""

    def __init__(self, model_dir: Path, serialized_file: str) -> None:
        self.system_properties = {"model_dir": str(model_dir)}
        self.manifest = {"model": {"serializedFile": serialized_file}}
        self.statuses: dict[int, int] = {}

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass


def scores_handler(context: Context) -> Any:
    """deploy/torchserve/scores_handler.py's handler, initialized in process."""
    sys.path.insert(0, str(HANDLER.parent))
    try:
        from scores_handler import TensorScoresHandler  # noqa: PLC0415
    finally:
        sys.path.remove(str(HANDLER.parent))
    handler = TensorScoresHandler()
    handler.initialize(context)
    return handler


def test_handler_answers_each_request_of_a_batch(source: Path) -> None:
    """In process: TorchServe's batch of three requests, one malformed, runs the model once
    for the two others and answers each in its own form."""
    context = Context(source, "model.onnx")
    handler = scores_handler(context)
    batch = inputs(3)
    rows = [{"body": {"shape": [2, 3, SIZE, SIZE], "data": batch[:2].reshape(-1).tolist()}},
            {"body": {"shape": [1], "data": []}},
            {"body": json.dumps({"shape": [1, 3, SIZE, SIZE],
                                 "data": base64.b64encode(batch[2:].tobytes()).decode()})}]
    first, bad, last = (json.loads(a) for a in handler.handle(rows, context))
    (expected,) = loaded(source).run(batch)
    np.testing.assert_allclose(np.asarray(first["data"]).reshape(2, 3), expected[:2],
                               atol=1e-6)
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(last["data"]), "<f4"),
                               expected[2], atol=1e-6)
    assert context.statuses == {1: 400} and "needs 1" in bad["error"]


def test_handler_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    """A TorchScript or pickled archive is never loaded: the handler names what it serves."""
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 not loaded")
    with pytest.raises(ValueError, match="ONNX files only"):
        scores_handler(Context(tmp_path, "model.pt"))
