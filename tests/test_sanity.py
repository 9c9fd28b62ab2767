"""Sanity checks: similarity measures against peers, randomized packages served for real, and
the reading on cases whose answer is known (a map that ignores the model fails; a gradient map
of a trained model passes)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.stats
import torch
from onnx import TensorProto, helper, numpy_helper

from saliency_service.client.client import SaliencyClient
from saliency_service.core.repository import ModelHandle
from saliency_service.evaluation import fashion_mnist, sanity
from saliency_service.packaging.export import export_package
from saliency_service.packaging.onnx_import import import_onnx
from saliency_service.packaging.randomized import RandomizeError, layers, randomize_package
from saliency_service.serving.background import local_server
from tests.models import TinyCNN
from tests.onnx_models import small_cnn, write_package

ROOT = Path(__file__).resolve().parent.parent
FASHION = ROOT / "models" / "fashion" / "1"


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    first = rng.normal(size=(3, 12, 10))
    second = first + rng.normal(scale=0.8, size=first.shape)
    second[1] = np.round(second[1])  # many ties
    first[2, :6] = 0.0  # a block of tied zeros, as a masked map has
    ours = sanity.spearman_abs(first, second)
    theirs = [scipy.stats.spearmanr(np.abs(a).ravel(), np.abs(b).ravel()).statistic
              for a, b in zip(first, second, strict=True)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert np.isnan(sanity.spearman_abs(np.ones((1, 4, 4)), first[:1, :4, :4]))[0]


def test_ssim_matches_torchmetrics() -> None:
    from torchmetrics.functional.image import structural_similarity_index_measure  # noqa: PLC0415

    rng = np.random.default_rng(1)
    first = rng.random((3, 28, 28))
    second = np.clip(first + rng.normal(scale=0.3, size=first.shape), 0, 1)
    second[2] = rng.random((28, 28))
    first[:, 0, 0], first[:, -1, -1] = 0.0, 1.0  # min-max scaled already: both see the same
    second[:, 0, 0], second[:, -1, -1] = 0.0, 1.0
    ours = sanity.ssim(first, second)
    theirs = [float(structural_similarity_index_measure(
        torch.from_numpy(a[None, None]), torch.from_numpy(b[None, None]), gaussian_kernel=True,
        sigma=1.5, kernel_size=11, data_range=1.0)) for a, b in zip(first, second, strict=True)]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(sanity.ssim(first, first), 1.0, atol=1e-9)
    assert ours[2] < 0.2 < ours[0]


def test_topk_intersection_by_hand() -> None:
    first = np.arange(100, dtype=float).reshape(1, 10, 10)  # top 10 %: pixels 90 … 99
    second = first.copy()
    second[0, 9, :5] = 0  # five of those ten drop out of the top
    assert sanity.topk_intersection(first, first)[0] == 1.0
    assert sanity.topk_intersection(first, second)[0] == 0.5
    assert sanity.topk_intersection(first, 99 - first)[0] == 0.0


def test_plan_cascades_from_the_top_and_reuses_the_top_layer() -> None:
    plan = sanity.plan("m", ["stem", "layer1", "fc"])
    cascade = [v for v in plan if v.test == "cascading"]
    assert [v.layers for v in cascade] == [("fc",), ("fc", "layer1"), ("fc", "layer1", "stem")]
    independent = [v for v in plan if v.test == "independent"]
    assert [v.layers for v in independent] == [("fc",), ("layer1",), ("stem",)]
    assert independent[0].name == cascade[0].name  # the same package, not made twice
    targets = np.arange(10) % 4
    others = sanity.random_targets(targets, 4)
    assert np.all(others != targets) and np.all((others >= 0) & (others < 4))


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TinyCNN exported with plain ``torch.onnx.export`` (BatchNorm kept as its own node)
    and imported: node names carry the blocks (``/layer1/bn/BatchNormalization``)."""
    root = tmp_path_factory.mktemp("tiny-sanity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyCNN(4), (torch.randn(2, 3, 32, 32),), str(root / "tiny.onnx"),
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False, do_constant_folding=False)
    import_onnx(root / "tiny.onnx", name="tiny", repository=root / "models", output="logits",
                class_labels=("a", "b", "c", "d"), mean=[0.5], std=[0.25])
    return root / "models" / "tiny" / "1"


def _tensors(package: Path) -> dict[str, np.ndarray]:
    """Every initializer and Constant value of the package's graph, by name."""
    graph = onnx.load(str(package / "model.onnx")).graph
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value":
                found[node.output[0]] = numpy_helper.to_array(attribute.t)
    return found


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    assert before.keys() == after.keys()  # the same names: a copy can be randomized again
    return {name for name in before if not np.array_equal(before[name], after[name])}


