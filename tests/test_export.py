"""Model packages: export finds scales, verifies ONNX Runtime, and loading checks checksums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import saliency_service.packaging.export as export_module
from saliency_service.core.repository import Repository
from saliency_service.core.request import Job
from saliency_service.methods import registry
from saliency_service.methods._utils.torch_program import FAST, prepared_module
from saliency_service.methods.gradients import input_gradients
from saliency_service.packaging.export import ExportError, export_package, find_scale_modules
from tests.models import TinyCNN


def export_tiny(root: Path, name: str = "m", **kwargs: object) -> export_module.ExportReport:
    return export_package(TinyCNN(), name=name, version=1, input_shape=(3, 32, 32),
                          mean=[0.5] * 3, std=[0.25] * 3, class_labels=["a", "b", "c", "d"],
                          repository=root, head="fc", **kwargs)


def test_scale_ends_are_the_outermost_module_before_each_resolution_drop() -> None:
    assert find_scale_modules(TinyCNN(), torch.zeros(1, 3, 32, 32)) == [
        "layer1", "layer2", "layer3"]


class Residual(nn.Module):
    """A stride-2 block with a downsample branch that runs before the main path."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 8, 1, 2)
        self.conv = nn.Conv2d(4, 8, 3, 2, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) + self.down(x))


def test_scale_search_handles_residual_downsampling() -> None:
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU()))
    model.add_module("stage", Residual())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    assert find_scale_modules(model, torch.zeros(1, 3, 16, 16)) == ["stem", "stage"]


