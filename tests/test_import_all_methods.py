"""Every method on every imported ONNX model, checked against the framework the model came from.

Each committed fixture in ``tests/fixtures/onnx`` (``onnx.helper`` graphs and Keras models
converted by tf2onnx), a small ResNet exported with plain ``torch.onnx.export`` (the dynamo
exporter, its weights in ``model.onnx.data``) and a tiny ViT exported at opset 20
(LayerNormalization, Gelu) is imported with ``saliency import`` and served by a real server.
``GetModel`` must offer every registered method or name precisely what the graph lacks;
every offered method must return a finite map of the image's size; and vanilla gradient,
Input×Gradient, Integrated Gradients and Grad-CAM must equal the source framework's within
1e-4 of their scale:

* torch models: ``torch.autograd`` on the original module (Grad-CAM by hooks on the module
  whose output or input is the package's CAM tensor);
* Keras models: ``tf.GradientTape`` on the rebuilt Keras model, run in the TensorFlow
  environment at ``TF_PYTHON`` (``tests/keras_reference.py``); the committed
  ``keras_*_grad.npy`` are checked as well;
* ``onnx.helper`` models: the function the graph encodes (a scaled box mean, then Softmax,
  Sigmoid or nothing), differentiated by hand.

Run with ``-s`` for the table: fixture × framework × methods offered × worst gradient
error × import time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency_service import cli
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config
from tests.fixtures.onnx_classifiers import BOXES, FOLDER, GAIN, OFFSET, SIZE
from tests.models import TinyViT

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parent.parent
TF_PYTHON = Path(os.environ.get("SALIENCY_TF_PYTHON", "/tmp/tfenv/bin/python"))
IG_STEPS = 8
ALPHAS = (np.arange(IG_STEPS) + 0.5) / IG_STEPS  # riemann_middle
FEATURE_MAP_METHODS = {"gradcam", "gradcam_plus_plus", "guided_gradcam", "xgradcam",
                       "smoe_scale", "fastcam", "lovi"}
SCALE_METHODS = {"smoe_scale", "fastcam", "lovi"}
# Cheap settings: the point is that each runs on the imported graph, not its defaults' cost.
CHEAP = {
    "smoothgrad": pb.SmoothGradParams(samples=3),
    "vargrad": pb.SmoothGradParams(samples=3),
    "guided_absolutegrad": pb.GuidedAbsoluteGradParams(samples=3),
    "integrated_gradients": pb.IntegratedGradientsParams(steps=4),
    "decam": pb.DecamParams(max_forward_passes=120),
    "rise": pb.RiseParams(masks=64),
    "occlusion": pb.OcclusionParams(window=8, stride=8),
}


# --------------------------------------------------------------------------- torch models


class Residual(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        source = channels if stride == 1 else channels // 2
        self.conv1 = nn.Conv2d(source, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.skip = nn.Identity() if stride == 1 else nn.Sequential(
            nn.Conv2d(source, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.skip(x))


class SmallResNet(nn.Module):
    """Stem, max-pool, two residual stages, global average pool and a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2 = Residual(8), Residual(16, 2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layer2(self.layer1(self.pool(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BatchNorm statistics from a few training-mode batches, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape) * 2 + 0.5)
    return model.eval()


def torch_export(model: nn.Module, shape: tuple[int, ...], folder: Path,
                 **options: object) -> Path:
    """``torch.onnx.export`` as its documentation shows it, with a free batch."""
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, *shape),), str(path), input_names=["input"],
                      output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **options)
    return path


# --------------------------------------------------------------------------- fixtures


@dataclass
class Case:
    """One imported model: where it came from and what import and the server made of it."""

    name: str
    framework: str
    source: Path
    flags: tuple[str, ...] = ()
    module: nn.Module | None = None
    import_seconds: float = 0.0
    output: str = ""
    offered: int = 0
    worst_error: float | None = None
    oracle: str = ""

    def session(self, root: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(root / self.name / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])


