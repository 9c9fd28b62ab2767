"""The architecture matrix over gRPC on a real server: export, every offered method, peers.

Each architecture of ``tests.architecture_matrix`` is exported once; a real server loads
them all (and warms them before reporting ready). For each: every method ``GetModel``
offers returns finite N×H×W maps in [0, 1] with the expected passes; vanilla gradient,
Input×Gradient, Integrated Gradients, Guided Backprop and Grad-CAM match Captum (Grad-CAM on
tokens: pytorch-grad-cam with its ``reshape_transform``) within 1e-4 relative; scale outputs
are distinct tensors at distinct, decreasing resolutions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    Saliency,
)

from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from tests.architecture_matrix import MATRIX, Architecture, build
from tests.conftest import make_config
from tests.gradient_fixtures import relative_error
from tests.peer_grad_cam import import_pytorch_grad_cam
from tests.test_gradients_e2e import SMALL_PARAMS, torch_passes
from tests.test_warm_shapes import kernels_built

TOLERANCE = 1e-4
# The compiled kernels oneDNN keeps unless told otherwise (saliency_service.serving.onednn_cache).
ONEDNN_DEFAULT_CAPACITY = 1024
BATCH = 2
STEPS = 4
MULTISCALE = {"smoe_scale", "fastcam", "lovi"}
FAST_PARAMS = {
    **SMALL_PARAMS,
    "integrated_gradients": pb.IntegratedGradientsParams(
        steps=STEPS, rule=pb.QUADRATURE_RIEMANN_MIDDLE, baseline=pb.BASELINE_ZERO),
    "decam": pb.DecamParams(grid=4, population=4, generations=2),
    "rise": pb.RiseParams(masks=16),
    "occlusion": pb.OcclusionParams(window=16, stride=16),
}
BY_NAME = {a.name: a for a in MATRIX}


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, pb_grpc.ExplainerStub]]:
    root = tmp_path_factory.mktemp("matrix")
    for architecture in MATRIX:
        channels = architecture.input_shape[0]
        export_package(build(architecture), name=architecture.name, version=1,
                       input_shape=architecture.input_shape, mean=[0.5] * channels,
                       std=[0.25] * channels, class_labels=(), repository=root,
                       head=architecture.head)
    running = RunningServer(make_config(root)).start(timeout=900)
    try:
        with grpc.insecure_channel(running.address) as channel:
            yield root, pb_grpc.ExplainerStub(channel)
    finally:
        running.stop()


def inputs(architecture: Architecture, seed: int = 0) -> np.ndarray:
    shape = (BATCH, *architecture.input_shape)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def explain(stub: pb_grpc.ExplainerStub, architecture: Architecture, name: str, method: int,
            x: np.ndarray, targets: np.ndarray | None = None) -> pb.ExplainResponse:
    request = pb.ExplainRequest(model=architecture.name, method=method, seed=3, return_raw=True,
                                input=pb.Input(tensor=array_to_tensor(x)))
    if targets is not None:
        request.target.per_item.indices.extend(int(t) for t in targets)
    if name in FAST_PARAMS:
        getattr(request, name).CopyFrom(FAST_PARAMS[name])
    return stub.Explain(request, timeout=120)


def manifest(root: Path, architecture: Architecture) -> dict:
    return json.loads((root / architecture.name / "1" / "manifest.json").read_text())


@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_offered_method_gives_maps(served, name: str) -> None:
    _, stub = served
    architecture = BY_NAME[name]
    info = stub.GetModel(pb.GetModelRequest(model=name), timeout=30)
    assert info.status.ready, info.status.error
    offered = {m.name: m.method for m in info.methods}
    if architecture.tokens:
        assert not offered.keys() & MULTISCALE
        reasons = {m.name: m.reason for m in info.unavailable_methods}
        assert reasons.keys() >= MULTISCALE
        assert "patch grid (a vision transformer)" in reasons["smoe_scale"]
        assert {"gradcam", "gradcam_plus_plus", "decam", "rise"} <= offered.keys()
    else:
        assert offered.keys() >= MULTISCALE
    x = inputs(architecture)
    height, width = architecture.input_shape[1:]
    for method_name, method in sorted(offered.items()):
        reply = explain(stub, architecture, method_name, method, x)
        maps = tensor_to_array(reply.saliency)
        assert maps.shape == (BATCH, height, width), method_name
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, method_name
        known = torch_passes(method_name)
        if method_name == "integrated_gradients":  # f(zero baseline) once per batch
            assert reply.cost.backward_passes == STEPS * BATCH
            assert reply.cost.forward_passes == BATCH + STEPS * BATCH + 1
        elif known is not None:
            assert reply.cost.forward_passes == BATCH + known[0] * BATCH, method_name
            assert reply.cost.backward_passes == known[1] * BATCH, method_name
        elif method_name in MULTISCALE:  # the prediction's pass, + Grad-CAM off a GAP head
            extra = 0 if method_name != "fastcam" or reply.diagnostics["cam_backward_free"] else 1
            assert reply.cost.forward_passes == BATCH * (1 + extra), method_name
            assert reply.cost.backward_passes == BATCH * extra, method_name
        elif method_name == "guided_gradcam":
            assert (reply.cost.forward_passes, reply.cost.backward_passes) == (3 * BATCH,
                                                                               2 * BATCH)
        else:  # perturbation methods: many ONNX Runtime forwards, no backward
            assert reply.cost.forward_passes > BATCH, method_name
            assert reply.cost.backward_passes == 0, method_name


def captum_reference(name: str, module: torch.nn.Module, x: torch.Tensor,
                     targets: torch.Tensor) -> np.ndarray:
    if name == "vanilla_gradient":
        result = Saliency(module).attribute(x, target=targets, abs=False)
    elif name == "input_x_gradient":
        result = InputXGradient(module).attribute(x, target=targets)
    elif name == "guided_backprop":
        result = GuidedBackprop(module).attribute(x, target=targets)
    else:
        result = IntegratedGradients(module).attribute(
            x, baselines=torch.zeros_like(x), target=targets, n_steps=STEPS,
            method="riemann_middle")
    return result.detach().numpy()


@pytest.mark.parametrize("name", list(BY_NAME))
def test_gradients_and_gradcam_match_the_peers(served, name: str) -> None:
    root, stub = served
    architecture = BY_NAME[name]
    spec = manifest(root, architecture)
    module = build(architecture)
    x = inputs(architecture, seed=1)
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    targets = torch.argsort(logits, dim=1, descending=True)[:, 1]  # second-best class
    errors = {}
    for method_name, method in [("vanilla_gradient", pb.METHOD_VANILLA_GRADIENT),
                                ("input_x_gradient", pb.METHOD_INPUT_X_GRADIENT),
                                ("integrated_gradients", pb.METHOD_INTEGRATED_GRADIENTS),
                                ("guided_backprop", pb.METHOD_GUIDED_BACKPROP)]:
        reply = explain(stub, architecture, method_name, method, x, targets.numpy())
        expected = captum_reference(method_name, module, torch.from_numpy(x.copy()), targets)
        errors[method_name] = relative_error(tensor_to_array(reply.raw), expected)
    reply = explain(stub, architecture, "gradcam", pb.METHOD_GRADCAM, x, targets.numpy())
    layer = module.get_submodule(spec["cam_layer"])
    if architecture.tokens:
        errors["gradcam"] = relative_error(tensor_to_array(reply.saliency),
                                           token_grad_cam(module, layer, spec, x, targets))
    else:
        expected = LayerGradCam(module, layer).attribute(
            torch.from_numpy(x.copy()), target=targets, relu_attributions=False)
        errors["gradcam"] = relative_error(tensor_to_array(reply.raw),
                                           expected.detach().numpy()[:, 0])
    print(f"{name}: worst relative error against the peers {errors}")
    assert max(errors.values()) <= TOLERANCE, errors


def token_grad_cam(module: torch.nn.Module, layer: torch.nn.Module, spec: dict,
                   x: np.ndarray, targets: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM with its ViT ``reshape_transform``."""
    library, classifier_target = import_pytorch_grad_cam()
    grid = spec["token_grid"]
    height, width = grid["grid"]
    peer = copy.deepcopy(module)
    for parameter in peer.parameters():
        parameter.requires_grad_(True)

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        if grid["batch_dim"] == 1:
            tensor = tensor.transpose(0, 1)
        patches = tensor[:, grid["prefix_tokens"]:, :]
        return patches.reshape(tensor.size(0), height, width, tensor.size(2)).permute(0, 3, 1, 2)

    layer = peer.get_submodule(spec["cam_layer"])
    with library.GradCAM(model=peer, target_layers=[layer],
                         reshape_transform=reshape_transform) as cam:
        return cam(input_tensor=torch.from_numpy(x.copy()),
                   targets=[classifier_target(int(t)) for t in targets])


