"""End to end: a real server on a loopback port, called with a real gRPC client."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from saliency_service.core.repository import Repository
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.protocol.inputs import preprocess_pixels
from tests.conftest import TINY_LABELS, TINY_SHAPE
from tests.models import TinyCNN


def random_inputs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *TINY_SHAPE)).astype(np.float32)


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def explain_request(method: int, batch: int = 2, **fields: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(model="tiny", method=method,
                             input=pb.Input(tensor=array_to_tensor(random_inputs(batch))),
                             **fields)


def test_health_live_and_ready(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "saliency.v1.Explainer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "saliency.v1.Explainer" in services
    assert "grpc.health.v1.Health" in services


def test_list_models_reports_the_broken_package(stub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert models["tiny"].ready and models["tiny"].error == ""
    assert not models["broken"].ready
    assert "sha256" in models["broken"].error


def test_get_model_describes_inputs_classes_and_methods(stub) -> None:
    info = stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=10)
    assert list(info.input.shape) == [-1, *TINY_SHAPE]
    assert list(info.class_labels) == list(TINY_LABELS)
    assert list(info.scale_outputs) == ["scale_0", "scale_1", "scale_2"]
    assert info.cam_layer == "layer3"
    names = {m.name: m for m in info.methods}
    assert names["vanilla_gradient"].engine == "torch"
    assert names["occlusion"].engine == "onnxruntime"
    assert names["occlusion"].defaults["window"] == "16"


def test_predict_matches_onnxruntime_in_process(stub, repository) -> None:
    inputs = random_inputs(3)
    reply = stub.Predict(pb.PredictRequest(model="tiny", input=pb.Input(
        tensor=array_to_tensor(inputs)), top_k=2), timeout=10)
    session = ort.InferenceSession(str(repository / "tiny" / "1" / "model.onnx"))
    (expected,) = session.run(["logits"], {"input": inputs})
    np.testing.assert_allclose(tensor_to_array(reply.logits), expected, rtol=1e-6)
    assert [p.top[0].index for p in reply.predictions] == expected.argmax(1).tolist()
    assert len(reply.predictions[0].top) == 2
    assert reply.cost.forward_passes == 3


def test_predict_on_png_resizes_and_normalizes(stub, repository) -> None:
    data = png_bytes()
    reply = stub.Predict(pb.PredictRequest(model="tiny", input=pb.Input(
        images=pb.EncodedImages(images=[data]))), timeout=10)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32),
                                                                           Image.BILINEAR))
    repo = Repository(repository)
    repo.load_all()
    spec = repo.get("tiny").spec().input
    (expected,) = repo.get("tiny").run(preprocess_pixels(pixels[None], spec))
    np.testing.assert_allclose(tensor_to_array(reply.logits), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_vanilla_gradient_equals_autograd_on_the_source_module(stub, batch: int) -> None:
    request = explain_request(pb.METHOD_VANILLA_GRADIENT, batch=batch, return_raw=True)
    request.target.per_item.indices.extend([(i + 1) % 4 for i in range(batch)])
    reply = stub.Explain(request, timeout=30)
    inputs = torch.from_numpy(random_inputs(batch)).requires_grad_(True)
    logits = TinyCNN(len(TINY_LABELS))(inputs)
    targets = torch.tensor([(i + 1) % 4 for i in range(batch)])
    logits.gather(1, targets.view(-1, 1)).sum().backward()
    expected = inputs.grad.numpy()
    np.testing.assert_allclose(tensor_to_array(reply.raw), expected, rtol=1e-4, atol=1e-6)
    maps = tensor_to_array(reply.saliency)
    expected_maps = np.abs(expected).max(1)
    expected_maps /= expected_maps.reshape(batch, -1).max(1).reshape(-1, 1, 1)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-6)
    assert list(reply.targets) == targets.tolist()
    # One ONNX Runtime forward for the prediction, one torch forward + backward per image.
    assert reply.cost.forward_passes == 2 * batch
    assert reply.cost.backward_passes == batch
    assert reply.cost.method == pb.METHOD_VANILLA_GRADIENT
    assert reply.cost.wall_seconds > 0 and reply.cost.cpu_seconds >= 0


def reference_occlusion(inputs: np.ndarray, targets: np.ndarray, repository,
                        window: int, stride: int) -> np.ndarray:
    """A straightforward one-window-at-a-time occlusion, for comparison."""
    session = ort.InferenceSession(str(repository / "tiny" / "1" / "model.onnx"))

    def probability(x: np.ndarray, target: int) -> float:
        (logits,) = session.run(["logits"], {"input": x[None]})
        e = np.exp(logits[0] - logits[0].max())
        return float(e[target] / e.sum())

    black = (0.0 - 0.5) / 0.25
    _, _, height, width = inputs.shape
    starts = list(range(0, height - window + 1, stride))
    if starts[-1] + window < height:
        starts.append(height - window)
    out = np.zeros((inputs.shape[0], height, width))
    for n, (x, target) in enumerate(zip(inputs, targets, strict=True)):
        base = probability(x, int(target))
        total = np.zeros((height, width))
        count = np.zeros((height, width))
        for y0 in starts:
            for x0 in starts:
                occluded = x.copy()
                occluded[:, y0:y0 + window, x0:x0 + window] = black
                total[y0:y0 + window, x0:x0 + window] += base - probability(occluded, int(target))
                count[y0:y0 + window, x0:x0 + window] += 1
        out[n] = total / count
    return out


def test_occlusion_matches_a_straightforward_reference(stub, repository) -> None:
    request = explain_request(pb.METHOD_OCCLUSION, batch=2, return_raw=True)
    request.occlusion.window = 12
    request.occlusion.stride = 8
    reply = stub.Explain(request, timeout=30)
    inputs = random_inputs(2)
    expected = reference_occlusion(inputs, np.asarray(reply.targets), repository, 12, 8)
    np.testing.assert_allclose(tensor_to_array(reply.raw), expected, rtol=1e-4, atol=1e-6)
    windows = 4 * 4  # starts 0, 8, 16, 20 on each axis
    assert reply.cost.forward_passes == 2 + 2 * windows
    assert reply.cost.backward_passes == 0
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1


def test_overlay_png_is_returned(stub) -> None:
    reply = stub.Explain(explain_request(pb.METHOD_VANILLA_GRADIENT, batch=2,
                                         return_overlay=True), timeout=30)
    assert len(reply.overlays) == 2
    image = Image.open(io.BytesIO(reply.overlays[0]))
    assert image.format == "PNG" and image.size[0] == 256  # 32×32 enlarged to be legible


def test_stream_ends_with_the_result(stub) -> None:
    updates = list(stub.ExplainStream(explain_request(pb.METHOD_OCCLUSION), timeout=30))
    assert updates[-1].WhichOneof("update") == "result"
    assert tensor_to_array(updates[-1].result.saliency).shape == (2, 32, 32)


def test_auto_answers_with_an_available_method(stub) -> None:
    reply = stub.Explain(explain_request(pb.METHOD_AUTO), timeout=30)
    assert reply.cost.method not in (pb.METHOD_AUTO, pb.METHOD_UNSPECIFIED)


def test_metrics_endpoint_counts_requests(server, stub) -> None:
    stub.Explain(explain_request(pb.METHOD_VANILLA_GRADIENT, batch=1), timeout=30)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert ('saliency_requests_total{code="OK",method="vanilla_gradient",model="tiny"}'
            in text)
    assert "saliency_request_seconds_bucket" in text
    assert 'saliency_backward_passes_total{method="vanilla_gradient",model="tiny"}' in text


def test_sessions_stop_spinning_after_each_run(repository: Path) -> None:
    """A gradient method runs torch right after the prediction run; pool threads still
    spinning would take its cores."""
    repo = Repository(repository, intra_op_threads=2)
    repo.load_all()
    options = repo.get("tiny").session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 2