def _framework(path: Path) -> str:
    return "Keras → tf2onnx" if path.name.startswith("keras") else "onnx.helper"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def cases(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """Every fixture and the two torch models, imported with the command line."""
    folder = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    resnet = trained(SmallResNet(), (3, SIZE, SIZE))
    vit = trained(TinyViT(), (3, 16, 16))
    found = [Case(p.stem, _framework(p), p,
                  ("--input-shape", f"3,{SIZE},{SIZE}") if p.stem == "dynamic_hw" else ())
             for p in sorted(FOLDER.glob("*.onnx"))]
    found += [
        Case("torch_resnet", "PyTorch → torch.onnx.export (dynamo)",
             torch_export(resnet, (3, SIZE, SIZE), folder / "resnet"), module=resnet),
        Case("torch_vit", "PyTorch → torch.onnx.export (dynamo, opset 20)",
             torch_export(vit, (3, 16, 16), folder / "vit", opset_version=20), module=vit),
    ]
    for case in found:
        started = time.perf_counter()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["import", str(case.source), "--name", case.name, "--models",
                             str(root), *case.flags])
        case.import_seconds = time.perf_counter() - started
        assert code == 0, err.getvalue()
        case.output = out.getvalue()
    return {case.name: case for case in found}


@pytest.fixture(scope="module")
def stub(root: Path, cases: dict[str, Case]) -> Iterator[pb_grpc.ExplainerStub]:
    running = RunningServer(make_config(root)).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            yield pb_grpc.ExplainerStub(channel)
    finally:
        running.stop()


NAMES = sorted([p.stem for p in FOLDER.glob("*.onnx")] + ["torch_resnet", "torch_vit"])
TORCH = ("torch_resnet", "torch_vit")
KERAS = tuple(n for n in NAMES if n.startswith("keras"))


def manifest(root: Path, name: str) -> dict:
    return json.loads((root / name / "1" / "manifest.json").read_text())


def model_inputs(root: Path, name: str, count: int, seed: int = 0) -> np.ndarray:
    """Float inputs in the model's layout, in [0, 1] (what a tensor request carries)."""
    shape = list(manifest(root, name)["input"]["shape"])
    shape[0] = count
    stored = FOLDER / f"{name}_input.npy"
    if stored.exists() and count == 2:  # the inputs TensorFlow's stored gradients are for
        return np.load(stored)
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def channels_first(values: np.ndarray, root: Path, name: str) -> np.ndarray:
    if manifest(root, name)["input"]["layout"] == "NHWC":
        return np.ascontiguousarray(values.transpose(0, 3, 1, 2))
    return values


def relative(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = max(float(np.abs(reference).max()), 1e-12)
    return float(np.abs(ours.astype(np.float64) - reference).max()) / scale


def explain(stub: pb_grpc.ExplainerStub, name: str, method: int, x: np.ndarray,
            **params: object) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(model=name, method=method, seed=3, return_raw=True,
                                          input=pb.Input(tensor=array_to_tensor(x)), **params),
                        timeout=120)


# --------------------------------------------------------------------------- import and GetModel


def test_import_adds_scale_outputs_with_a_free_batch_and_prints_them(
        cases: dict[str, Case], root: Path) -> None:
    for name, cam, head in (("torch_resnet", "scale_2", "gap_linear"),
                            ("keras_separable", "scale_1", "unknown"),
                            ("keras_mixed", "scale_2", "unknown")):
        case, found = cases[name], manifest(root, name)
        scales = found["outputs"]["scales"]
        assert scales == [f"scale_{i}" for i in range(len(scales))] and scales
        assert found["cam_output"] == cam and found["head"]["type"] == head
        assert found["cam_layer"] == found["scale_modules"][-1]
        assert len(found["scale_nodes"]) == len(found["scale_shapes"]) == len(scales)
        assert f"cam: {cam} ({found['cam_layer']})" in case.output
        for index, shape in enumerate(found["scale_shapes"]):
            assert f"scale_{index} = " in case.output and "×".join(map(str, shape)) in case.output
        session = case.session(root)
        outputs = {o.name: o.shape for o in session.get_outputs()}
        x = model_inputs(root, name, 3)
        values = session.run(scales, {found["input"]["name"]: x})
        for value, shape, scale in zip(values, found["scale_shapes"], scales, strict=True):
            assert value.shape == (3, *shape)  # the batch stays free
            assert not isinstance(outputs[scale][0], int)
    resnet = manifest(root, "torch_resnet")
    assert resnet["head"]["features"] == 16 and "gap_linear" in cases["torch_resnet"].output
    # the dynamo exporter's external weights are part of the package, listed with their hash
    assert set(resnet["files"]) == {"model.onnx", "model.onnx.data"}
    assert (root / "torch_resnet" / "1" / "model.onnx.data").is_file()
    vit = manifest(root, "torch_vit")
    assert vit["cam_output"] == "tokens_0" and vit["outputs"]["tokens"] == ["tokens_0"]
    assert vit["token_grid"]["grid"] == [4, 4] and vit["token_grid"]["prefix_tokens"] == 1
    assert {"LayerNormalization", "Gelu"} <= {
        n.op_type for n in onnx.load(str(cases["torch_vit"].source),
                                     load_external_data=False).graph.node}
    assert manifest(root, "keras_batch2")["input"]["shape"][0] == 2