def test_package_files_manifest_and_agreement(tmp_path: Path) -> None:
    report = export_tiny(tmp_path)
    files = sorted(p.name for p in report.path.iterdir())
    assert files == ["manifest.json", "model.onnx"]
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["outputs"] == {"logits": "logits",
                                   "scales": ["scale_0", "scale_1", "scale_2"]}
    assert manifest["cam_layer"] == "layer3" and manifest["cam_output"] == "scale_2"
    assert manifest["head"]["type"] == "gap_linear"
    assert manifest["verification"]["max_abs_diff"] < 1e-4
    assert set(manifest["files"]) == {"model.onnx"}
    assert report.scale_shapes == ((8, 32, 32), (16, 16, 16), (32, 8, 8))
    # The loaded package answers like the source module, from both engines.
    repository = Repository(tmp_path)
    repository.load_all()
    handle = repository.get("m")
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = TinyCNN()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(handle.run(x)[0], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        program_logits = prepared_module(handle, FAST)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(program_logits, expected, rtol=1e-4, atol=1e-5)


def test_export_leaves_the_callers_module_as_it_was(tmp_path: Path) -> None:
    """Exporting freezes the module while it runs; a model still in training keeps its mode
    and its trainable parameters afterwards (the exporter is often called mid-training)."""
    model = TinyCNN().train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    export_package(model, name="m", version=1, input_shape=(3, 32, 32), mean=[0.5] * 3,
                   std=[0.25] * 3, class_labels=[], repository=tmp_path)
    assert all(module.training for module in model.modules())
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    find_scale_modules(model, torch.zeros(1, 3, 32, 32))
    assert model.training and not frozen.requires_grad


def test_export_refuses_a_package_that_disagrees(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    original = export_module._export_onnx

    def other_weights(graph_module: object, program: object, example: torch.Tensor,
                      path: Path, names: list[str], axes: dict[str, int]) -> None:
        # The fault: the ONNX graph carries different weights than the torch program.
        impostor, graph = export_module.graph_of(TinyCNN(seed=1), example)
        impostor = export_module.with_outputs(impostor, [p.node for p in graph.scale_ends()])
        original(impostor, program, example, path, names, axes)

    monkeypatch.setattr(export_module, "_export_onnx", other_weights)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_tiny(tmp_path)
    assert not (tmp_path / "m").exists()


def test_export_will_not_overwrite_without_force(tmp_path: Path) -> None:
    export_tiny(tmp_path)
    with pytest.raises(ExportError, match="exists"):
        export_tiny(tmp_path)
    assert export_tiny(tmp_path, overwrite=True).path.is_dir()


def test_tampered_or_missing_files_mark_only_that_package_broken(tmp_path: Path) -> None:
    export_tiny(tmp_path, name="good")
    export_tiny(tmp_path, name="tampered")
    export_tiny(tmp_path, name="missing")
    (tmp_path / "tampered" / "1" / "model.onnx").write_bytes(b"not a model")
    (tmp_path / "missing" / "1" / "model.onnx").unlink()
    repository = Repository(tmp_path)
    repository.load_all()
    status = {h.name: h for h in repository.handles()}
    assert status["good"].ready
    assert not status["tampered"].ready and "sha256" in status["tampered"].error
    assert not status["missing"].ready and "missing" in status["missing"].error


def test_export_cli_packages_a_module_by_name(tmp_path: Path) -> None:
    from saliency_service.cli import main

    state = tmp_path / "weights.pt"
    torch.save(TinyCNN(seed=3).state_dict(), state)
    assert main(["export", "--module", "tests.models:TinyCNN", "--state-dict", str(state),
                 "--name", "cli", "--input-shape", "3,32,32", "--labels", "a,b,c,d",
                 "--head", "fc", "--models", str(tmp_path)]) == 0
    repository = Repository(tmp_path)
    repository.load_all()
    x = np.zeros((1, 3, 32, 32), np.float32)
    with torch.no_grad():
        expected = TinyCNN(seed=3)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(repository.get("cli").run(x)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["object array", "not weights", "wrong keys", "pickle"])
def test_export_cli_refuses_weights_it_cannot_load_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """Weights that are not plain arrays or tensors, or that do not fit the module, end the
    export with one line naming the file (exit 2), never a traceback or an unpickled object."""
    from saliency_service.cli import main

    path = tmp_path / ("w.pt" if case == "pickle" else "w.npz")
    if case == "object array":
        np.savez(path, **{"layer1.conv.weight": np.array([{"a": 1}], dtype=object)})
    elif case == "not weights":
        path.write_bytes(b"PK\x03\x04 not a zip")
    elif case == "wrong keys":
        np.savez(path, nothing=np.zeros(3, np.float32))
    else:
        torch.save({"weight": object()}, path)  # a pickled object, not a tensor
    code = main(["export", "--module", "tests.models:TinyCNN", "--state-dict", str(path),
                 "--name", "w", "--input-shape", "3,32,32", "--labels", "a,b,c,d",
                 "--models", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: --state-dict {path}") and err.count("\n") == 1, err
    assert not (tmp_path / "models" / "w").exists()


def test_scale_search_on_bottlenecks_with_the_stride_on_the_3x3_conv() -> None:
    from tests.architectures import ResNet50Shape, VGGStyle

    model = ResNet50Shape(num_classes=10).eval()
    found = find_scale_modules(model, torch.zeros(1, 3, 64, 64))
    assert found == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert found == list(ResNet50Shape.scale_modules())
    vgg = find_scale_modules(VGGStyle().eval(), torch.zeros(1, 3, 64, 64))
    assert vgg[:4] == ["stage1", "stage2", "stage3", "stage4"]


class SharedActivations(nn.Module):
    """One ``nn.ReLU`` called twice, then a functional ReLU: three scales, no module each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.c3 = nn.Conv2d(16, 32, 3, 2, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.c2(self.relu(self.c1(x))))
        return self.fc(torch.nn.functional.relu(self.c3(x)).mean((2, 3)))


def test_shared_and_functional_activations_give_distinct_post_activation_scales(
        tmp_path: Path) -> None:
    report = export_package(SharedActivations(), name="shared", version=1,
                            input_shape=(3, 16, 16), mean=[0.5] * 3, std=[0.25] * 3,
                            class_labels=(), repository=tmp_path)
    manifest = json.loads((report.path / "manifest.json").read_text())
    nodes = manifest["scale_nodes"]
    assert [n["shape"] for n in nodes] == [[8, 16, 16], [16, 8, 8], [32, 4, 4]]
    assert len({n["node"] for n in nodes}) == 3
    assert all(n["op"] == "aten.relu.default" for n in nodes)  # after, not before, the ReLU
    assert manifest["cam_output"] == "scale_2"
    with pytest.raises(ExportError, match="runs 2 times"):
        export_package(SharedActivations(), name="named", version=1, input_shape=(3, 16, 16),
                       mean=[0.5] * 3, std=[0.25] * 3, class_labels=(), repository=tmp_path,
                       scale_modules=["relu"])
    with pytest.raises(ExportError, match="same tensor"):
        export_package(SharedActivations(), name="twice", version=1, input_shape=(3, 16, 16),
                       mean=[0.5] * 3, std=[0.25] * 3, class_labels=(), repository=tmp_path,
                       scale_modules=[nodes[1]["node"], nodes[1]["node"]])


class LiteralBatch(nn.Module):
    """A forward that fixes its batch size (a learned token expanded to a literal batch of
    1 and joined to the features), as some vision transformers write their class token."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU())
        self.token = nn.Parameter(torch.linspace(-1.0, 1.0, 4).view(1, 4))
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.stage(self.stem(x)).mean(dim=(2, 3))
        return self.fc(torch.cat([self.token.expand(1, -1), pooled], dim=1))


def test_a_forward_that_fixes_its_batch_is_exported_at_batch_one_and_served_in_chunks(
        tmp_path: Path) -> None:
    model = LiteralBatch().eval()
    report = export_package(model, name="fixed", version=1, input_shape=(3, 16, 16),
                            mean=[0.0] * 3, std=[1.0] * 3, class_labels=[], repository=tmp_path)
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [1, 3, 16, 16]
    repository = Repository(tmp_path)
    repository.load_all()
    handle = repository.get("fixed")
    x = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(x[i:i + 1])) for i in range(3)]).numpy()
    np.testing.assert_allclose(handle.run(x)[0], expected, rtol=1e-4, atol=1e-5)
    # Gradients in chunks of one, each equal to autograd on the module.
    job = Job(model=handle, inputs=x, targets=np.array([0, 1, 2]),
              params=registry.get("vanilla_gradient").params(), base_logits=None)
    ours = input_gradients(job, x, job.targets)
    leaf = torch.from_numpy(x.copy()).requires_grad_(True)
    rows = torch.cat([model(leaf[i:i + 1]) for i in range(3)])
    rows.gather(1, torch.tensor([[0], [1], [2]])).sum().backward()
    np.testing.assert_allclose(ours, leaf.grad.numpy(), rtol=1e-4, atol=1e-6)
