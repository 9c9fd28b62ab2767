"""Prepared program copies: same results as the exported program, built once, shared."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from saliency_service.methods._utils import torch_program as tp
from saliency_service.methods._utils.gradient_program import translation
from tests.gradient_fixtures import ARCHITECTURES, Exported, inputs, shared_exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    return shared_exports(tmp_path_factory)


def count(program_module: torch.nn.Module, name: str) -> int:
    return sum(1 for n in program_module.graph.nodes if name in str(n.target))


def exported_program(model: Exported) -> object:
    """``torch.export`` of the source module: a graph that still has its BatchNorms (the
    ONNX exporter folds them, so a package's translated graph has none)."""
    return torch.export.export(model.module.eval(), (torch.from_numpy(inputs(2)),),
                               dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))


def program_of(model: Exported) -> object:
    """The program the server builds its variants from: the package's translated ONNX graph."""
    return translation(model.handle).program


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fast_variant_folds_every_batch_norm_and_keeps_all_outputs(
    exported: dict[str, Exported], architecture: str
) -> None:
    program = exported_program(exported[architecture])
    original = program.module()
    batch_norms = count(original, "batch_norm")
    assert batch_norms > 0
    copy = program.module()
    assert tp.fold_batch_norms(copy) == batch_norms
    fast = tp.build_variant(program, tp.FAST)
    assert count(fast.graph_module, "batch_norm") == 0
    x = torch.from_numpy(inputs(3))
    with torch.no_grad():
        expected, actual = original(x), fast(x)
    expected = expected if isinstance(expected, tuple | list) else (expected,)
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual, strict=True):
        assert a.shape == e.shape
        assert float((a - e).abs().max() / e.abs().max()) < 1e-5


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_guided_variant_routes_every_relu(exported: dict[str, Exported], architecture: str) -> None:
    program = program_of(exported[architecture])
    relus = count(program.module(), "relu")
    guided = tp.build_variant(program, tp.GUIDED)
    targets = [n.target for n in guided.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(tp.guided_relu) == relus
    assert count(guided.graph_module, "aten.relu") == 0


def test_guided_relu_passes_only_positive_gradients_of_positive_inputs() -> None:
    x = torch.tensor([-1.0, 2.0, 3.0, -4.0, 0.0], requires_grad=True)
    upstream = torch.tensor([5.0, -6.0, 7.0, 8.0, 9.0])
    out = tp.GuidedReLU.apply(x)
    torch.testing.assert_close(out, torch.relu(x))
    (grad,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 7.0, 0.0, 0.0]))


def test_cut_variant_makes_the_scale_output_a_leaf(exported: dict[str, Exported]) -> None:
    handle = exported["demo_resnet"].handle
    name = handle.spec().cam_output
    index = handle.spec().scale_outputs.index(name) + 1
    program = program_of(exported["demo_resnet"])
    cut = tp.build_variant(program, tp.CUT_PREFIX + name, handle.spec().extra_outputs)
    x = torch.from_numpy(inputs(2))
    outputs = cut(x)
    leaf = outputs[index]
    assert leaf.requires_grad and leaf.grad_fn is None
    (ours,) = torch.autograd.grad(outputs[0][:, 1].sum(), leaf)
    # Reference: the unmodified program with the input requiring grad.
    source = x.clone().requires_grad_(True)
    full = program.module()(source)
    (expected,) = torch.autograd.grad(full[0][:, 1].sum(), full[index])
    assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="no output"):
        tp.build_variant(program, tp.CUT_PREFIX + "scale_99")


