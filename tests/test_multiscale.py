"""SMOE Scale, FastCAM and LOVI against straightforward references, in-process and over gRPC."""

from __future__ import annotations

import io
import math
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from scipy import stats
from torch.nn import functional

from benchmarks.multiscale import add_smoe_outputs
from saliency_service.core.repository import Repository
from saliency_service.core.request import CostCounter, Job, RequestState
from saliency_service.methods._utils.linear_head import LinearHead, linear_head
from saliency_service.methods._utils.smoe import (
    PAPER_RESNET50_WEIGHTS,
    combine,
    combined_map,
    gamma_cdf_normalize,
    gaussian_cdf_normalize,
    layer_maps,
    smoe_scale,
)
from saliency_service.methods.cam import grad_cam
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core, method_enum
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.render.lovi_picture import lovi_rgb
from saliency_service.serving.config import Config
from saliency_service.serving.metrics import Metrics
from tests.conftest import TINY_LABELS, TINY_SHAPE, RunningServer, make_config
from tests.models import TinyCNN

SCALES = ("scale_0", "scale_1", "scale_2")
MULTISCALE = (pb.METHOD_SMOE_SCALE, pb.METHOD_FASTCAM, pb.METHOD_LOVI)
PARAMS_FIELD = {pb.METHOD_SMOE_SCALE: "smoe_scale", pb.METHOD_FASTCAM: "fastcam",
                pb.METHOD_LOVI: "lovi"}


# ---- straightforward references -----------------------------------------------------------


def reference_smoe(activations: np.ndarray) -> np.ndarray:
    """μ · (log₂ μ − mean_c log₂ x), one pixel at a time, in float64."""
    n, c, h, w = activations.shape
    out = np.zeros((n, h, w))
    for i in range(n):
        for y in range(h):
            for x in range(w):
                values = np.maximum(activations[i, :, y, x].astype(np.float64), 0.0) + 1e-7
                mu = sum(values) / c
                out[i, y, x] = mu * (math.log2(mu) - sum(math.log2(v) for v in values) / c)
    return out


def reference_gaussian(maps: np.ndarray) -> np.ndarray:
    out = np.zeros(maps.shape)
    for i, single in enumerate(maps.astype(np.float64)):
        out[i] = stats.norm.cdf(single, loc=single.mean(), scale=single.std(ddof=1))
    return out


def reference_gamma(maps: np.ndarray) -> np.ndarray:
    out = np.zeros(maps.shape)
    for i, single in enumerate(maps.astype(np.float64)):
        shifted = single - single.min() + 1e-7
        shape, _, scale = stats.gamma.fit(shifted.ravel(), floc=0)
        out[i] = stats.gamma.cdf(shifted, shape, scale=scale)
    return out