def test_a_randomized_copy_changes_exactly_its_blocks_weights(tiny_package: Path,
                                                                tmp_path: Path) -> None:
    assert layers(tiny_package) == ["layer1", "layer2", "layer3", "fc"]
    copy = randomize_package(tiny_package, tmp_path, "tiny-r", ["fc", "layer3"], seed=0)
    assert sorted(p.name for p in copy.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["name"] == "tiny-r" and manifest["metadata"]["randomized"]["layers"] == [
        "fc", "layer3"]
    assert list(manifest["files"]) == ["model.onnx"]
    source = json.loads((tiny_package / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"]["sha256"] != source["files"]["model.onnx"]["sha256"]
    handle = ModelHandle("tiny-r", 1, copy)
    handle.load()  # checks every file's sha256 against the manifest
    assert handle.ready, handle.error
    before, after = _tensors(tiny_package), _tensors(copy)
    # The kernels, BatchNorm scale and shift and the head; not BatchNorm's running statistics.
    assert _changed(before, after) == {"layer3.conv.weight", "layer3.bn.weight",
                                       "layer3.bn.bias", "fc.weight", "fc.bias"}
    for name in ("layer3.conv.weight", "fc.weight"):  # the tensor's own mean and spread
        assert after[name].std() == pytest.approx(before[name].std(), rel=0.5)
    # The same seed draws the same noise (a cascade and an independent test agree) …
    again = randomize_package(tiny_package, tmp_path, "tiny-r2", ["fc", "layer3"], seed=0)
    assert not _changed(after, _tensors(again))
    alone = randomize_package(tiny_package, tmp_path, "tiny-fc", ["fc"], seed=0)
    assert np.array_equal(_tensors(alone)["fc.weight"], after["fc.weight"])
    # … another seed other noise.
    other = randomize_package(tiny_package, tmp_path, "tiny-r3", ["fc"], seed=1)
    assert _changed(_tensors(alone), _tensors(other)) == {"fc.weight", "fc.bias"}
    with pytest.raises(RandomizeError, match="no layer 'head'"):
        randomize_package(tiny_package, tmp_path, "bad", ["head"])


def test_layers_of_graphs_without_scopes_are_their_weighted_nodes(tmp_path: Path) -> None:
    """``saliency export`` (whose graph holds the head as Constant nodes, its nodes named by
    module) and a graph built with ``onnx.helper`` with no node names: one layer per node
    that reads weights."""
    export_package(TinyCNN(4), name="tiny", version=1, input_shape=(3, 32, 32),
                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                   class_labels=("a", "b", "c", "d"), repository=tmp_path / "in", head="fc")
    exported = tmp_path / "in" / "tiny" / "1"
    names = layers(exported)
    assert names == ["layer1", "layer2", "layer3", "fc"], names
    copy = randomize_package(exported, tmp_path / "out", "tiny-head", [names[-1]])
    graph = onnx.load(str(exported / "model.onnx")).graph
    head = next(node for node in graph.node if node.op_type == "Gemm")
    assert _changed(_tensors(exported), _tensors(copy)) == set(head.input[1:])
    plain = write_package(small_cnn(), tmp_path / "in", "plain")
    assert layers(plain) == ["Conv_0", "Conv_3", "Gemm_7"]
    copy = randomize_package(plain, tmp_path / "out", "plain-r", ["Conv_3"])
    assert _changed(_tensors(plain), _tensors(copy)) == {"w2", "b2"}


def test_blocks_are_read_off_node_scopes_and_shared_weights_go_to_the_first(
        tmp_path: Path) -> None:
    """tf2onnx-style names under a common prefix, a MatMul's bias added after it, a weight
    reached through a Transpose and read by two blocks."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0.5, 0.2, shape).astype(np.float32), name)

    prefix = "StatefulPartitionedCall/model"
    nodes = [
        helper.make_node("Conv", ["input", "k", "kb"], ["c"], f"{prefix}/conv/Conv2D",
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "t", "mu", "var"], ["n"],
                         f"{prefix}/bn/FusedBatchNorm"),
        helper.make_node("GlobalAveragePool", ["n"], ["g"], f"{prefix}/pool/Mean"),
        helper.make_node("Flatten", ["g"], ["f"], f"{prefix}/flat/Reshape"),
        helper.make_node("MatMul", ["f", "w"], ["m"], f"{prefix}/dense/MatMul"),
        helper.make_node("Add", ["m", "wb"], ["d"], f"{prefix}/dense/BiasAdd"),
        helper.make_node("Transpose", ["w"], ["wt"], f"{prefix}/tied/Transpose"),
        helper.make_node("MatMul", ["d", "wt"], ["back"], f"{prefix}/tied/MatMul"),
        helper.make_node("MatMul", ["back", "w"], ["logits"], f"{prefix}/out/MatMul"),
    ]
    initializers = [weight("k", 4, 3, 3, 3), weight("kb", 4), weight("s", 4), weight("t", 4),
                    weight("mu", 4), weight("var", 4), weight("w", 4, 3), weight("wb", 3)]
    graph = helper.make_graph(
        nodes, "scoped",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    package = write_package(model, tmp_path / "in", "scoped")
    assert layers(package) == ["conv", "bn", "dense"]
    before = _tensors(package)
    for block, expected in (("conv", {"k", "kb"}), ("bn", {"s", "t"}), ("dense", {"w", "wb"})):
        copy = randomize_package(package, tmp_path / "out", f"scoped-{block}", [block])
        assert _changed(before, _tensors(copy)) == expected, block


def _explain_with(address: str) -> sanity.Explain:
    def explain(model: str, method: object, pixels: np.ndarray,
                targets: np.ndarray) -> np.ndarray:
        with SaliencyClient(address, timeout=120) as client:
            return np.asarray(client.explain(model, str(method), tensor=pixels, seed=0,
                                             target=[int(t) for t in targets]).maps)
    return explain


def test_run_checks_serves_every_copy_and_reads_the_control(tiny_package: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    targets = np.array([0, 1, 2, 3])
    rows = sanity.run_checks(tiny_package, "tiny", ["vanilla_gradient"], pixels, targets, 4,
                             _explain_with, "run", progress=False)
    mine = [r for r in rows if r["method"] == "vanilla_gradient"]
    assert sorted((r["test"], r["step"]) for r in mine) == sorted(
        [("cascading", k) for k in range(1, 5)] + [("independent", k) for k in range(1, 5)]
        + [("random_logit", 0)])
    assert all(r["images"] == 4 and -1 <= r["spearman"] <= 1 for r in mine)
    # The maps change with the weights: every layer redrawn, they no longer match.
    everything = next(r for r in mine if r["test"] == "cascading" and r["step"] == 4)
    assert everything["spearman"] < 0.9 and everything["topk"] < 0.9, everything
    control = [r for r in rows if r["method"].startswith("edge detector")]
    assert control and all(r["spearman"] == pytest.approx(1.0) for r in control)
    as_text = [{k: str(v) for k, v in r.items()} for r in rows]
    assert sanity.verdict(sanity.cascade_mean(as_text, "edge detector (control)")) == "**fails**"
    text = "\n".join(sanity.section(as_text))
    assert "| edge detector (control) | 1.00 |" in text and "+layer1" in text


@pytest.mark.skipif(not (FASHION / "manifest.json").is_file()
                    or not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs models/fashion/1 and dataset-fashion-mnist")
def test_known_answers_on_the_trained_model(tmp_path: Path) -> None:
    """Every layer of the trained Fashion-MNIST model redrawn: the vanilla gradient's maps
    change (passes); an edge detector of the input does not (fails)."""
    shutil.copytree(FASHION, tmp_path / "fashion" / "1")
    randomize_package(FASHION, tmp_path, "fashion-random", layers(FASHION), seed=0)
    data = fashion_mnist.load("test", 12)
    with local_server(tmp_path) as server:
        explain = _explain_with(server.address)
        trained = explain("fashion", "vanilla_gradient", data.images, data.labels)
        random = explain("fashion-random", "vanilla_gradient", data.images, data.labels)
        same_model = explain("fashion", "vanilla_gradient", data.images, data.labels)
    gradient = float(np.nanmean(sanity.spearman_abs(trained, random)))
    assert sanity.verdict(gradient) == "**passes**", gradient
    assert gradient < 0.3
    np.testing.assert_allclose(sanity.spearman_abs(trained, same_model), 1.0, atol=1e-6)
    edges = sanity.edge_maps(data.images / 255.0)
    edge = float(np.nanmean(sanity.spearman_abs(edges, edges)))
    assert sanity.verdict(edge) == "**fails**"
    # The edge map is not an artefact of the images being alike: it tracks the image.
    other = sanity.edge_maps(data.images[::-1] / 255.0)
    assert float(np.nanmean(sanity.spearman_abs(edges, other))) < edge
