"""A request's ``Cost`` counts the calls to a remote model's predictor and the bytes they
moved, over gRPC and in the HTTP APIs' JSON, as the metrics count them; a model served here
has none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format

from saliency_service.core.repository import MANIFEST
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import RunningServer, make_config
from tests.onnx_models import small_cnn, write_package
from tests.production_support import scrape, value
from tests.test_remote_models import start_predictor, stop, write_remote

SIZE = 32
MAX_BATCH = 16
FIXED_BATCH = 3
IMAGE_BYTES = 3 * SIZE * SIZE * 4  # one float32 input, as raw bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("remote_cost")
    local = write_package(small_cnn(classes=3, size=SIZE), root, "local")
    predictor, urls = start_predictor(local / "model.onnx", "plain")
    write_remote(local, root, "remote", {"protocol": "v2-grpc", "model": "plain",
                                         "url": urls["grpc"], "max_batch": MAX_BATCH})
    # A model whose activations would leave room for one input per chunk here, were it run
    # here: they live at the predictor, so its calls still carry max_batch inputs each.
    heavy = write_remote(local, root, "heavy", {"protocol": "v2-grpc", "model": "plain",
                                                "url": urls["grpc"], "max_batch": MAX_BATCH,
                                                "concurrency": 2})
    manifest = json.loads((heavy / MANIFEST).read_text())
    (heavy / MANIFEST).write_text(json.dumps({**manifest, "activation_bytes": 1 << 40}))
    # A model whose graph fixes the batch size: its calls carry exactly that many inputs.
    fixed = write_remote(local, root, "fixed", {"protocol": "v2-grpc", "model": "plain",
                                                "url": urls["grpc"], "max_batch": MAX_BATCH,
                                                "concurrency": 2})
    manifest = json.loads((fixed / MANIFEST).read_text())
    manifest["input"]["shape"] = [FIXED_BATCH, *manifest["input"]["shape"][1:]]
    (fixed / MANIFEST).write_text(json.dumps(manifest))
    running = RunningServer(make_config(root, http_port=0)).start()
    yield running
    running.stop()
    stop(predictor)


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def request(model: str) -> pb.ExplainRequest:
    batch = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    return pb.ExplainRequest(model=model, input=pb.Input(tensor=array_to_tensor(batch)),
                             method=pb.METHOD_OCCLUSION, seed=1,
                             occlusion=pb.OcclusionParams(window=8, stride=4))


def counted(server: RunningServer) -> tuple[float, float]:
    """The metrics' remote calls and bytes for the remote model's occlusion so far."""
    samples = scrape(server.server.metrics_port)
    labels = {"model": "remote", "method": "occlusion"}
    return (value(samples, "saliency_remote_calls_total", **labels),
            value(samples, "saliency_remote_bytes_total", **labels))


def check(cost: dict[str, Any] | pb.Cost, before: tuple[float, float],
          after: tuple[float, float]) -> None:
    """The cost's remote counts equal what the metrics counted for the request, and cover
    every image sent (each call takes at most MAX_BATCH)."""
    if isinstance(cost, pb.Cost):
        cost = json_format.MessageToDict(cost, preserving_proto_field_name=True)
    calls, sent = int(cost["remote_calls"]), int(cost["remote_bytes"])
    assert (calls, sent) == (after[0] - before[0], after[1] - before[1])
    passes = int(cost["forward_passes"])
    assert calls >= -(-passes // MAX_BATCH) >= 2
    assert sent >= passes * IMAGE_BYTES


def test_grpc_explain_and_predict_count_remote_calls(server: RunningServer,
                                                     stub: pb_grpc.ExplainerStub) -> None:
    before = counted(server)
    answer = stub.Explain(request("remote"), timeout=120)
    check(answer.cost, before, counted(server))
    predicted = stub.Predict(pb.PredictRequest(model="remote", input=request("remote").input),
                             timeout=60)
    assert predicted.cost.remote_calls == 1
    assert predicted.cost.remote_bytes >= IMAGE_BYTES
    local = stub.Explain(request("local"), timeout=120)
    assert (local.cost.remote_calls, local.cost.remote_bytes) == (0, 0)


def test_http_json_shows_remote_calls(server: RunningServer) -> None:
    url = f"http://127.0.0.1:{server.server.http_port}"
    before = counted(server)
    answer = httpx.post(f"{url}/api/v1/explain", timeout=120,
                        json=json_format.MessageToDict(request("remote")))
    assert answer.status_code == 200, answer.text
    middle = counted(server)
    check(answer.json()["cost"], before, middle)
    batch = np.frombuffer(request("remote").input.tensor.data, "<f4").reshape(1, 3, SIZE, SIZE)
    kserve = httpx.post(f"{url}/v1/models/remote:explain", timeout=120, json={
        "instances": batch.tolist(), "method": "occlusion", "seed": 1,
        "parameters": {"window": 8, "stride": 4}})
    assert kserve.status_code == 200, kserve.text
    check(kserve.json()["cost"], middle, counted(server))
    local = httpx.post(f"{url}/api/v1/explain", timeout=120,
                       json=json_format.MessageToDict(request("local"))).json()
    assert (local["cost"]["remote_calls"], local["cost"]["remote_bytes"]) == (0, 0)


def rise_cost(stub: pb_grpc.ExplainerStub, model: str, masks: int) -> pb.Cost:
    """The cost of RISE with ``masks`` masks on ``model``, whose passes are the masks and
    the prediction."""
    answer = stub.Explain(pb.ExplainRequest(
        model=model, input=request(model).input, method=pb.METHOD_RISE, seed=1,
        rise=pb.RiseParams(masks=masks)), timeout=120)
    assert answer.cost.forward_passes == masks + 1
    return answer.cost


def test_a_remote_models_calls_carry_max_batch_inputs_whatever_its_activations(
        stub: pb_grpc.ExplainerStub) -> None:
    """Chunks of a remote model are sized by its calls (max_batch × concurrency), not by
    activations held elsewhere: 64 RISE masks go out as 4 calls of 16, plus the prediction."""
    masks = 4 * MAX_BATCH
    cost = rise_cost(stub, "heavy", masks)
    assert cost.remote_calls == masks // MAX_BATCH + 1
    assert cost.remote_bytes >= (masks + 1) * IMAGE_BYTES


def test_a_fixed_batch_remote_models_calls_are_all_full(stub: pb_grpc.ExplainerStub) -> None:
    """Chunks of a model with a fixed batch size k are whole rounds of k-input calls: 36 RISE
    masks go out as 12 calls of 3 (none padded), plus the prediction's one padded call."""
    masks = 12 * FIXED_BATCH
    assert rise_cost(stub, "fixed", masks).remote_calls == masks // FIXED_BATCH + 1


def test_the_fields_keep_their_numbers() -> None:
    """Clients built from an older explainer.proto read the new fields as unknown ones."""
    fields = pb.Cost.DESCRIPTOR.fields_by_name
    assert (fields["remote_calls"].number, fields["remote_bytes"].number) == (7, 8)
    assert Path(pb.__file__).with_suffix(".pyi").read_text().count("remote_calls") >= 2