def expected_missing(name: str) -> tuple[set[str], str]:
    """The methods a fixture cannot offer and the phrase its reasons must hold."""
    if name in ("torch_resnet", "keras_separable", "keras_mixed"):
        return set(), ""
    if name == "torch_vit":
        return SCALE_METHODS, "tokens on a 4×4 patch grid"
    if name.startswith("keras"):  # a 1×1 convolution with no activation after it
        return FEATURE_MAP_METHODS, "no activation, concatenation or residual sum"
    return FEATURE_MAP_METHODS, "the graph has no convolution"


@pytest.mark.parametrize("name", NAMES)
def test_get_model_offers_every_method_or_says_precisely_why_not(
        name: str, cases: dict[str, Case], stub: pb_grpc.ExplainerStub) -> None:
    info = stub.GetModel(pb.GetModelRequest(model=name), timeout=30)
    assert info.status.ready, info.status.error
    offered = {m.name for m in info.methods}
    missing = {m.name: m.reason for m in info.unavailable_methods}
    assert len(offered) + len(missing) == len(registry.handlers())
    assert missing.pop("drise").startswith("it explains detectors")  # classifiers all
    absent, phrase = expected_missing(name)
    assert set(missing) == absent, missing
    assert all(phrase in reason for reason in missing.values()), missing
    cases[name].offered = len(offered)


@pytest.mark.parametrize("name", NAMES)
def test_every_offered_method_returns_a_finite_map_of_the_image_size(
        name: str, root: Path, stub: pb_grpc.ExplainerStub) -> None:
    """Three images: a fixed batch of 1 or 2 runs in chunks of it."""
    info = stub.GetModel(pb.GetModelRequest(model=name), timeout=30)
    x = model_inputs(root, name, 3, seed=1)
    size = tuple(channels_first(x, root, name).shape[2:])
    for method in info.methods:
        params = {method.name: CHEAP[method.name]} if method.name in CHEAP else {}
        reply = explain(stub, name, method.method, x, **params)
        maps = tensor_to_array(reply.saliency)
        assert maps.shape == (3, *size), method.name
        assert np.isfinite(maps).all() and np.isfinite(tensor_to_array(reply.raw)).all()
        if method.name == "fastcam" and name == "torch_resnet":  # the head read from the graph
            assert reply.diagnostics["cam_backward_free"] == 1.0


# --------------------------------------------------------------------------- the references


