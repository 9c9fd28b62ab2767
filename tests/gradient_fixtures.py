"""Two architectures exported for real, shared by the gradient-family tests.

A residual network with global pooling (DemoResNet) and a VGG-style one with max-pooling, no
global pooling and a 2-layer head (VGGStyle), so no method is checked on one shape only.
BatchNorm statistics are made non-trivial so that folding errors would show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import DEFAULT_LIMITS, Job
from saliency_service.packaging.export import export_package
from saliency_service.zoo.architectures import DemoResNet
from tests.architectures import VGGStyle

SIZE = 32
CLASSES = 5
ARCHITECTURES = ("demo_resnet", "vgg_style")


@dataclass
class Exported:
    """The source module (for the reference libraries) and its loaded package."""

    module: nn.Module
    handle: ModelHandle
    cam_module: nn.Module


def build_module(architecture: str) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    if architecture == "demo_resnet":
        module: nn.Module = DemoResNet(num_classes=CLASSES, width=8)
        head = "fc"
    else:
        module = VGGStyle(num_classes=CLASSES, input_size=SIZE, width=8)
        head = ""
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.uniform_(-0.2, 0.2)
            sub.running_var.uniform_(0.5, 1.5)
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-0.1, 0.1)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module, head


def export_all(root: Path) -> dict[str, Exported]:
    exported: dict[str, Exported] = {}
    for architecture in ARCHITECTURES:
        module, head = build_module(architecture)
        export_package(
            module,
            name=architecture,
            version=1,
            input_shape=(3, SIZE, SIZE),
            mean=[0.5, 0.5, 0.5],
            std=[0.25, 0.25, 0.25],
            class_labels=(),
            repository=root,
            head=head or None,
            scale_modules=module.scale_modules(),
            cam_layer=module.cam_layer,
        )
    repository = Repository(root)
    repository.load_all()
    for architecture in ARCHITECTURES:
        module, _ = build_module(architecture)
        exported[architecture] = Exported(
            module, repository.get(architecture), module.get_submodule(module.cam_layer)
        )
    return exported


_SHARED: dict[str, dict[str, Exported]] = {}


def shared_exports(tmp_path_factory: object) -> dict[str, Exported]:
    """``export_all`` once per test session (exporting is the slow part of these tests)."""
    if "models" not in _SHARED:
        _SHARED["models"] = export_all(tmp_path_factory.mktemp("gradient_models"))  # type: ignore[attr-defined]
    return _SHARED["models"]


def inputs(batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)


def make_job(
    handle: ModelHandle,
    x: np.ndarray,
    targets: np.ndarray,
    params: object,
    seed: int = 0,
    limits: Mapping[str, float] | None = None,
    base_logits: bool = True,
) -> Job:
    logits = handle.run(x)[0] if base_logits else None
    return Job(
        model=handle,
        inputs=x,
        targets=np.asarray(targets, np.int64),
        params=params,
        base_logits=logits,
        seed=seed,
        limits=limits or DEFAULT_LIMITS,
    )


def non_predicted_targets(handle: ModelHandle, x: np.ndarray) -> np.ndarray:
    """For each item a class the model does not predict (its second-best)."""
    (logits,) = handle.run(x)
    return np.argsort(-logits, axis=1)[:, 1].astype(np.int64)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual − reference| / max |reference|."""
    reference = np.asarray(reference, np.float64)
    scale = float(np.abs(reference).max())
    assert scale > 0, "the reference is all zeros: the comparison would prove nothing"
    return float(np.abs(np.asarray(actual, np.float64) - reference).max() / scale)
