"""A copy of a model package with some layers' weights replaced by noise: the model side of
the model-parameter randomization test (Adebayo et al., "Sanity Checks for Saliency Maps",
https://arxiv.org/abs/1810.03292).

The copy is a real package: its torch program is the source's ``model.pt2`` with the chosen
parameters redrawn, exported again with ``torch.export`` and to ONNX, checked ONNX Runtime
against PyTorch, and listed in a manifest with each file's new sha256, so the server loads it
like any other. "Layers" are the model's top-level blocks in forward order (``stem``,
``layer1`` … ``fc`` for the shipped models), read off the parameter names.

Each parameter tensor of a randomized layer becomes Gaussian noise with that tensor's own mean
and standard deviation: the activations keep their scale, the learned structure is gone.
BatchNorm running statistics (buffers) are kept.
"""

from __future__ import annotations

import json
import types
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from saliency_service.core.program_archive import load_program
from saliency_service.core.repository import MANIFEST, ONNX_FILE, TORCH_FILE
from saliency_service.packaging.package_files import staged_package, write_manifest

VERIFY_TOLERANCE = 1e-3


class RandomizeError(RuntimeError):
    """The package cannot be randomized (no torch program, an unknown layer, a bad export)."""


def _without_train(module: nn.Module) -> nn.Module:
    """An exported program's module refuses ``train()``, which the ONNX exporter calls to
    select eval mode; it is always in eval mode, so the call may do nothing. (Not wrapped in
    another module: that would rename every parameter.)"""
    module.train = types.MethodType(lambda self, mode=True: self, module)  # type: ignore[method-assign]
    return module


def _program(package: Path) -> Any:
    path = Path(package) / TORCH_FILE
    if not path.is_file():
        raise RandomizeError(f"{package} has no {TORCH_FILE}: randomizing layers needs the "
                             "torch program (re-export the model with `saliency export`)")
    return load_program(path.read_bytes())


def _layer_of(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).split(".")[0]


def _prefix(names: Sequence[str]) -> str:
    """``model.`` when every parameter sits under the exporter's wrapper, else nothing."""
    return "model." if names and all(n.startswith("model.") for n in names) else ""


def layers(package: Path) -> list[str]:
    """The package's top-level blocks that hold parameters, in forward (registration) order."""
    names = [name for name, _ in _program(package).module().named_parameters()]
    prefix = _prefix(names)
    return list(dict.fromkeys(_layer_of(name, prefix) for name in names))


def randomize_package(source: Path, repository: Path, name: str, randomized: Sequence[str],
                      seed: int = 0) -> Path:
    """Writes ``repository/name/1``: ``source`` with the parameters of ``randomized`` redrawn.

    The same (source, layer, seed) always draws the same noise, so a cascade and an
    independent test randomize a layer identically.
    """
    source = Path(source)
    manifest = json.loads((source / MANIFEST).read_text())
    module = _program(source).module()
    names = [n for n, _ in module.named_parameters()]
    prefix = _prefix(names)
    known = list(dict.fromkeys(_layer_of(n, prefix) for n in names))
    unknown = [layer for layer in randomized if layer not in known]
    if unknown:
        raise RandomizeError(f"no layer {unknown[0]!r} in {source}; layers: {', '.join(known)}")
    with torch.no_grad():
        for parameter_name, parameter in module.named_parameters():
            layer = _layer_of(parameter_name, prefix)
            if layer not in randomized:
                continue
            generator = torch.Generator().manual_seed(
                seed * 1_000_003 + zlib.crc32(parameter_name.encode()))
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            std = float(parameter.std()) if parameter.numel() > 1 else 0.0
            parameter.copy_(noise * std + float(parameter.mean()))
    spec = manifest["input"]
    input_shape = tuple(int(d) for d in spec["shape"][1:])
    outputs = [manifest["outputs"]["logits"], *manifest["outputs"].get("scales", [])]
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed))
    target = Path(repository) / name / "1"
    with staged_package(Path(repository), target) as staging:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (example,),
                                      dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, str(staging / TORCH_FILE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_without_train(module), (example,), str(staging / ONNX_FILE),
                              input_names=[spec.get("name", "input")], output_names=outputs,
                              dynamic_axes={n: {0: "batch"} for n in
                                            [spec.get("name", "input"), *outputs]},
                              opset_version=17, dynamo=False)
        onnx.checker.check_model(str(staging / ONNX_FILE))
        worst = _verify(module, staging / ONNX_FILE, spec.get("name", "input"), outputs,
                        input_shape)
        manifest.update(name=name, version=1)
        manifest["metadata"] = {**manifest.get("metadata", {}), "randomized": {
            "from": f"{manifest_name(source)}", "layers": list(randomized), "seed": seed,
            "rule": "each parameter tensor ~ N(its mean, its std); BatchNorm statistics kept"}}
        manifest["verification"] = {"inputs": 2, "max_abs_diff": worst,
                                    "tolerance": VERIFY_TOLERANCE}
        write_manifest(staging, manifest, [ONNX_FILE, TORCH_FILE])
    return target


def manifest_name(package: Path) -> str:
    data = json.loads((Path(package) / MANIFEST).read_text())
    return f"{data['name']} v{data['version']}"


def _verify(module: nn.Module, onnx_path: Path, input_name: str, outputs: list[str],
            input_shape: tuple[int, ...]) -> float:
    """Max |ONNX Runtime − torch| over two random batches; raises past the tolerance."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in module(x)]
        actual = session.run(outputs, {input_name: x.numpy()})
        for output, e, a in zip(outputs, expected, actual, strict=True):
            diff = float(np.abs(e - a).max())
            worst = max(worst, diff)
            if diff > VERIFY_TOLERANCE * max(1.0, float(np.abs(e).max())):
                raise RandomizeError(f"ONNX Runtime disagrees with PyTorch on {output} of the "
                                     f"randomized copy: max abs diff {diff:.3g}")
    return worst