def torch_gradient(module: nn.Module, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    leaf = torch.from_numpy(x).requires_grad_(True)
    scores = module(leaf)
    picked = scores.gather(1, torch.from_numpy(targets).long().view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(picked, leaf)
    return gradient.numpy()


def torch_grad_cam(module: nn.Module, x: np.ndarray, targets: np.ndarray,
                   cam_values: np.ndarray, grid: dict) -> np.ndarray:
    """Grad-CAM before its ReLU at the tensor a module hook sees (as its output or its
    input) that equals the package's CAM tensor."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
        seen.extend(t for t in (*inputs, output) if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in module.modules() if m is not module]
    try:
        with torch.enable_grad():
            scores = module(torch.from_numpy(x).requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    wanted = torch.from_numpy(cam_values)
    activation = next(t for t in seen if t.shape == wanted.shape and t.requires_grad
                      and float((t.detach() - wanted).abs().max())
                      <= TOLERANCE * float(wanted.abs().max()))
    picked = scores.gather(1, torch.from_numpy(targets).long().view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(picked, activation)
    values, gradient = activation.detach().numpy(), gradient.numpy()
    if grid:  # tokens → the patch grid, prefix tokens dropped
        height, width = grid["grid"]
        prefix = grid["prefix_tokens"]

        def to_grid(t: np.ndarray) -> np.ndarray:
            return t[:, prefix:].reshape(len(t), height, width, -1).transpose(0, 3, 1, 2)

        values, gradient = to_grid(values), to_grid(gradient)
    return np.einsum("nk,nkhw->nhw", gradient.mean(axis=(2, 3)), values)


def region_gradient(name: str, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The gradient of what an ``onnx.helper`` region classifier (or the Keras one built to
    score like it) computes: z_k = GAIN · mean(box_k) − OFFSET for its first regions, then
    Softmax, Sigmoid or nothing; x and the result N×C×H×W."""
    classes, regions, head = {"sigmoid_multilabel": (3, 2, "Sigmoid"),
                              "fixed_batch1": (2, 1, ""), "nhwc_logits": (2, 1, "")}.get(
        name, (2, 1, "Softmax"))
    x = x.astype(np.float64)
    boxes = np.zeros((classes, *x.shape[1:]))
    for k, (y0, y1, x0, x1) in enumerate(BOXES[:regions]):
        boxes[k, :, y0:y1, x0:x1] = GAIN / (x.shape[1] * (y1 - y0) * (x1 - x0))
    logits = np.einsum("nchw,kchw->nk", x, boxes) - OFFSET * (np.arange(classes) < regions)
    rows = np.arange(len(x))
    if head == "Softmax":
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        mixed = boxes[targets] - np.einsum("nk,kchw->nchw", p, boxes)
        return p[rows, targets][:, None, None, None] * mixed
    if head == "Sigmoid":
        p = 1 / (1 + np.exp(-logits[rows, targets]))
        return (p * (1 - p))[:, None, None, None] * boxes[targets]
    return boxes[targets]


@pytest.fixture(scope="module")
def keras_answers(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """TensorFlow's gradients and Grad-CAM for the Keras fixtures, on the inputs and targets
    of ``keras_request`` ({} when the TensorFlow environment is missing)."""
    if not TF_PYTHON.exists():
        return {}
    folder = tmp_path_factory.mktemp("keras")
    request: dict[str, np.ndarray] = {"names": np.array(KERAS), "alphas": ALPHAS}
    for name in KERAS:
        x, targets = keras_request(root, name)
        request[f"{name}/x"], request[f"{name}/targets"] = x, targets
        found = manifest(root, name)
        if found["cam_output"]:
            session = ort.InferenceSession(str(root / name / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
            request[f"{name}/cam_values"] = session.run([found["cam_output"]],
                                                        {found["input"]["name"]: x})[0]
    np.savez(folder / "request.npz", **request)
    subprocess.run([str(TF_PYTHON), "-m", "tests.keras_reference", str(folder / "request.npz"),
                    str(folder / "answer.npz")], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"},
                   timeout=600)
    with np.load(folder / "answer.npz") as answer:
        return dict(answer)


def keras_request(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The inputs (the stored ones where there are) and their top classes, by ONNX Runtime."""
    found = manifest(root, name)
    x = model_inputs(root, name, 2 if (FOLDER / f"{name}_input.npy").exists() else 3)
    session = ort.InferenceSession(str(root / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    size = max(found["input"]["shape"][0], 0) or len(x)
    scores = []
    for start in range(0, len(x), size):  # a fixed batch: chunks, the last one padded
        rows = x[start:start + size]
        padded = np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])
        scores.append(session.run([found["outputs"]["logits"]],
                                  {found["input"]["name"]: padded})[0][:len(rows)])
    return x, np.concatenate(scores).argmax(axis=1)


def references(name: str, case: Case, root: Path, x: np.ndarray, targets: np.ndarray,
               keras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source framework's vanilla gradient, Input×Gradient, IG and Grad-CAM (N×C×H×W
    attributions, N×h×w CAM) for inputs ``x`` in the model's layout."""
    found = manifest(root, name)
    if name in KERAS:
        if not keras:
            pytest.skip(f"no TensorFlow environment at {TF_PYTHON}: the Keras references "
                        "need it (python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install "
                        "tensorflow-cpu tf2onnx)")
        out = {"vanilla_gradient": keras[f"{name}/grad"].transpose(0, 3, 1, 2),
               "integrated_gradients": keras[f"{name}/ig"].transpose(0, 3, 1, 2)}
        if f"{name}/cam" in keras:
            out["gradcam"] = keras[f"{name}/cam"]
        out["input_x_gradient"] = channels_first(x, root, name) * out["vanilla_gradient"]
        return out
    nchw = channels_first(x, root, name)
    if case.module is not None:
        def gradient(points: np.ndarray) -> np.ndarray:
            return torch_gradient(case.module, points, targets)
    else:
        def gradient(points: np.ndarray) -> np.ndarray:
            return region_gradient(name, points, targets)
    out = {"vanilla_gradient": gradient(nchw)}
    out["input_x_gradient"] = nchw * out["vanilla_gradient"]
    steps = [gradient((alpha * nchw).astype(np.float32)) for alpha in ALPHAS]
    out["integrated_gradients"] = nchw * np.mean(steps, axis=0)
    if case.module is not None:
        session = case.session(root)
        cam_values = session.run([found["cam_output"]], {found["input"]["name"]: x})[0]
        out["gradcam"] = torch_grad_cam(case.module, x, targets, cam_values,
                                        found["token_grid"])
    return out


METHODS: dict[str, tuple[int, dict[str, object]]] = {
    "vanilla_gradient": (pb.METHOD_VANILLA_GRADIENT, {}),
    "input_x_gradient": (pb.METHOD_INPUT_X_GRADIENT, {}),
    "integrated_gradients": (pb.METHOD_INTEGRATED_GRADIENTS, {
        "integrated_gradients": pb.IntegratedGradientsParams(
            steps=IG_STEPS, baseline=pb.BASELINE_ZERO, rule=pb.QUADRATURE_RIEMANN_MIDDLE)}),
    "gradcam": (pb.METHOD_GRADCAM, {}),
}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_and_grad_cam_equal_the_source_frameworks(
        name: str, cases: dict[str, Case], root: Path, stub: pb_grpc.ExplainerStub,
        keras_answers: dict[str, np.ndarray]) -> None:
    case = cases[name]
    if name in KERAS:
        x, targets = keras_request(root, name)
    else:
        x = model_inputs(root, name, 3, seed=2)
        reply = explain(stub, name, pb.METHOD_VANILLA_GRADIENT, x)
        targets = np.asarray(reply.targets)
    expected = references(name, case, root, x, targets, keras_answers)
    errors = {}
    for method, reference in expected.items():
        number, params = METHODS[method]
        reply = explain(stub, name, number, x, target=pb.Target(
            per_item=pb.ClassIndices(indices=targets.tolist())), **params)
        errors[method] = relative(tensor_to_array(reply.raw), reference)
    if name in KERAS and (FOLDER / f"{name}_grad.npy").exists():
        stored = np.load(FOLDER / f"{name}_grad.npy")
        # the rebuilt Keras model is the converted one, and our gradient is TensorFlow's
        assert relative(keras_answers[f"{name}/stored"], stored) <= 1e-5
        errors["stored tf gradient"] = relative(expected["vanilla_gradient"],
                                                stored.transpose(0, 3, 1, 2))
    assert ("gradcam" in errors) == bool(manifest(root, name)["cam_output"])
    assert max(errors.values()) <= TOLERANCE, errors
    case.worst_error = max(errors.values())
    case.oracle = ("torch.autograd" if name in TORCH else "tf.GradientTape" if name in KERAS
                   else "the graph's function by hand")


def test_table(cases: dict[str, Case]) -> None:
    """Prints fixture × framework × methods offered × worst gradient error × import time."""
    total = len(registry.handlers())
    lines = ["| fixture | framework | methods offered | worst gradient error (against) | "
             "import (s) |", "| --- | --- | --- | --- | --- |"]
    for name in NAMES:
        case = cases[name]
        error = "—" if case.worst_error is None else f"{case.worst_error:.1e} ({case.oracle})"
        lines.append(f"| {name} | {case.framework} | {case.offered} of {total} | {error} | "
                     f"{case.import_seconds:.1f} |")
    print("\n" + "\n".join(lines))
    assert all(cases[name].import_seconds > 0 for name in NAMES)
