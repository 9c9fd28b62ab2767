"""``saliency export`` keeps the model's module names: ONNX nodes are named by the modules
they came from (as a plain ``torch.onnx.export`` names them), so Grad-CAM's layer names and
the sanity checks' randomization steps are the modules a PyTorch user wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from saliency_service.client.client import SaliencyClient
from saliency_service.evaluation import sanity
from saliency_service.packaging.export import export_package
from saliency_service.serving.background import local_server
from tests.models import BasicBlock


class SmallResNet(nn.Module):
    """stem, two stages of two blocks, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


# The convolutions of each top-level module, as torch.onnx names their nodes.
CONVOLUTIONS = {
    "stem": ["/stem/stem.0/Conv"],
    "layer1": [f"/layer1/layer1.{b}/conv{c}/Conv" for b in (0, 1) for c in (1, 2)],
    "layer2": ["/layer2/layer2.0/conv1/Conv", "/layer2/layer2.0/conv2/Conv",
               "/layer2/layer2.0/down/down.0/Conv", "/layer2/layer2.1/conv1/Conv",
               "/layer2/layer2.1/conv2/Conv"],
}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resnet-names")
    export_package(SmallResNet(), name="resnet", version=1, input_shape=(3, 16, 16),
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=("a", "b", "c", "d"),
                   repository=root, head="fc")
    return root / "resnet" / "1"


def _readers(package: Path, changed: set[str]) -> set[str]:
    """Names of the nodes that read any of the tensors ``changed``."""
    graph = onnx.load(str(package / "model.onnx")).graph
    return {node.name for node in graph.node if changed & set(node.input)}


def _tensors(package: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(package / "model.onnx")).graph
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def test_onnx_nodes_are_named_after_their_modules(package: Path) -> None:
    graph = onnx.load(str(package / "model.onnx")).graph
    convolutions = [node.name for node in graph.node if node.op_type == "Conv"]
    assert convolutions == [name for names in CONVOLUTIONS.values() for name in names]
    assert [node.name for node in graph.node if node.op_type == "Gemm"] == ["/fc/Gemm"]
    assert "/layer2/layer2.1/Relu_1" in {node.name for node in graph.node}


def test_grad_cam_layers_are_module_names(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["scale_modules"] == ["layer1", "layer2"]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with local_server(package.parent.parent) as server, \
            SaliencyClient(server.address, timeout=120) as client:
        info = client.get_model("resnet")
        assert info.cam_layer == "layer2"
        assert list(info.scale_outputs) == ["scale_0", "scale_1"]
        by_module = client.explain("resnet", "gradcam", tensor=pixels, target=1, layer="layer1")
        by_output = client.explain("resnet", "gradcam", tensor=pixels, target=1, layer="scale_0")
    np.testing.assert_array_equal(by_module.maps, by_output.maps)


def test_sanity_cascade_randomizes_whole_modules_in_order(package: Path,
                                                          tmp_path: Path) -> None:
    variants, layers = sanity.build_repository(package, "resnet", tmp_path, progress=False)
    assert layers == ["stem", "layer1", "layer2", "fc"]
    cascade = [v for v in variants if v.test == "cascading"]
    assert [v.layers for v in cascade] == [
        ("fc",), ("fc", "layer2"), ("fc", "layer2", "layer1"),
        ("fc", "layer2", "layer1", "stem")]
    original = _tensors(package)
    for variant in cascade[1:]:
        copy = _tensors(tmp_path / variant.name / "1")
        changed = {name for name in original if not np.array_equal(original[name], copy[name])}
        expected = {"/fc/Gemm", *(name for layer in variant.layers[1:]
                                   for name in CONVOLUTIONS[layer])}
        assert _readers(package, changed) == expected, variant.name
    # A step randomizes every parameterized module of its block: five convolutions of layer2.
    alone = next(v for v in variants if v.test == "independent" and v.layers == ("layer2",))
    copy = _tensors(tmp_path / alone.name / "1")
    changed = {name for name in original if not np.array_equal(original[name], copy[name])}
    assert _readers(package, changed) == set(CONVOLUTIONS["layer2"])
