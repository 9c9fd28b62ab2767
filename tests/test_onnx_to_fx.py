"""The ONNX → torch.fx translation (``saliency_service.methods._utils.onnx_to_fx``).

Every translated graph is checked against ONNX Runtime on random inputs at two batch sizes,
and its input gradients against the original model's: torch autograd for torch-made models,
``tf.GradientTape`` for the Keras fixtures (``tests/fixtures/make_keras_fixtures.py``), and
ORT's central differences for graphs built with ``onnx.helper``. The torch-made ResNet also
goes through ``torch_program``'s rewrites.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from saliency_service.methods._utils.onnx_to_fx import (
    GraphProgram,
    UnsupportedGraph,
    to_graph_module,
    unsupported_operators,
)
from tests.models import TinyViT

try:
    from saliency_service.methods._utils import torch_program
except ImportError:  # before the package move
    from handlers import torch_program  # type: ignore[no-redef]

FIXTURES = Path(__file__).parent / "fixtures" / "onnx"
TOLERANCE = 1e-4


def relative(ours: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """Largest difference relative to the reference's scale."""
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) \
        else np.asarray(reference)
    assert ours.shape == reference.shape
    if reference.dtype == np.bool_ or np.issubdtype(reference.dtype, np.integer):
        return float(np.any(ours != reference))
    scale = max(float(np.abs(reference).max(initial=0.0)), 1e-12)
    return float(np.abs(ours.astype(np.float64) - reference).max(initial=0.0)) / scale


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def inputs(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


def assert_matches_ort(model: onnx.ModelProto, shape: Sequence[int],
                       batches: Sequence[int] = (1, 3)) -> tuple[torch.fx.GraphModule, float]:
    """Translates ``model``, compares every output with ORT's; returns the worst error."""
    module = to_graph_module(model)
    runtime = session(model)
    name = runtime.get_inputs()[0].name
    worst = 0.0
    for batch in batches:
        x = inputs([batch, *shape], seed=batch)
        expected = runtime.run(None, {name: x})
        got = module(torch.from_numpy(x))
        assert isinstance(got, tuple) and len(got) == len(expected)
        for ours, reference in zip(got, expected, strict=True):
            worst = max(worst, relative(ours, reference))
    assert worst <= TOLERANCE, worst
    return module, worst


def input_gradient(function: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                   x: torch.Tensor) -> torch.Tensor:
    """d Σ_i out0[i, argmax out0[i]] / dx, the way the service's gradient methods pick."""
    leaf = x.clone().requires_grad_(True)
    outputs = function(leaf)
    scores = outputs[0] if isinstance(outputs, tuple | list) else outputs
    top = scores.gather(1, scores.argmax(1, keepdim=True)).sum()
    (gradient,) = torch.autograd.grad(top, leaf)
    return gradient


def assert_like_torch(module: torch.fx.GraphModule, original: nn.Module,
                      shape: Sequence[int], batches: Sequence[int] = (1, 3)) -> float:
    worst = 0.0
    for batch in batches:
        x = torch.from_numpy(inputs([batch, *shape], seed=10 + batch))
        with torch.no_grad():
            expected, got = original(x), module(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for ours, reference in zip(got, expected, strict=True):
            worst = max(worst, relative(ours, reference))
        worst = max(worst, relative(input_gradient(module, x), input_gradient(original, x)))
    assert worst <= TOLERANCE, worst
    return worst


def export(model: nn.Module, folder: Path, shape: Sequence[int], dynamo: bool,
           outputs: Sequence[str] = ("logits",), preserve_batch_norm: bool = False) -> Path:
    """``torch.onnx.export`` with a free batch; the dynamo exporter writes external data."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if dynamo:
        example = torch.randn(2, *shape)  # batch 1 would be specialised
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                          output_names=list(outputs),
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    else:
        example = torch.randn(1, *shape)
        training = torch.onnx.TrainingMode.PRESERVE if preserve_batch_norm \
            else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=list(outputs),
                          dynamic_axes={"input": {0: "batch"}}, training=training)
    return path


# --------------------------------------------------------------------------- torch models


class Block(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        source = channels if stride == 1 else channels // 2
        self.conv1 = nn.Conv2d(source, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.skip = None if stride == 1 else nn.Sequential(
            nn.Conv2d(source, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class ResNetish(nn.Module):
    """Logits plus two feature maps, as the service's packages lay their outputs out."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2 = Block(8), Block(16, 2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.pool(F.relu(self.bn(self.stem(x))))
        scale_0 = self.layer1(x)
        scale_1 = self.layer2(scale_0)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(scale_1, 1), 1))
        return logits, scale_0, scale_1


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(pooled))))


