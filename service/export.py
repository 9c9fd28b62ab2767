"""PyTorch module → model package (``model.onnx``, ``model.pt2``, ``manifest.json``).

The exporter finds the end of each spatial scale (the last module to finish
before the resolution drops), adds those activations as extra outputs
``scale_0..scale_k`` beside ``logits``, exports the same wrapper to ONNX and to
``torch.export``, checks ONNX Runtime against PyTorch on random inputs and
refuses to write a package that disagrees.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from handlers import registry
from kernel.repository import FORMAT_VERSION, ONNX_FILE, TORCH_FILE
from service.packages import staged_package, write_manifest

log = logging.getLogger(__name__)

class ExportError(RuntimeError):
    """The module cannot be packaged, or ONNX Runtime disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportReport:
    """What export wrote and how well ONNX Runtime matched PyTorch."""

    path: Path
    max_abs_diff: float
    scale_modules: tuple[str, ...]
    scale_shapes: tuple[tuple[int, ...], ...]


def find_scale_modules(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules that end each spatial scale.

    Runs one forward pass with hooks on every submodule and groups 4-D outputs by
    resolution in completion order. In each group the end of the scale is the
    outermost module (fewest dots in its name) that finished last: ``layer1`` rather
    than ``layer1.1.relu``, and rather than ``layer2.0.relu1`` of a bottleneck whose
    stride sits on its 3×3 convolution. 1×1 maps (pooled) are skipped.
    """
    finished: list[tuple[str, tuple[int, int]]] = []
    handles = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                finished.append((name, (int(output.shape[2]), int(output.shape[3]))))

        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    scales: list[str] = []
    sizes: list[tuple[int, int]] = []
    for name, size in finished:
        if size == (1, 1):
            continue
        if sizes and size == sizes[-1]:
            if name.count(".") <= scales[-1].count("."):
                scales[-1] = name
        elif not sizes or size[0] * size[1] < sizes[-1][0] * sizes[-1][1]:
            scales.append(name)
            sizes.append(size)
    if not scales:
        raise ExportError("found no 4-D feature maps: is this an image model?")
    return scales


class WithScaleOutputs(nn.Module):
    """Returns ``(logits, scale_0, …)``: the wrapped model plus its scale activations."""

    def __init__(self, model: nn.Module, scale_modules: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.scale_modules = list(scale_modules)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name in self.scale_modules:
            sub = self.model.get_submodule(name)

            def hook(_m: nn.Module, _i: Any, output: torch.Tensor, name: str = name) -> None:
                captured[name] = output

            handles.append(sub.register_forward_hook(hook))
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return (logits, *(captured[name] for name in self.scale_modules))


def _gap_linear_head(model: nn.Module, last_scale: str, example: torch.Tensor,
                     head_name: str | None) -> dict[str, Any]:
    """Describes the head when it is global-average-pool + linear (FastCAM needs no backward)."""
    if head_name is None:
        return {"type": "unknown"}
    head = model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        return {"type": "unknown"}
    return {"type": "gap_linear", "linear": head_name, "features": head.in_features,
            "scale_output": f"scale_{last_scale}"}


def export_package(
    model: nn.Module,
    *,
    name: str,
    version: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_labels: Sequence[str],
    repository: Path,
    value_range: tuple[float, float] = (0.0, 1.0),
    scale_modules: Sequence[str] | None = None,
    cam_layer: str | None = None,
    head: str | None = None,
    verify_inputs: int = 4,
    tolerance: float = 1e-3,
    seed: int = 0,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> ExportReport:
    """Exports ``model`` (eval mode) as ``repository/name/version``.

    Args:
        input_shape: C×H×W of one image; the batch dimension stays dynamic.
        scale_modules: submodules ending each scale (found automatically when None).
        cam_layer: submodule for Grad-CAM (default: the last scale module).
        head: name of a final ``nn.Linear`` applied after global average pooling, if any.
        metadata: free-form facts stored in the manifest (e.g. training accuracy).
        tolerance: largest acceptable |ONNX Runtime − PyTorch| over all outputs, relative to
            the outputs' magnitude (max(1, max |torch output|)).

    Raises:
        ExportError: when ONNX Runtime disagrees with PyTorch or the model cannot be traced.
    """
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *input_shape, generator=generator)
    scales = list(scale_modules) if scale_modules else find_scale_modules(model, example)
    cam_layer = cam_layer or scales[-1]
    if cam_layer not in scales:
        scales.append(cam_layer)
    wrapper = WithScaleOutputs(model, scales).eval()
    with torch.no_grad():
        reference = wrapper(example)
    num_classes = int(reference[0].shape[1])
    if class_labels and len(class_labels) != num_classes:
        raise ExportError(f"{len(class_labels)} class labels for {num_classes} logits")
    labels = list(class_labels) or [str(i) for i in range(num_classes)]
    scale_names = [f"scale_{i}" for i in range(len(scales))]
    output_names = ["logits", *scale_names]
    target = Path(repository) / name / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass overwrite=True (--force) to replace it")

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.export.export(wrapper, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as exc:
        raise ExportError(f"torch.export failed: {exc}") from exc

    with staged_package(Path(repository), target) as staging_dir:
        onnx_path = staging_dir / ONNX_FILE
        _export_onnx(wrapper, example, onnx_path, output_names)
        torch.export.save(program, str(staging_dir / TORCH_FILE))
        max_diff, activation_bytes = _verify(wrapper, onnx_path, input_shape, output_names,
                                             verify_inputs, tolerance, generator)
        scale_shapes = [tuple(int(d) for d in r.shape[1:]) for r in reference[1:]]
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "version": version,
            "input": {"name": "input", "shape": [-1, *input_shape], "dtype": "float32",
                      "layout": "NCHW", "mean": list(map(float, mean)),
                      "std": list(map(float, std)), "value_range": list(value_range)},
            "outputs": {"logits": "logits", "scales": scale_names},
            "scale_modules": scales,
            "scale_shapes": scale_shapes,
            "cam_layer": cam_layer,
            "cam_output": scale_names[scales.index(cam_layer)],
            "class_labels": labels,
            "head": _gap_linear_head(model, str(scales.index(cam_layer)), example, head),
            "methods": [h.name for h in registry.handlers()],
            "activation_bytes": activation_bytes,
            "exporter": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "opset": _opset(onnx_path)},
            "metadata": dict(metadata or {}),
            "verification": {"inputs": verify_inputs, "max_abs_diff": max_diff,
                             "tolerance": tolerance},
        }
        write_manifest(staging_dir, manifest, [ONNX_FILE, TORCH_FILE])
    log.info("exported %s (max |ORT − torch| = %.3g)", target, max_diff)
    return ExportReport(target, max_diff, tuple(scales), tuple(scale_shapes))


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path,
                 output_names: list[str]) -> None:
    """ONNX with a dynamic batch axis, as one self-contained file."""
    try:
        # The TorchScript-based exporter: deterministic, fast, and exact for the conv nets
        # served here; its deprecation notice is not actionable for a pinned torch.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper, (example,), str(path), input_names=["input"],
                output_names=output_names,
                dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in output_names}},
                opset_version=17, dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}") from exc
    onnx.checker.check_model(str(path))


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _verify(wrapper: nn.Module, onnx_path: Path, input_shape: tuple[int, int, int],
            output_names: list[str], count: int, tolerance: float,
            generator: torch.Generator) -> tuple[float, int]:
    """Max |ORT − torch| over ``count`` random inputs (batch sizes 1 and 3); raises if too big.

    Also returns the activation bytes per image (sum of output sizes), which sizes chunks.
    """
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    activation_bytes = 0
    for index in range(count):
        batch = 1 if index % 2 == 0 else 3
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(x)]
        actual = session.run(output_names, {"input": x.numpy()})
        for name, e, a in zip(output_names, expected, actual, strict=True):
            if e.shape != a.shape:
                raise ExportError(f"output {name}: ONNX shape {a.shape} != torch {e.shape}")
            scale = max(1.0, float(np.abs(e).max()))
            diff = float(np.abs(e - a).max())
            worst = max(worst, diff)
            if diff > tolerance * scale:
                raise ExportError(f"ONNX Runtime disagrees with PyTorch on {name}: max abs diff "
                                  f"{diff:.3g} > tolerance {tolerance} × {scale:.3g}")
        if index == 0:
            activation_bytes = int(_activation_bytes(wrapper, x))
    return worst, activation_bytes


def _activation_bytes(wrapper: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs for one image: what a backward pass must keep."""
    total = 0
    handles = []

    def hook(_m: nn.Module, _i: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output[:1].numel() * output.element_size()

    for sub in wrapper.modules():
        if not list(sub.children()):
            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            wrapper(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total