@pytest.mark.parametrize("name", list(BY_NAME))
def test_scales_are_distinct_tensors_at_decreasing_resolutions(served, name: str) -> None:
    root, _ = served
    architecture = BY_NAME[name]
    spec = manifest(root, architecture)
    nodes = [record["node"] for record in spec["scale_nodes"]]
    assert len(set(nodes)) == len(nodes) == len(spec["outputs"]["scales"])
    areas = [shape[1] * shape[2] for shape in spec["scale_shapes"]]
    assert areas == sorted(set(areas), reverse=True)
    if architecture.tokens:
        assert not nodes and spec["cam_output"] == "tokens_0"
        grid = spec["token_grid"]
        assert grid["grid"] == [8, 8] and grid["prefix_tokens"] == architecture.prefix_tokens
    else:
        assert len(nodes) >= 3 and spec["cam_output"] == spec["outputs"]["scales"][-1]


def test_a_repository_keeps_every_models_kernels(served, tmp_path: Path) -> None:
    """The whole matrix needs more compiled oneDNN kernels than oneDNN keeps by default, yet
    the first gradient requests to every model after readiness (the earliest-loaded, whose
    kernels a small cache would have evicted, included) build none that the warm-up did not."""
    root, _ = served
    requests = [
        pb.ExplainRequest(model=architecture.name, method=method,
                          input=pb.Input(tensor=array_to_tensor(inputs(architecture)[:1])))
        for architecture in MATRIX
        for method in (pb.METHOD_VANILLA_GRADIENT, pb.METHOD_SMOOTHGRAD,
                       pb.METHOD_INTEGRATED_GRADIENTS)
    ]
    at_readiness = kernels_built(root, tmp_path / "ready.log", [])
    after_requests = kernels_built(root, tmp_path / "served.log", requests)
    assert at_readiness > ONEDNN_DEFAULT_CAPACITY
    assert after_requests == at_readiness, (
        f"{after_requests - at_readiness} oneDNN kernels were built again for "
        f"{len(requests)} requests after readiness")