def reference_combined(per_scale: list[np.ndarray], normalization: str, weights: list[float],
                       size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-scale maps normalized, upsampled by torch, then Σ wᵢ Mᵢ / Σ wᵢ (loop)."""
    norm = reference_gaussian if normalization == "gaussian_cdf" else reference_gamma
    layers = []
    for smoe in per_scale:
        normalized = torch.from_numpy(norm(smoe)).unsqueeze(1)
        layers.append(functional.interpolate(normalized, size=size, mode="bilinear",
                                             align_corners=False)[:, 0].numpy())
    total = np.zeros_like(layers[0])
    for weight, layer in zip(weights, layers, strict=True):
        total += weight * layer
    return np.stack(layers, axis=1), total / sum(weights)


def random_activations(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Post-ReLU-like activations: about a third exact zeros, heavy-tailed positives."""
    rng = np.random.default_rng(seed)
    values = rng.gamma(0.7, 1.3, size=shape) * rng.uniform(0.2, 3.0, size=(1, shape[1], 1, 1))
    values[rng.random(shape) < 0.3] = 0.0
    return values.astype(np.float32)


# ---- the maths on random activations ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (1, 64, 4, 4), (3, 1, 3, 3)])
def test_smoe_scale_matches_the_per_pixel_formula(shape: tuple[int, ...]) -> None:
    activations = random_activations(shape, seed=sum(shape))
    np.testing.assert_allclose(smoe_scale(activations), reference_smoe(activations),
                               rtol=2e-4, atol=1e-5)


def test_smoe_scale_applies_the_relu_to_outputs_taken_before_it() -> None:
    """A scale output need not be post-ReLU: negative values count as zero activation."""
    rng = np.random.default_rng(7)
    raw = rng.normal(size=(2, 12, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(smoe_scale(raw), reference_smoe(raw), rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(smoe_scale(raw), smoe_scale(np.maximum(raw, 0.0)))
    # A strided view (a channel slice) is read correctly, not reinterpreted.
    view = raw[:, ::2]
    np.testing.assert_allclose(smoe_scale(view), reference_smoe(np.ascontiguousarray(view)),
                               rtol=2e-4, atol=1e-5)


def test_smoe_scale_is_zero_where_channels_agree_and_large_where_one_fires() -> None:
    flat = np.full((1, 8, 2, 2), 3.0, np.float32)
    assert np.abs(smoe_scale(flat)).max() < 1e-5
    sparse = flat.copy()
    sparse[0, :, 0, 0] = 0.0
    sparse[0, 0, 0, 0] = 24.0  # same mean 3, one channel firing
    assert smoe_scale(sparse)[0, 0, 0] > 10 * max(1e-6, smoe_scale(flat).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalizations_match_scipy_stats(seed: int) -> None:
    maps = smoe_scale(random_activations((3, 32, 9, 11), seed))
    np.testing.assert_allclose(gaussian_cdf_normalize(maps), reference_gaussian(maps),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gamma_cdf_normalize(maps), reference_gamma(maps),
                               rtol=1e-3, atol=2e-4)
    for normalized in (gaussian_cdf_normalize(maps), gamma_cdf_normalize(maps)):
        assert normalized.min() >= 0 and normalized.max() <= 1
    strided = maps[:, ::2, 1:]  # a view, as a caller may pass
    np.testing.assert_allclose(gaussian_cdf_normalize(strided), reference_gaussian(strided),
                               rtol=1e-5, atol=1e-6)


def test_flat_maps_normalize_to_one_half() -> None:
    flat = np.full((2, 4, 4), 0.25, np.float32)
    assert np.all(gaussian_cdf_normalize(flat) == 0.5)
    assert np.all(gamma_cdf_normalize(flat) == 0.5)


@pytest.mark.parametrize("normalization", ["gaussian_cdf", "gamma_cdf"])
def test_combined_map_matches_the_reference(normalization: str) -> None:
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2), (2, 64, 1, 2)]
    acts = [random_activations(s, seed=i) for i, s in enumerate(shapes)]
    weights = list(PAPER_RESNET50_WEIGHTS)
    layers = layer_maps([smoe_scale(a) for a in acts], normalization, 32, 32)
    expected_layers, expected = reference_combined(
        [reference_smoe(a) for a in acts], normalization, weights, (32, 32))
    np.testing.assert_allclose(layers, expected_layers, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(combine(layers, np.asarray(weights)), expected, rtol=1e-3,
                               atol=2e-4)
    fused = combined_map([smoe_scale(a) for a in acts], normalization, np.asarray(weights),
                         32, 32)
    np.testing.assert_allclose(fused, expected, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("weights", [[1.0] * 5, [2.0] * 5, [0.0, 1.0, 0.0, 3.0, 1.0]])
def test_combined_map_with_equal_unit_and_zero_weights(weights: list[float]) -> None:
    """The default equal weights skip the multiplications; zero weights skip the scale."""
    shapes = [(1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2), (1, 64, 1, 2)]
    acts = [random_activations(s, seed=10 + i) for i, s in enumerate(shapes)]
    _, expected = reference_combined([reference_smoe(a) for a in acts], "gaussian_cdf",
                                     weights, (32, 32))
    fused = combined_map([smoe_scale(a) for a in acts], "gaussian_cdf", np.asarray(weights),
                         32, 32)
    np.testing.assert_allclose(fused, expected, rtol=1e-3, atol=2e-4)


def test_lovi_colours_depth_agreement_and_strength() -> None:
    maps = np.zeros((3, 2, 2), np.float32)
    maps[0, 0, 0] = 1.0  # only the first scale: violet
    maps[2, 0, 1] = 1.0  # only the last scale: red
    maps[:, 1, 0] = 0.8  # all scales agree: grey
    rgb = lovi_rgb(maps).astype(int)
    r, g, b = rgb[0, 0]
    assert b > 200 and r > 100 and g < 20  # violet
    assert rgb[0, 1, 0] > 240 and rgb[0, 1, 1] < 20 and rgb[0, 1, 2] < 20  # red
    assert np.ptp(rgb[1, 0]) <= 2 and 190 <= rgb[1, 0, 0] <= 215  # grey, value 0.8
    assert rgb[1, 1].max() == 0  # nothing anywhere: black


# ---- a real exported model, in process ---------------------------------------------------------


@pytest.fixture(scope="module")
def handle(repository: Path):
    repo = Repository(repository)
    repo.load_all()
    return repo.get("tiny")


@pytest.fixture(scope="module")
def core(repository: Path) -> Core:
    repo = Repository(repository)
    repo.load_all()
    return Core(repo, Config(models=repository, max_batch=8), Metrics())


def tiny_inputs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *TINY_SHAPE)).astype(np.float32)


def onnx_scales(repository: Path, inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(repository / "tiny" / "1" / "model.onnx"))
    return session.run(list(SCALES), {"input": inputs})


def explain(core: Core, method: int, inputs: np.ndarray, **fields: object
            ) -> pb.ExplainResponse:
    request = pb.ExplainRequest(model="tiny", method=method,
                                input=pb.Input(tensor=array_to_tensor(inputs)), return_raw=True,
                                **fields)
    return core.explain(request, RequestState(), CostCounter())


def source_grad_cam(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Grad-CAM by autograd on the source torch module (hook on layer3)."""
    model = TinyCNN(len(TINY_LABELS))
    captured = {}
    hook = model.layer3.register_forward_hook(lambda _m, _i, out: captured.update(a=out))
    try:
        logits = model(torch.from_numpy(inputs))
    finally:
        hook.remove()
    activations = captured["a"]
    selected = logits.gather(1, torch.from_numpy(targets).view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(selected, activations)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(1)).detach().numpy()


@pytest.mark.parametrize("normalization", ["gaussian_cdf", "gamma_cdf"])
@pytest.mark.parametrize("weights", [[], [0.2, 0.3, 0.5]])
def test_smoe_on_the_exported_model_matches_the_reference(core, repository, normalization,
                                                         weights) -> None:
    inputs = tiny_inputs(2, seed=3)
    enum = pb.Normalization.Value(f"NORMALIZATION_{normalization.upper()}")
    params = pb.MultiScaleParams(weights=weights, normalization=enum)
    reply = explain(core, pb.METHOD_SMOE_SCALE, inputs, smoe_scale=params)
    per_scale = [reference_smoe(a) for a in onnx_scales(repository, inputs)]
    layers, combined = reference_combined(per_scale, normalization, weights or [1.0] * 3,
                                          TINY_SHAPE[1:])
    np.testing.assert_allclose(tensor_to_array(reply.raw), layers, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(tensor_to_array(reply.saliency), combined, rtol=1e-3, atol=2e-4)
    assert reply.cost.forward_passes == 2 and reply.cost.backward_passes == 0


def test_linear_head_cam_is_exactly_grad_cam(handle, repository) -> None:
    inputs = tiny_inputs(3, seed=5)
    targets = np.array([0, 2, 3])
    head = linear_head(handle)
    assert head is not None
    model = TinyCNN(len(TINY_LABELS))
    np.testing.assert_allclose(head.weight, model.fc.weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(head.bias, model.fc.bias.detach().numpy(), rtol=1e-6)
    last = onnx_scales(repository, inputs)[-1]
    np.testing.assert_allclose(head.cam(last, targets), source_grad_cam(inputs, targets),
                               rtol=1e-4, atol=1e-6)
    # The torch-program fallback computes the same Grad-CAM with a backward pass.
    job = Job(model=handle, inputs=inputs, targets=targets, params={})
    np.testing.assert_allclose(grad_cam(job, "scale_2"),
                               source_grad_cam(inputs, targets), rtol=1e-4, atol=1e-6)
    assert job.cost.backward_passes == 3


def test_fastcam_is_smoe_times_grad_cam_without_a_backward_pass(core, repository) -> None:
    inputs = tiny_inputs(2, seed=7)
    reply = explain(core, pb.METHOD_FASTCAM, inputs,
                    target=pb.Target(per_item=pb.ClassIndices(indices=[1, 3])))
    per_scale = [reference_smoe(a) for a in onnx_scales(repository, inputs)]
    _, combined = reference_combined(per_scale, "gaussian_cdf", [1.0] * 3, TINY_SHAPE[1:])
    cam = source_grad_cam(inputs, np.array([1, 3]))
    cam_up = functional.interpolate(torch.from_numpy(cam).unsqueeze(1), size=TINY_SHAPE[1:],
                                    mode="bilinear", align_corners=False)[:, 0].numpy()
    expected = combined * cam_up
    np.testing.assert_allclose(tensor_to_array(reply.raw), expected, rtol=1e-3, atol=1e-6)
    maps = tensor_to_array(reply.saliency)
    np.testing.assert_allclose(maps, expected / expected.reshape(2, -1).max(1)[:, None, None],
                               rtol=1e-3, atol=2e-4)
    assert reply.cost.forward_passes == 2 and reply.cost.backward_passes == 0
    assert reply.diagnostics["cam_backward_free"] == 1.0


def test_fastcam_without_a_linear_head_falls_back_to_grad_cam(tmp_path, core) -> None:
    export_package(TinyCNN(len(TINY_LABELS)), name="tiny", version=1, input_shape=TINY_SHAPE,
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=TINY_LABELS,
                   repository=tmp_path, verify_inputs=1)
    repo = Repository(tmp_path)
    repo.load_all()
    headless = Core(repo, Config(models=tmp_path, max_batch=8), Metrics())
    inputs = tiny_inputs(2, seed=9)
    slow = explain(headless, pb.METHOD_FASTCAM, inputs)
    fast = explain(core, pb.METHOD_FASTCAM, inputs)
    np.testing.assert_allclose(tensor_to_array(slow.saliency), tensor_to_array(fast.saliency),
                               rtol=1e-3, atol=1e-4)
    assert slow.cost.backward_passes == 2 and fast.cost.backward_passes == 0
    assert slow.diagnostics["cam_backward_free"] == 0.0


def test_baked_smoe_outputs_equal_numpy_smoe(repository) -> None:
    model = onnx.load(str(repository / "tiny" / "1" / "model.onnx"))
    baked = add_smoe_outputs(model, list(SCALES))
    onnx.checker.check_model(baked)
    session = ort.InferenceSession(baked.SerializeToString())
    inputs = tiny_inputs(3, seed=11)
    outputs = session.run([*SCALES, "smoe_0", "smoe_1", "smoe_2"], {"input": inputs})
    for activations, smoe in zip(outputs[:3], outputs[3:], strict=True):
        np.testing.assert_allclose(smoe, smoe_scale(activations), rtol=1e-4, atol=1e-6)


def test_auto_prefers_the_fast_path_when_gradients_are_too_slow(core) -> None:
    inputs = tiny_inputs(2)
    for handler in core.methods_for(core.repository.get("tiny")):
        slow = handler.uses_gradients or handler.name in ("occlusion", "rise", "decam")
        core.metrics.observe("tiny", handler.name, "OK", 2.0 if slow else 0.001, 0.0, {}, 0)
    fast = explain(core, pb.METHOD_AUTO, inputs, budget=pb.Budget(max_latency_ms=500))
    assert fast.cost.method in (pb.METHOD_FASTCAM, pb.METHOD_SMOE_SCALE)
    assert fast.cost.forward_passes == 2 and fast.cost.backward_passes == 0
    roomy = explain(core, pb.METHOD_AUTO, inputs, budget=pb.Budget(max_latency_ms=5000))
    first = core.engine.auto(core.order(pb.ExplainRequest()), core.repository.get("tiny"))
    assert roomy.cost.method == method_enum(first.name)


# ---- over gRPC -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", MULTISCALE)
@pytest.mark.parametrize("batch", [1, 3])
def test_multiscale_methods_over_grpc(stub, method: int, batch: int) -> None:
    inputs = tiny_inputs(batch, seed=batch)
    request = pb.ExplainRequest(model="tiny", method=method, return_overlay=True,
                                input=pb.Input(tensor=array_to_tensor(inputs)))
    getattr(request, PARAMS_FIELD[method]).normalization = pb.NORMALIZATION_GAMMA_CDF
    reply = stub.Explain(request, timeout=30)
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (batch, *TINY_SHAPE[1:])
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0
    assert reply.cost.method == method
    assert reply.cost.forward_passes == batch and reply.cost.backward_passes == 0
    assert len(reply.overlays) == batch
    image = Image.open(io.BytesIO(reply.overlays[0]))
    assert image.format == "PNG"
    if method == pb.METHOD_LOVI:
        assert image.size[0] == 256 and image.size[1] > 256  # LOVI's picture, enlarged, legend


@pytest.mark.parametrize("weights, fragment", [
    ([1.0, 1.0], "has 2 values but model 'tiny' has 3 scale outputs"),
    ([1.0, -1.0, 1.0], "non-negative"),
    ([0.0, 0.0, 0.0], "sum to > 0"),
    ([1.0, float("nan"), 1.0], "finite"),
])
def test_bad_weights_are_invalid_argument(stub, weights, fragment: str) -> None:
    request = pb.ExplainRequest(model="tiny", method=pb.METHOD_FASTCAM,
                                input=pb.Input(tensor=array_to_tensor(tiny_inputs(1))),
                                fastcam=pb.MultiScaleParams(weights=weights))
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.value.details()


def test_auto_over_grpc_before_anything_is_measured(repository) -> None:
    """A fresh server has measured nothing: the static prior must still pick the fast path
    for a budget below what a gradient pass costs, and a gradient-free answer costs 1 pass."""
    running = RunningServer(make_config(repository)).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            from saliency_service.proto import explainer_pb2_grpc as pb_grpc  # noqa: PLC0415

            stub = pb_grpc.ExplainerStub(channel)
            request = pb.ExplainRequest(
                model="tiny", method=pb.METHOD_AUTO, budget=pb.Budget(max_latency_ms=1e-3),
                input=pb.Input(tensor=array_to_tensor(tiny_inputs(2))))
            reply = stub.Explain(request, timeout=30)
            assert reply.cost.method in (pb.METHOD_FASTCAM, pb.METHOD_SMOE_SCALE)
            assert reply.cost.forward_passes == 2 and reply.cost.backward_passes == 0
            info = stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=10)
            ran = {m.name: m.measured_requests for m in info.methods}
            assert ran[pb.Method.Name(reply.cost.method)[len("METHOD_"):].lower()] == 1
    finally:
        running.stop()


def test_a_job_without_the_prediction_outputs_runs_the_network_once(core, handle) -> None:
    """Called directly (no prediction run before it), SMOE fetches the scales itself."""
    from saliency_service.methods.multiscale import SmoeScale  # noqa: PLC0415

    inputs = tiny_inputs(2, seed=13)
    job = Job(model=handle, inputs=inputs, targets=np.zeros(2, np.int64),
                     params=SmoeScale().params())
    direct = SmoeScale().explain(job)
    assert job.cost.forward_passes == 2 and job.cost.backward_passes == 0
    served = explain(core, pb.METHOD_SMOE_SCALE, inputs)
    np.testing.assert_allclose(direct.maps, tensor_to_array(served.saliency), rtol=1e-6)


DEMO_MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.skipif(not (DEMO_MODELS / "demo" / "1" / "manifest.json").is_file(),
                    reason="the demo package models/demo/1 has not been built")
def test_smoe_and_linear_head_on_the_demo_model_match_the_reference() -> None:
    repo = Repository(DEMO_MODELS)
    repo.load_all()
    demo = repo.get("demo")
    spec = demo.spec()
    demo_core = Core(repo, Config(models=DEMO_MODELS, max_batch=8), Metrics())
    inputs = np.random.default_rng(0).normal(size=(1, *spec.input.shape[1:])).astype(np.float32)
    request = pb.ExplainRequest(model="demo", method=pb.METHOD_SMOE_SCALE, return_raw=True,
                                input=pb.Input(tensor=array_to_tensor(inputs)))
    reply = demo_core.explain(request, RequestState(), CostCounter())
    *scales, = demo.run(inputs, list(spec.scale_outputs))
    layers, combined = reference_combined([reference_smoe(a) for a in scales], "gaussian_cdf",
                                          [1.0] * len(scales), spec.input.shape[2:])
    np.testing.assert_allclose(tensor_to_array(reply.raw), layers, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(tensor_to_array(reply.saliency), combined, rtol=1e-3, atol=2e-4)
    head = linear_head(demo)
    assert head is not None  # the demo model ends in global-average-pool + fc
    np.testing.assert_allclose(head.logits(scales[-1]), demo.run(inputs)[0], rtol=1e-4,
                               atol=1e-4)


def test_a_head_that_does_not_reproduce_the_logits_is_not_trusted(core, handle,
                                                                   monkeypatch) -> None:
    """Weights that disagree with the served logits (a package whose head was misdescribed)
    must not yield a wrong CAM: FastCAM falls back to Grad-CAM on the torch program."""
    import saliency_service.methods.multiscale as multiscale  # noqa: PLC0415 - the handler's own reference

    true_head = linear_head(handle)
    wrong = LinearHead(true_head.weight[::-1].copy(), true_head.bias)
    monkeypatch.setattr(multiscale, "linear_head", lambda _model: wrong)
    inputs = tiny_inputs(2, seed=17)
    reply = explain(core, pb.METHOD_FASTCAM, inputs)
    assert reply.diagnostics["cam_backward_free"] == 0.0
    assert reply.cost.backward_passes == 2
    monkeypatch.undo()
    trusted = explain(core, pb.METHOD_FASTCAM, inputs)
    np.testing.assert_allclose(tensor_to_array(reply.saliency), tensor_to_array(trusted.saliency),
                               rtol=1e-3, atol=1e-4)


def test_combined_map_refuses_all_zero_weights() -> None:
    maps = [smoe_scale(random_activations((1, 4, 4, 4), seed=3))]
    with pytest.raises(ValueError, match="all be zero"):
        combined_map(maps, "gaussian_cdf", np.zeros(1), 8, 8)