def test_prepared_modules_are_built_once_and_shared_across_threads(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    handle = exported["vgg_style"].handle
    results: list[torch.nn.Module] = []
    barrier = threading.Barrier(4)

    def fetch() -> None:
        barrier.wait()
        results.append(tp.prepared_module(handle, tp.GUIDED))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert tp.prepared_module(handle, tp.FAST) is tp.prepared_module(handle, tp.FAST)
    assert tp.prepared_module(handle, tp.FAST) is not results[0]


def test_a_reloaded_package_gets_fresh_copies(exported: dict[str, Exported]) -> None:
    handle = exported["demo_resnet"].handle
    before = tp.prepared_module(handle, tp.FAST)
    handle.load()
    after = tp.prepared_module(handle, tp.FAST)
    assert after is not before
    x = torch.from_numpy(inputs(1))
    with torch.no_grad():
        np.testing.assert_allclose(after(x)[0].numpy(), before(x)[0].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trunk_after_the_stem_gives_the_same_outputs_and_input_gradient(
    exported: dict[str, Exported], architecture: str
) -> None:
    handle = exported[architecture].handle
    trunk = tp.trunk_after_stem(handle)
    assert trunk is not None and trunk.stem is not None
    assert trunk is tp.trunk_after_stem(handle)  # cached
    fast = tp.prepared_module(handle, tp.FAST)
    # No second copy of the folded weights: the trunk uses the fast variant's.
    fast_tensors = {t.data_ptr() for t in fast.graph_module.buffers()}
    assert trunk.stem.weight.data_ptr() in fast_tensors
    assert {t.data_ptr() for t in trunk.graph_module.buffers()} <= fast_tensors
    assert not any(n.op == "call_function" and n.target == torch.ops.aten.conv2d.default
                   and n.args[0].op == "placeholder" for n in trunk.graph_module.graph.nodes)
    x = torch.from_numpy(inputs(3))
    with torch.no_grad():
        expected, actual = fast(x), trunk(trunk.stem(x))
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual, strict=True):
        assert float((a - e).abs().max() / e.abs().max()) < 1e-6
    # Affine: the stem of a point on a line is the line through the stems.
    direction = torch.from_numpy(inputs(3, seed=7)) - x
    with torch.no_grad():
        on_line = trunk.stem(x + 0.3 * direction)
        composed = trunk.stem(x) + 0.3 * trunk.stem(direction, with_bias=False)
    assert float((on_line - composed).abs().max() / on_line.abs().max()) < 1e-5
    # The input gradient goes back through the stem outside autograd.
    source = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(fast(source)[0][:, 1].sum(), source)
    stem_out = trunk.stem(x).requires_grad_(True)
    (at_stem,) = torch.autograd.grad(trunk(stem_out)[0][:, 1].sum(), stem_out)
    ours = trunk.stem.input_gradient(at_stem, x.shape)
    assert ours.shape == x.shape
    assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-5


class InputUsedTwice(torch.nn.Module):
    """The input feeds a convolution and a skip connection: no stem to split off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + x).mean(dim=(2, 3))


class NormalizedFirst(torch.nn.Module):
    """The input is shifted before the convolution: no convolution of the input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x - 0.5).mean(dim=(2, 3))


@pytest.mark.parametrize("module", [InputUsedTwice, NormalizedFirst])
def test_no_trunk_when_the_input_is_not_a_convolutions_alone(module: type) -> None:
    program = torch.export.export(module().eval(), (torch.rand(1, 3, 8, 8),))
    with pytest.raises(tp.NoStemError):
        tp.build_variant(program, tp.TRUNK)


class InPlaceCases(torch.nn.Module):
    """A ReLU of a convolution read by nothing else; a residual add and its ReLU; a
    convolution output that is also returned (so must stay as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.relu(self.a(x))
        block = torch.relu(self.b(first) + first)
        kept = self.c(block)
        return torch.relu(kept).mean(dim=(2, 3)), kept


def test_in_place_ops_only_where_nothing_else_reads_and_gradients_are_unchanged() -> None:
    torch.manual_seed(0)
    module = InPlaceCases().eval()
    program = torch.export.export(module, (torch.rand(2, 3, 8, 8),))
    fast = tp.build_variant(program, tp.FAST)
    targets = [str(n.target) for n in fast.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.relu_.default") == 2  # after conv a, after the residual add
    assert targets.count("aten.add_.Tensor") == 1
    assert targets.count("aten.relu.default") == 1  # of the returned convolution output
    x = torch.rand(2, 3, 8, 8)
    ours_input, reference_input = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, kept = fast(ours_input)
    expected, expected_kept = module(reference_input)
    torch.testing.assert_close(kept, expected_kept)
    (ours_grad,) = torch.autograd.grad(ours[:, 1].sum(), ours_input)
    (expected_grad,) = torch.autograd.grad(expected[:, 1].sum(), reference_input)
    torch.testing.assert_close(ours_grad, expected_grad)
    # The trunk takes a leaf that requires grad: its first ReLU is out of place again.
    trunk = tp.build_variant(program, tp.TRUNK)
    first = next(n for n in trunk.graph_module.graph.nodes if n.op == "call_function")
    assert str(first.target) == "aten.relu.default"
    stem_out = trunk.stem(x).requires_grad_(True)
    (at_stem,) = torch.autograd.grad(trunk(stem_out)[0][:, 1].sum(), stem_out)
    torch.testing.assert_close(trunk.stem.input_gradient(at_stem, x.shape), expected_grad)