class MobileNetish(nn.Module):
    """Depthwise (dilated) and grouped convolutions, HardSwish, HardSigmoid, ReLU6."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=8),
                                       nn.BatchNorm2d(8), nn.ReLU6())
        self.excite = SqueezeExcite(8)
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.grouped = nn.Conv2d(16, 16, 3, 2, 1, groups=4)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.Hardswish(), nn.Dropout(0.2),
                                  nn.Linear(12, classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        x = x + self.excite(self.depthwise(x))
        features = F.hardswish(self.grouped(self.pointwise(x)))
        return self.head(F.adaptive_avg_pool2d(features, 1).flatten(1)), features


def trained(cls: type[nn.Module], shape: Sequence[int], seed: int = 0) -> nn.Module:
    """Seeded weights, BatchNorm statistics from a few training-mode batches, then eval."""
    torch.manual_seed(seed)
    model = cls()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape) * 2 + 0.5)
    return model.eval()


RESNET_SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return trained(ResNetish, RESNET_SHAPE)


@pytest.fixture(scope="module")
def resnet_exports(resnet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resnet")
    outputs = ("logits", "scale_0", "scale_1")
    return {
        "legacy": export(resnet, root / "legacy", RESNET_SHAPE, False, outputs),
        "legacy_batch_norm": export(resnet, root / "bn", RESNET_SHAPE, False, outputs,
                                    preserve_batch_norm=True),
        "dynamo": export(resnet, root / "dynamo", RESNET_SHAPE, True, outputs),
    }


@pytest.mark.parametrize("variant", ["legacy", "legacy_batch_norm", "dynamo"])
def test_resnet_matches_ort_and_torch_gradients(variant: str, resnet: nn.Module,
                                                resnet_exports: dict) -> None:
    path = resnet_exports[variant]
    if variant == "dynamo":  # the default exporter keeps the weights beside the graph
        assert (path.parent / "model.onnx.data").exists()
    model = onnx.load(str(path))
    if variant == "legacy_batch_norm":
        assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    module, _ = assert_matches_ort(model, RESNET_SHAPE)
    assert_like_torch(module, resnet, RESNET_SHAPE)
    assert all(not b.requires_grad for b in module.buffers())
    assert not list(module.parameters())


def test_resnet_graph_uses_the_aten_ops_the_rewrites_expect(resnet_exports: dict) -> None:
    module = to_graph_module(onnx.load(str(resnet_exports["legacy_batch_norm"])))
    targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.conv2d.default, torch.ops.aten.batch_norm.default,
            torch.ops.aten.relu.default, torch.ops.aten.add.Tensor} <= targets
    for node in module.graph.nodes:  # names are ours, never the file's
        assert node.name.isidentifier() and "onnx::" not in node.name


def test_resnet_meta_val_has_a_free_batch(resnet_exports: dict) -> None:
    module = to_graph_module(onnx.load(str(resnet_exports["legacy"])))
    (placeholder,) = [n for n in module.graph.nodes if n.op == "placeholder"]
    batch = placeholder.meta["val"].shape[0]
    assert not isinstance(batch, int)
    convs = [n for n in module.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert convs and all(str(n.meta["val"].shape[0]) == str(batch) for n in convs)
    assert list(convs[0].meta["val"].shape[1:]) == [8, 32, 32]


def test_resnet_rewrites_keep_outputs(resnet: nn.Module, resnet_exports: dict) -> None:
    module = to_graph_module(onnx.load(str(resnet_exports["legacy_batch_norm"])))
    x = torch.from_numpy(inputs([4, *RESNET_SHAPE], seed=5))
    with torch.no_grad():
        expected = resnet(x)

    guided = copy.deepcopy(module)
    assert torch_program.fold_batch_norms(guided) == 6
    assert torch_program.replace_relus(guided) == 5
    assert torch_program.compute_in_place(guided) > 0
    torch_program.to_channels_last(guided)
    guided.recompile()
    got = guided(x.contiguous(memory_format=torch.channels_last))
    assert max(relative(o, e) for o, e in zip(got, expected, strict=True)) <= TOLERANCE
    guided_gradient = input_gradient(guided, x)
    assert (guided_gradient != input_gradient(resnet, x)).any()  # guided ReLUs are in use

    cut = copy.deepcopy(module)
    torch_program.fold_batch_norms(cut)
    torch_program.cut_at_output(cut, "scale_1")
    torch_program.to_channels_last(cut)
    cut.recompile()
    got = cut(x)
    assert got[2].is_leaf and got[2].requires_grad
    assert max(relative(o, e) for o, e in zip(got, expected, strict=True)) <= TOLERANCE
    (cam_gradient,) = torch.autograd.grad(got[0][:, 0].sum(), got[2])
    assert cam_gradient.shape == got[2].shape

    fast = copy.deepcopy(module)
    torch_program.fold_batch_norms(fast)
    fast.recompile()
    trunk, stem = torch_program.split_at_stem(fast)
    got = trunk(stem(x))
    assert max(relative(o, e) for o, e in zip(got, expected, strict=True)) <= TOLERANCE


@pytest.mark.parametrize("variant", ["fast", "guided", "cut:scale_0", "trunk"])
def test_build_variant_takes_the_translation(variant: str, resnet: nn.Module,
                                             resnet_exports: dict) -> None:
    """``GraphProgram`` stands where ``build_variant`` expects a torch.export program."""
    program = GraphProgram(to_graph_module(onnx.load(str(resnet_exports["legacy_batch_norm"]))))
    prepared = torch_program.build_variant(program, variant, ("scale_0", "scale_1"))
    x = torch.from_numpy(inputs([2, *RESNET_SHAPE], seed=8))
    with torch.no_grad():
        expected = resnet(x)
        got = prepared(prepared.stem(x)) if variant == "trunk" else prepared(x)
    assert max(relative(o, e) for o, e in zip(got, expected, strict=True)) <= TOLERANCE
    if variant == "fast":  # in-place ReLUs and adds keep the gradients right
        assert relative(input_gradient(prepared, x), input_gradient(resnet, x)) <= TOLERANCE
        # BatchNorm folded away, the original untouched
        targets = {n.target for n in prepared.graph_module.graph.nodes}
        assert torch.ops.aten.batch_norm.default not in targets
        assert torch.ops.aten.batch_norm.default in {
            n.target for n in program.graph_module.graph.nodes}


MOBILE_SHAPE = (3, 32, 32)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_mobilenet_like(dynamo: bool, tmp_path: Path) -> None:
    original = trained(MobileNetish, MOBILE_SHAPE)
    path = export(original, tmp_path, MOBILE_SHAPE, dynamo, ("logits", "scale_0"))
    model = onnx.load(str(path))
    assert {"HardSwish", "HardSigmoid"} <= {n.op_type for n in model.graph.node}
    module, _ = assert_matches_ort(model, MOBILE_SHAPE)
    assert_like_torch(module, original, MOBILE_SHAPE)


VIT_SHAPE = (3, 16, 16)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_tiny_vit(dynamo: bool, tmp_path: Path) -> None:
    """Both exporters keep the batch free here (the dynamo one from a batch-2 example:
    exporting from batch 1 fixes the batch at 1, for ORT and for us alike)."""
    original = trained(TinyViT, VIT_SHAPE)
    model = onnx.load(str(export(original, tmp_path, VIT_SHAPE, dynamo)))
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "MatMul", "Softmax"} <= ops
    module, _ = assert_matches_ort(model, VIT_SHAPE)
    assert_like_torch(module, original, VIT_SHAPE)


# --------------------------------------------------------------------------- files


def _fixture_shapes(model: onnx.ModelProto) -> tuple[list[int], tuple[int, ...]]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    rest = [d.dim_value if d.HasField("dim_value") else 24 for d in dims[1:]]
    fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
    return rest, (fixed,) if fixed else (1, 3)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.onnx")), ids=lambda p: p.stem)
def test_fixture_files_match_ort(path: Path) -> None:
    model = onnx.load(str(path))
    shape, batches = _fixture_shapes(model)
    assert_matches_ort(model, shape, batches)


@pytest.mark.parametrize("name", ["keras_separable", "keras_mixed"])
def test_keras_gradients_match_tensorflow(name: str) -> None:
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    assert model.producer_name == "tf2onnx"
    module = to_graph_module(model)
    x = torch.from_numpy(np.load(FIXTURES / f"{name}_input.npy"))
    expected = np.load(FIXTURES / f"{name}_grad.npy")
    assert relative(input_gradient(module, x), expected) <= TOLERANCE


# --------------------------------------------------------------------------- onnx.helper graphs


def make_model(nodes: list[onnx.NodeProto], shape: Sequence[int | str],
               initializers: Sequence[tuple[str, np.ndarray]] = (),
               opset: int = 17, outputs: Sequence[str] = ("y",)) -> onnx.ModelProto:
    """A graph on input ``x`` of ``shape`` (batch "N" first) with outputs of any type."""
    tensors = [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers]
    graph = helper.make_graph(
        nodes, "case", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return model


def directional_gradient_error(model: onnx.ModelProto, module: torch.fx.GraphModule,
                               shape: Sequence[int], step: float = 1e-3) -> float:
    """Autograd's derivative of Σ w·y along a random direction vs ORT's central difference."""
    rng = np.random.default_rng(7)
    x = inputs([2, *shape], seed=3)
    direction = rng.normal(0, 1, x.shape).astype(np.float32)
    runtime = session(model)
    name = runtime.get_inputs()[0].name
    leaf = torch.from_numpy(x).requires_grad_(True)
    outputs = [o for o in module(leaf) if o.is_floating_point()]
    weights = [torch.from_numpy(rng.normal(0, 1, o.shape).astype(np.float32)) for o in outputs]
    total = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    (gradient,) = torch.autograd.grad(total, leaf)
    analytic = float((gradient.double() * torch.from_numpy(direction).double()).sum())

    def weighted(point: np.ndarray) -> float:
        results = [r for r in runtime.run(None, {name: point})
                   if np.issubdtype(r.dtype, np.floating)]
        return sum(float((r.astype(np.float64) * w.double().numpy()).sum())
                   for r, w in zip(results, weights, strict=True))

    numeric = (weighted(x + step * direction) - weighted(x - step * direction)) / (2 * step)
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-3)


def test_helper_graph_with_resize_pad_slice_split_reduce_clip_gemm_where() -> None:
    """One graph through the ops tf and torch exporters emit around the convolutions."""
    rng = np.random.default_rng(0)
    c = 3
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Resize", ["padded", "", "scales"], ["up"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Conv", ["up", "w"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Slice", ["conv", "starts", "ends", "axes", "steps"], ["sliced"]),
        helper.make_node("Split", ["sliced", "split"], ["left", "right"], axis=1),
        helper.make_node("Clip", ["left", "low", "high"], ["clipped"]),
        helper.make_node("Concat", ["clipped", "right", "sliced"], ["joined"], axis=1),
        helper.make_node("ReduceMean", ["joined"], ["mean"], axes=[2], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["logits"], transB=1, alpha=0.5),
        helper.make_node("Greater", ["logits", "zero"], ["positive"]),
        helper.make_node("Mul", ["logits", "tenth"], ["scaled"]),
        helper.make_node("Where", ["positive", "logits", "scaled"], ["y"]),
    ]
    initializers = [
        ("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)),
        ("scales", np.array([1, 1, 1.5, 1.5], np.float32)),
        ("w", rng.normal(0, 0.3, (6, c, 3, 3)).astype(np.float32)),
        ("starts", np.array([-1, 1], np.int64)),
        ("ends", np.array([-(2**63), 2**63 - 1], np.int64)),
        ("axes", np.array([2, 3], np.int64)),
        ("steps", np.array([-1, 2], np.int64)),
        ("split", np.array([2, 4], np.int64)),
        ("low", np.array(-0.5, np.float32)),
        ("high", np.array(0.7, np.float32)),
        ("fc", rng.normal(0, 0.5, (4, 12 * 5)).astype(np.float32)),
        ("bias", rng.normal(0, 0.1, (4,)).astype(np.float32)),
        ("zero", np.array(0.0, np.float32)),
        ("tenth", np.array(0.1, np.float32)),
    ]
    shape = (c, 10, 10)
    model = make_model(nodes, shape, initializers)
    module, _ = assert_matches_ort(model, shape)
    assert directional_gradient_error(model, module, shape) < 1e-2


def _node(op: str, inputs: Sequence[str] = ("x",), outputs: Sequence[str] = ("y",),
          **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


_R = np.random.default_rng(1)
_W = _R.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
_S = (3, 8, 8)

# id: (nodes, initializers, opset, input shape without batch, check gradients)
CASES: dict[str, tuple] = {
    "conv_asymmetric_pads": ([_node("Conv", ["x", "w"], pads=[0, 1, 2, 1])], [("w", _W)]),
    "conv_same_upper_stride2": ([_node("Conv", ["x", "w"], auto_pad="SAME_UPPER",
                                       strides=[2, 2])], [("w", _W)]),
    "conv_same_lower": ([_node("Conv", ["x", "w"], auto_pad="SAME_LOWER", strides=[2, 1])],
                        [("w", _W)]),
    "conv_dilated_bias": ([_node("Conv", ["x", "w", "b"], dilations=[2, 1], pads=[2, 1, 2, 1])],
                          [("w", _W), ("b", _f32(1, 2, 3, 4))]),
    "conv_1d_grouped": ([_node("Conv", ["x", "w", "b"], group=3, pads=[1, 2])],
                        [("w", _R.normal(0, 1, (6, 1, 3)).astype(np.float32)),
                         ("b", _f32(*range(6)))], 17, (3, 9)),
    "conv_transpose": ([_node("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 0, 0, 1],
                              output_padding=[1, 1])],
                       [("w", _R.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)),
                        ("b", _f32(0.5, -0.5))]),
    # output_shape: ONNX Runtime pads the start by total − total // 2 (the spec's rule), and
    # an output one row larger than the full result gets a last row of bias.
    "conv_transpose_output_shape": (
        [_node("ConvTranspose", ["x", "w", "b"], strides=[2, 2], output_shape=[16, 15])],
        [("w", _R.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)), ("b", _f32(0.5, -0.5))]),
    "conv_transpose_output_shape_larger": (
        [_node("ConvTranspose", ["x", "w", "b"], strides=[2, 2], output_shape=[18, 17],
               output_padding=[0, 1])],
        [("w", _R.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)), ("b", _f32(0.5, -0.5))]),
    "conv_transpose_grouped": ([_node("ConvTranspose", ["x", "w"], group=3, strides=[2, 2])],
                               [("w", _R.normal(0, 1, (3, 2, 2, 2)).astype(np.float32))]),
    "max_pool_ceil_pads": ([_node("MaxPool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1], ceil_mode=1)], [], 17, (3, 9, 9)),
    "max_pool_asymmetric": ([_node("MaxPool", kernel_shape=[2, 3], pads=[0, 1, 1, 2],
                                   dilations=[1, 2])], []),
    "max_pool_same_upper": ([_node("MaxPool", kernel_shape=[3, 3], strides=[2, 2],
                                   auto_pad="SAME_UPPER")], []),
    "avg_pool_exclude_pad": ([_node("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                    strides=[2, 2])], []),
    "avg_pool_asymmetric_exclude": ([_node("AveragePool", kernel_shape=[3, 2],
                                           pads=[0, 1, 2, 0], strides=[2, 2])], []),
    "avg_pool_asymmetric_include": ([_node("AveragePool", kernel_shape=[3, 3],
                                           pads=[0, 1, 1, 0], count_include_pad=1)], []),
    "avg_pool_ceil": ([_node("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
                      [], 17, (3, 7, 7)),
    "avg_pool_same_upper": ([_node("AveragePool", kernel_shape=[2, 2], strides=[2, 2],
                                   auto_pad="SAME_UPPER")], [], 17, (3, 7, 7)),
    "global_max_pool": ([_node("GlobalMaxPool")], []),
    "lrn": ([_node("LRN", size=3, alpha=1e-2, beta=0.75, bias=2.0)], []),
    "batch_norm": ([_node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
                   [("s", _f32(1, 2, 0.5)), ("b", _f32(0, 1, -1)), ("m", _f32(0.1, 0, -0.2)),
                    ("v", _f32(1, 0.5, 2))]),
    "instance_norm": ([_node("InstanceNormalization", ["x", "s", "b"])],
                      [("s", _f32(1, 2, 0.5)), ("b", _f32(0, 1, -1))]),
    "layer_norm_axis1": ([_node("LayerNormalization", ["x", "s", "b"], axis=1)],
                         [("s", _R.normal(1, 0.1, _S).astype(np.float32)),
                          ("b", _R.normal(0, 0.1, _S).astype(np.float32))]),
    "layer_norm_no_bias": ([_node("LayerNormalization", ["x", "s"], axis=-1)],
                           [("s", _R.normal(1, 0.1, (8,)).astype(np.float32))]),
    "softmax_opset11_axis1": ([_node("Softmax", axis=1)], [], 11),
    "log_softmax_opset11_last": ([_node("LogSoftmax", axis=3)], [], 11),
    "softmax_opset13_axis1": ([_node("Softmax", axis=1)], []),
    "resize_nearest_asymmetric_floor": (
        [_node("Resize", ["x", "", "scales"], mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
        [("scales", _f32(1, 1, 2, 1.5))]),
    "resize_nearest_half_pixel_down": (
        [_node("Resize", ["x", "", "", "sizes"], mode="nearest", axes=[2, 3])],
        [("sizes", _i64(5, 3))], 18, _S, False),
    "resize_nearest_tf_half_pixel_ceil": (
        [_node("Resize", ["x", "", "scales"], mode="nearest",
               coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode="ceil")],
        [("scales", _f32(1, 1, 1.5, 2))]),
    "resize_linear_half_pixel": (
        [_node("Resize", ["x", "", "scales"], mode="linear")], [("scales", _f32(1, 1, 1.5, 2))]),
    "resize_linear_align_corners": (
        [_node("Resize", ["x", "", "", "sizes"], mode="linear", axes=[2, 3],
               coordinate_transformation_mode="align_corners")], [("sizes", _i64(11, 5))], 18),
    "resize_linear_asymmetric": (
        [_node("Resize", ["x", "", "scales"], mode="linear",
               coordinate_transformation_mode="asymmetric")], [("scales", _f32(1, 1, 2, 0.5))]),
    "resize_linear_pytorch_half_pixel": (
        [_node("Resize", ["x", "", "", "sizes"], mode="linear",
               coordinate_transformation_mode="pytorch_half_pixel", axes=[-2, -1])],
        [("sizes", _i64(16, 1))], 18),
    "resize_cubic": ([_node("Resize", ["x", "", "scales"], mode="cubic")],
                     [("scales", _f32(1, 1, 2, 1.5))]),
    "resize_cubic_exclude_outside": (
        [_node("Resize", ["x", "", "", "sizes"], mode="cubic", exclude_outside=1,
               cubic_coeff_a=-0.5, coordinate_transformation_mode="align_corners",
               axes=[2, 3])],
        [("sizes", _i64(12, 10))], 18),
    "resize_axes_opset18": ([_node("Resize", ["x", "", "scales"], mode="linear", axes=[3, 2])],
                            [("scales", _f32(2, 1.5))], 18),
    "resize_runtime_sizes": (
        [_node("Shape", ["x"], ["shape"]), _node("Mul", ["shape", "twice"], ["sizes"]),
         _node("Max", ["sizes", "ones"], ["sizes1"]), _node("Div", ["sizes1", "fix"], ["sz"]),
         _node("Resize", ["x", "", "", "sz"], mode="linear")],
        [("twice", _i64(1, 1, 2, 2)), ("ones", _i64(1, 1, 1, 1)), ("fix", _i64(1, 1, 1, 1))]),
    # ONNX Runtime computes Resize coordinates and output sizes in float32: 1.5 / 0.6f lands
    # on 2.0 and picks pixel 2 (1 in float64), and 0.7f × 10 rounds to 7 rows (6 in float64).
    "resize_nearest_half_pixel_floor_float32": (
        [_node("Resize", ["x", "", "scales"], mode="nearest", nearest_mode="floor")],
        [("scales", _f32(1, 1, 0.5, 0.6))], 17, (3, 5, 7)),
    "resize_nearest_output_size_float32": (
        [_node("Resize", ["x", "", "scales"], mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
        [("scales", _f32(1, 1, 1, 0.7))], 17, (3, 4, 10)),
    "resize_keeping_the_shape_copies": (  # 1.06f × 10 is 10 rows: ONNX Runtime copies
        [_node("Resize", ["x", "", "scales"], mode="nearest")],
        [("scales", _f32(1, 1, 1.06, 1))], 17, (3, 10, 9)),
    "resize_linear_output_size_float32": (
        [_node("Resize", ["x", "", "scales"], mode="linear")],
        [("scales", _f32(1, 1, 1, 0.7))], 17, (3, 4, 10)),
    "upsample_opset9": ([_node("Upsample", ["x", "scales"], mode="nearest")],
                        [("scales", _f32(1, 1, 2, 3))], 9),
    "pad_reflect": ([_node("Pad", ["x", "pads"], mode="reflect")],
                    [("pads", _i64(0, 0, 2, 1, 0, 0, 1, 3))]),
    "pad_edge": ([_node("Pad", ["x", "pads"], mode="edge")],
                 [("pads", _i64(0, 0, 2, 1, 0, 0, 1, 3))]),
    "pad_reflect_last_axis": ([_node("Pad", ["x", "pads"], mode="reflect")],
                              [("pads", _i64(0, 0, 0, 2, 0, 0, 0, 1))]),
    "pad_edge_channels": ([_node("Pad", ["x", "pads"], mode="edge")],
                          [("pads", _i64(0, 1, 0, 1, 0, 2, 1, 0))]),
    "pad_reflect_crop": ([_node("Pad", ["x", "pads"], mode="reflect")],
                         [("pads", _i64(0, 0, -1, 2, 0, 0, 2, -3))]),
    "pad_wrap_opset19": ([_node("Pad", ["x", "pads"], mode="wrap")],
                         [("pads", _i64(0, 0, 1, 3, 0, 0, 2, 0))], 19),
    "pad_constant_crop": ([_node("Pad", ["x", "pads", "v"])],
                          [("pads", _i64(0, 1, -1, 2, 0, 0, 1, -2)), ("v", _f32(0.5).reshape(()))]),
    "pad_axes_opset18": ([_node("Pad", ["x", "pads", "", "axes"])],
                         [("pads", _i64(1, 2, 3, 0)), ("axes", _i64(-1, 1))], 18),
    "pad_opset2_attrs": ([_node("Pad", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=1.0)], [], 10),
    "slice_negative_steps": ([_node("Slice", ["x", "s", "e", "a", "t"])],
                             [("s", _i64(-1, 6)), ("e", _i64(-(2**63), 1)), ("a", _i64(1, -1)),
                              ("t", _i64(-1, -2))]),
    "slice_opset9_attrs": ([_node("Slice", starts=[1, 0], ends=[100, -1], axes=[2, 3])], [], 9),
    "slice_runtime_ends": ([_node("Shape", ["x"], ["shape"]),
                            _node("Gather", ["shape", "i"], ["h"]),
                            _node("Sub", ["h", "one"], ["end"]),
                            _node("Slice", ["x", "start", "end", "axes"])],
                           [("i", _i64(2)), ("one", _i64(1)), ("start", _i64(1)),
                            ("axes", _i64(2))]),
    "split_input": ([_node("Split", ["x", "split"], ["a", "b"], axis=2),
                     _node("Slice", ["b", "s", "e", "ax"], ["b2"]),
                     _node("Add", ["a", "b2"], ["y"])],
                    [("split", _i64(3, 5)), ("s", _i64(0)), ("e", _i64(3)), ("ax", _i64(2))]),
    "split_num_outputs": ([_node("Split", ["x"], ["a", "b", "y"], axis=3, num_outputs=3)], [],
                          18),
    "split_equal_opset11": ([_node("Split", ["x"], ["a", "y"], axis=2)], [], 11),
    "gather_indices_2d": ([_node("Gather", ["x", "i"], axis=2)],
                          [("i", _i64(0, -1, 3, 2).reshape(2, 2))]),
    "gather_scalar_negative_axis": ([_node("Gather", ["x", "i"], axis=-1)], [("i", np.array(-2))]),
    "gather_elements": ([_node("GatherElements", ["x", "i"], axis=1)],
                        [("i", _R.integers(-3, 3, (1, 2, 8, 8)).astype(np.int64))], 17, _S),
    "squeeze_unsqueeze_opset11": ([_node("Unsqueeze", ["x"], ["u"], axes=[0, -1]),
                                   _node("Squeeze", ["u"], ["y"], axes=[0])], [], 11),
    "squeeze_unsqueeze_opset13": ([_node("Unsqueeze", ["x", "a"], ["u"]),
                                   _node("Squeeze", ["u", "b"], ["y"])],
                                  [("a", _i64(-1, 1)), ("b", _i64(1))]),
    "expand_runtime": ([_node("Shape", ["x"], ["shape"]),
                        _node("Expand", ["row", "shape"], ["e"]), _node("Mul", ["x", "e"])],
                       [("row", _R.normal(0, 1, (1, 8)).astype(np.float32))]),
    "expand_constant": ([_node("Expand", ["x", "shape"])], [("shape", _i64(2, 1, 1, 1, 1))]),
    "tile": ([_node("Tile", ["x", "r"])], [("r", _i64(1, 2, 1, 3))]),
    "range_constant_of_shape": ([_node("Shape", ["x"], ["shape"], start=-1),
                                 _node("ConstantOfShape", ["shape"], ["zeros"],
                                       value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2])),
                                 _node("Range", ["lo", "hi", "dt"], ["r"]),
                                 _node("Add", ["zeros", "r"], ["zr"]),
                                 _node("Mul", ["x", "zr"])],
                                [("lo", np.array(1.0, np.float32)),
                                 ("hi", np.array(4.8, np.float32)),
                                 ("dt", np.array(0.5, np.float32))]),
    "where_compare_logic": ([_node("Greater", ["x", "z"], ["g"]), _node("Less", ["x", "h"], ["l"]),
                             _node("And", ["g", "l"], ["both"]), _node("Not", ["both"], ["n"]),
                             _node("Equal", ["n", "t"], ["e"]),
                             _node("Neg", ["x"], ["neg"]),
                             _node("Where", ["e", "x", "neg"], ["y"])],
                            [("z", _f32(0)), ("h", _f32(0.5)), ("t", np.array([True]))]),
    "argmax_argmin": ([_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0),
                       _node("ArgMin", ["x"], ["z"], axis=-1)], [], 17, _S, False, ("y", "z")),
    "einsum": ([_node("Einsum", ["x", "w"], equation="nchw,dc->ndhw")],
               [("w", _R.normal(0, 1, (5, 3)).astype(np.float32))]),
    "depth_to_space_dcr_crd": ([_node("DepthToSpace", ["x"], ["a"], blocksize=2),
                                _node("DepthToSpace", ["x"], ["b"], blocksize=2, mode="CRD"),
                                _node("Sub", ["a", "b"])], [], 17, (8, 4, 4)),
    "space_to_depth": ([_node("SpaceToDepth", blocksize=2)], []),
    "reduce_family": ([_node("ReduceSum", ["x", "ax"], ["a"], keepdims=0),
                       _node("ReduceMax", ["x"], ["b"], axes=[1, 3]),
                       _node("ReduceMin", ["x"], ["c"], axes=[-1], keepdims=0),
                       _node("ReduceL2", ["x"], ["d"], axes=[2]),
                       _node("ReduceL1", ["x"], ["e"]),
                       _node("ReduceLogSumExp", ["x"], ["f"], axes=[1]),
                       _node("ReduceProd", ["x"], ["g"], axes=[1], keepdims=0),
                       _node("ReduceSumSquare", ["x"], ["h"], axes=[2, 3]),
                       _node("ReduceMean", ["x"], ["i"], keepdims=0)],
                      [("ax", _i64(1, 2))], 17, _S, True, tuple("abcdefghi")),
    "reduce_noop_empty_axes_opset18": ([_node("ReduceMean", ["x", "ax"], noop_with_empty_axes=1)],
                                       [("ax", np.zeros(0, np.int64))], 18),
    "activations": ([_node("LeakyRelu", ["x"], ["a"], alpha=0.2), _node("Elu", ["a"], ["b"]),
                     _node("Selu", ["b"], ["c"]), _node("Softplus", ["c"], ["d"]),
                     _node("HardSigmoid", ["d"], ["e"], alpha=0.3),
                     _node("HardSwish", ["x"], ["f"]),
                     _node("Mul", ["e", "f"], ["g"]), _node("Tanh", ["g"], ["h"]),
                     _node("Sigmoid", ["h"], ["i"]), _node("Erf", ["x"], ["j"]),
                     _node("Celu", ["j"], ["k"], alpha=0.5), _node("Softsign", ["k"], ["l"]),
                     _node("Sum", ["i", "l", "x"], ["y"])], []),
    "gelu_opset20": ([_node("Gelu", ["x"], ["a"]), _node("Gelu", ["x"], ["b"], approximate="tanh"),
                      _node("Add", ["a", "b"])], [], 20),
    "prelu": ([_node("PRelu", ["x", "s"])], [("s", _f32(0.1, -0.2, 0.3).reshape(3, 1, 1))]),
    "clip_inputs_and_attrs": ([_node("Clip", ["x", "lo", ""], ["a"]),
                               _node("Clip", ["a", "", "hi"], ["y"])],
                              [("lo", np.array(-0.3, np.float32)),
                               ("hi", np.array(0.4, np.float32))]),
    "clip_opset6": ([_node("Clip", min=-0.2, max=0.6)], [], 6, _S, False),
    "math": ([_node("Abs", ["x"], ["a"]), _node("Add", ["a", "one"], ["b"]),
              _node("Log", ["b"], ["c"]), _node("Sqrt", ["b"], ["d"]), _node("Exp", ["c"], ["e"]),
              _node("Reciprocal", ["d"], ["f"]), _node("Pow", ["f", "two"], ["g"]),
              _node("Pow", ["b", "x"], ["h"]), _node("Div", ["g", "h"], ["i"]),
              _node("Sub", ["i", "e"], ["j"]), _node("Max", ["j", "x", "row"], ["k"]),
              _node("Min", ["k", "c"], ["l"]), _node("Mean", ["l", "x"], ["y"])],
             [("one", _f32(1)), ("two", np.array(2.0, np.float32)),
              ("row", _R.normal(0, 1, (8,)).astype(np.float32))]),
    "gemm_trans_alpha_beta": ([_node("Flatten", ["x"], ["f"], axis=1),
                               _node("Transpose", ["f"], ["ft"]),
                               _node("Gemm", ["ft", "w", "c"], transA=1, alpha=0.5, beta=2.0)],
                              [("w", _R.normal(0, 0.1, (192, 5)).astype(np.float32)),
                               ("c", _R.normal(0, 1, (1, 5)).astype(np.float32))]),
    "matmul_broadcast": ([_node("MatMul", ["x", "w"])],
                         [("w", _R.normal(0, 1, (8, 5)).astype(np.float32))]),
    "cast_flatten_reshape": ([_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
                              _node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                              _node("Add", ["x", "f"], ["s"]),
                              _node("Flatten", ["s"], ["fl"], axis=2),
                              _node("Reshape", ["fl", "shape"], ["r"]),
                              _node("Flatten", ["r"], ["y"], axis=0)],
                             [("shape", _i64(0, -1, 4))], 17, _S, False),
    "cumsum_exclusive_reverse": ([_node("CumSum", ["x", "ax"], exclusive=1, reverse=1)],
                                 [("ax", np.array(2, np.int64))]),
    "shape_size_outputs": ([_node("Shape", ["x"], ["y"], start=1, end=-1),
                            _node("Size", ["x"], ["z"])],
                           [], 17, _S, False, ("y", "z")),
    "dropout_identity": ([_node("Dropout", ["x", "r"], ["a"]), _node("Identity", ["a"])],
                         [("r", np.array(0.5, np.float32))]),
    "constants": ([_node("Constant", [], ["c"], value_floats=[float(i) for i in range(1, 9)]),
                   _node("Constant", [], ["d"], value=numpy_helper.from_array(
                       np.arange(8, dtype=np.float64), "d")),
                   _node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
                   _node("Mul", ["x", "c"], ["m"]), _node("Add", ["m", "df"])], []),
    "double_initializer": ([_node("Cast", ["w"], ["f"], to=TensorProto.FLOAT),
                            _node("Mul", ["x", "f"])],
                           [("w", _R.normal(0, 1, (8,)).astype(np.float64))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_against_ort(case: str) -> None:
    nodes, initializers, *rest = CASES[case]
    opset = rest[0] if rest else 17
    shape = rest[1] if len(rest) > 1 else _S
    check_gradient = rest[2] if len(rest) > 2 else True
    outputs = rest[3] if len(rest) > 3 else ("y",)
    model = make_model(nodes, shape, initializers, opset, outputs)
    module, _ = assert_matches_ort(model, shape)
    if check_gradient:
        assert directional_gradient_error(model, module, shape) < 1e-2


# --------------------------------------------------------------------------- refusals


def test_unsupported_operators_are_all_named() -> None:
    body = helper.make_graph([], "body", [], [])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("NonMaxSuppression", ["a"], ["b"]),
        helper.make_node("Loop", ["", ""], ["c"], body=body),
        helper.make_node("FusedConv", ["a"], ["d"], domain="com.microsoft"),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    model = make_model(nodes, _S)
    assert unsupported_operators(model) == ["Loop", "NonMaxSuppression", "com.microsoft.FusedConv"]
    with pytest.raises(UnsupportedGraph, match=r"operators not supported for gradients: Loop, "
                       r"NonMaxSuppression, com\.microsoft\.FusedConv"):
        to_graph_module(model)
    assert unsupported_operators(make_model([_node("Relu")], _S)) == []


def test_unsupported_attributes_are_all_named() -> None:
    nodes = [_node("Resize", ["x", "", "scales"], ["a"], mode="linear",
                   coordinate_transformation_mode="tf_crop_and_resize"),
             _node("Gelu", ["x"], ["b"], approximate="fast"),
             _node("Pad", ["x", "pads"], ["c"], mode="mirror"),
             _node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, _S, [("scales", _f32(1, 1, 2, 2)), ("pads", _i64(0, 0, 1, 1) * 2)],
                       opset=20)
    with pytest.raises(UnsupportedGraph) as raised:
        to_graph_module(model)
    message = str(raised.value)
    assert "tf_crop_and_resize" in message and "approximate='fast'" in message
    assert "mode='mirror'" in message


@pytest.mark.parametrize("nodes", [
    [helper.make_node("Conv", ["x", "w"], ["y"], strides=[1.5, 1.5])],
    [helper.make_node("Transpose", ["x"], ["y"], perm=["a", "b"])],
    [helper.make_node("Conv", ["x"], ["y"])],
    [helper.make_node("Relu", ["nowhere"], ["y"])],
    [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1])],
    [helper.make_node("Gemm", ["x", "w"], ["y"])],
    [helper.make_node("Constant", [], ["y"], value_string="text")],
    [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)],
], ids=["float_strides", "string_perm", "missing_weight", "undefined_input", "short_pads",
        "gemm_on_4d", "string_constant", "cast_to_string"])
def test_malformed_graphs_raise_unsupported_graph(nodes: list[onnx.NodeProto]) -> None:
    model = make_model(nodes, _S, [("w", _W)])
    with pytest.raises(UnsupportedGraph):
        to_graph_module(model)


def test_refuses_absurd_constants() -> None:
    huge = _node("ConstantOfShape", ["shape"], ["big"])
    model = make_model([huge, _node("Add", ["x", "big"])], _S,
                       [("shape", _i64(1 << 20, 1 << 20, 8, 8))])
    with pytest.raises(UnsupportedGraph, match="larger than"):
        to_graph_module(model)
    expand = make_model([_node("Expand", ["one", "shape"], ["big"]), _node("Add", ["x", "big"])],
                        _S, [("one", _f32(1)), ("shape", _i64(1 << 16, 1 << 16, 8, 8))])
    with pytest.raises(UnsupportedGraph, match="bytes"):
        to_graph_module(expand)
    ranged = make_model([_node("Range", ["a", "b", "c"], ["r"]), _node("Add", ["x", "r"])], _S,
                        [("a", np.array(0, np.int64)), ("b", np.array(1 << 40, np.int64)),
                         ("c", np.array(1, np.int64))])
    with pytest.raises(UnsupportedGraph, match="larger than"):
        to_graph_module(ranged)


def test_refuses_external_data_left_on_disk(tmp_path: Path) -> None:
    """A tensor still pointing at a file is never opened by us (paths come from the file)."""
    model = make_model([_node("Mul", ["x", "w"])], _S, [("w", np.ones(8, np.float32))])
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    with pytest.raises(UnsupportedGraph, match="external file"):
        to_graph_module(model)


def test_names_from_the_file_never_reach_the_generated_code() -> None:
    evil = "__import__('os').system('echo pwned')"
    nodes = [helper.make_node("Relu", [evil], ["y; import os"], name=evil)]
    graph = helper.make_graph(
        nodes, evil, [helper.make_tensor_value_info(evil, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y; import os", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = to_graph_module(model)
    assert "import" not in module.code and "system" not in module.code
    x = torch.randn(2, 3)
    assert torch.equal(module(x)[0], torch.relu(x))


def test_a_graph_that_cannot_run_is_refused() -> None:
    model = make_model([_node("Reshape", ["x", "shape"])], _S, [("shape", _i64(0, 7, -1, 5))])
    with pytest.raises(UnsupportedGraph, match="does not run"):
        to_graph_module(model)


def test_fixed_batch_in_the_graph_keeps_static_meta() -> None:
    """A Reshape that writes the batch as 1 runs at batch 1 only, in ORT and here."""
    model = make_model([_node("Reshape", ["x", "shape"])], _S, [("shape", _i64(1, 3, 64))])
    module, _ = assert_matches_ort(model, _S, batches=(1,))
    (placeholder,) = [n for n in module.graph.nodes if n.op == "placeholder"]
    assert list(placeholder.meta["val"].shape) == [1, *_S]


def test_graph_must_take_one_input() -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedGraph, match="one input"):
        to_graph_module(model)


# --------------------------------------------------------------------------- divergence


def _resize_at_a_tie() -> onnx.ModelProto:
    """Relu(Resize(x)) where ONNX Runtime's nearest pixel is not the translation's: asymmetric
    round_prefer_ceil from 7 to 4 columns puts column 2 at 3.5 in exact arithmetic, 3.4999998
    in float32, and ONNX Runtime rounds it up."""
    nodes = [helper.make_node("Resize", ["x", "", "", "sizes"], ["up"], name="upsample",
                              mode="nearest", coordinate_transformation_mode="asymmetric",
                              nearest_mode="round_prefer_ceil"),
             helper.make_node("Relu", ["up"], ["y"], name="after")]
    return make_model(nodes, (3, 5, 7), [("sizes", _i64(1, 3, 3, 4))])


def test_the_first_differing_node_is_named() -> None:
    from saliency_service.methods._utils.onnx_to_fx import first_difference

    model = _resize_at_a_tie()
    x = inputs([1, 3, 5, 7])
    where = first_difference(model, x, TOLERANCE)
    assert where.startswith("it first differs at Resize node 'upsample', whose output "
                            "differs by"), where
    identical = make_model([_node("Relu", ["x"], ["y"], name="after")], (3, 5, 7))
    assert first_difference(identical, x, TOLERANCE) == ""
