"""A copy of a model package with some layers' weights replaced by noise: the model side of
the model-parameter randomization test (Adebayo et al., "Sanity Checks for Saliency Maps",
https://arxiv.org/abs/1810.03292).

Works on any package's ONNX graph, exported or imported. "Layers" are the model's top-level
blocks in forward order, read off the graph's node scopes (``/layer1/layer1.0/conv1/Conv``
from torch.onnx, ``pkg.torch.onnx.name_scopes`` from its dynamo exporter, ``model/conv2d/…``
from tf2onnx; a prefix every weight-carrying node shares is dropped), so ``stem``, ``layer1``
… ``fc`` for the shipped models. A graph without scopes has one layer per weight-carrying
node, named after the node, in topological order.

A layer's weights are the float tensors (initializers or Constant values) its nodes read as
weights or biases: convolution kernels, Gemm/MatMul matrices and the bias added to their
result, normalization scales and shifts, PReLU slopes. BatchNorm running statistics are
kept. A tensor several layers read belongs to the first. Each becomes Gaussian noise with
that tensor's own mean and standard deviation: the activations keep their scale, the learned
structure is gone. The copy is written as a package (``model.onnx`` and its manifest, each
file with its new sha256) and run in ONNX Runtime before it is kept.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from saliency_service.core.repository import MANIFEST, ONNX_FILE, Manifest, ModelHandle
from saliency_service.packaging.package_files import staged_package, write_manifest

# The inputs of each operator that hold learned weights (BatchNormalization's 3 and 4 are
# running statistics and stay).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2), "PRelu": (1,),
}
# A constant added to these operators' result is their bias (a Linear on tokens exports as
# MatMul + Add, a Keras Dense as MatMul + BiasAdd).
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Operators a weight may pass through on its way to the node that uses it.
PASS_THROUGH = ("Identity", "Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
# Past this many bytes a model is written with its tensors in ``model.onnx.data``
# (protobuf cannot serialize 2 GiB).
EMBED_LIMIT = 1 << 30
DATA_FILE = f"{ONNX_FILE}.data"
CHECK_BATCHES = (1, 3)
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


class RandomizeError(RuntimeError):
    """The package cannot be randomized (it does not load, an unknown layer, a copy that
    does not run)."""


def _onnx_model(package: Path) -> onnx.ModelProto:
    """The package's ONNX model with its external data inlined, every file verified
    against the manifest as the server does."""
    handle = ModelHandle(Path(package).name, 0, Path(package))
    try:
        handle.manifest = Manifest.from_json(json.loads((Path(package) / MANIFEST).read_text()))
        if ONNX_FILE not in handle.manifest.files:
            raise ValueError(f"manifest lists no {ONNX_FILE}")
        return handle.onnx_model()
    except (OSError, ValueError) as exc:
        raise RandomizeError(f"{package} is not a package that loads: {exc}") from exc


def _scope(node: onnx.NodeProto) -> list[str]:
    """The module path of the node: its exporter's name scopes, else its name's folders."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:  # "['', 'layer1', 'layer1.bn', 'op']": qualified names
            qualified = re.findall(r"'([^']*)'", prop.value)[1:-1]
            parts, previous = [], ""
            for name in qualified:
                parts.append(name.removeprefix(f"{previous}.") if previous else name)
                previous = name
            return [part for part in parts if part]
    return [part for part in node.name.split("/") if part][:-1]


def _safe(name: str) -> str:
    """A layer name usable in a package name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every float tensor of at least one dimension the graph holds, by the name nodes
    read it under (initializers, and Constant nodes' values)."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    return {name: t for name, t in tensors.items()
            if t.data_type in FLOAT_TYPES and len(t.dims) >= 1}


def _weight_inputs(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                   constants: dict[str, onnx.TensorProto]) -> list[str]:
    """The constant tensors ``node`` reads as weights, traced back through pass-through ops."""

    def source(name: str) -> str:
        seen = 0
        while name in producers and producers[name].op_type in PASS_THROUGH and seen < 16:
            name, seen = producers[name].input[0], seen + 1
        return name

    if node.op_type == "Add" and len(node.input) == 2:
        sources = [source(name) for name in node.input]
        results = [name for name, src in zip(node.input, sources, strict=True)
                   if src not in constants]
        if (len(results) == 1 and results[0] in producers
                and producers[results[0]].op_type in LINEAR_OPS):
            return [src for src in sources if src in constants]
        return []
    indices = WEIGHT_INPUTS.get(node.op_type, ())
    found = [source(node.input[i]) for i in indices if i < len(node.input) and node.input[i]]
    return [name for name in found if name in constants]


def _weights(model: onnx.ModelProto) -> dict[str, str]:
    """Each weight tensor's name → its layer, in forward order."""
    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    users = [(position, node, _weight_inputs(node, producers, constants))
             for position, node in enumerate(graph.node)]
    users = [(position, node, names) for position, node, names in users if names]
    scopes = [_scope(node) for _, node, _ in users]
    scoped = [scope for scope in scopes if scope]
    strip = 0
    if scoped:  # drop what every scope shares, keeping at least one level each
        limit = min(len(scope) for scope in scoped) - 1
        while strip < limit and all(scope[strip] == scoped[0][strip] for scope in scoped):
            strip += 1
    owners: dict[str, str] = {}
    node_layers: dict[str, int] = {}
    for (position, node, names), scope in zip(users, scopes, strict=True):
        if scope:
            layer = _safe(scope[strip]) or f"{node.op_type}_{position}"
        else:
            layer = _safe(node.name) or f"{node.op_type}_{position}"
            if node_layers.setdefault(layer, position) != position:
                layer = f"{layer}_{position}"
        for name in names:
            owners.setdefault(name, layer)
    return owners


def layers(package: Path) -> list[str]:
    """The package's top-level blocks that hold weights, in forward order."""
    return list(dict.fromkeys(_weights(_onnx_model(package)).values()))


def _noise(tensor: onnx.TensorProto, key: str, seed: int) -> onnx.TensorProto:
    """``tensor`` redrawn from N(its mean, its std), seeded by (``seed``, ``key``)."""
    values = numpy_helper.to_array(tensor)
    rng = np.random.default_rng((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63))
    std = float(values.std(dtype=np.float64)) if values.size > 1 else 0.0
    mean = float(values.mean(dtype=np.float64)) if values.size else 0.0
    drawn = rng.standard_normal(values.shape) * std + mean
    return numpy_helper.from_array(drawn.astype(values.dtype), tensor.name)


def randomize_package(source: Path, repository: Path, name: str, randomized: Sequence[str],
                      seed: int = 0) -> Path:
    """Writes ``repository/name/1``: ``source`` with the weights of ``randomized`` redrawn.

    The same (source, layer, seed) always draws the same noise, so a cascade and an
    independent test randomize a layer identically.
    """
    source = Path(source)
    manifest: dict[str, Any] = json.loads((source / MANIFEST).read_text())
    model = _onnx_model(source)
    owners = _weights(model)
    known = list(dict.fromkeys(owners.values()))
    unknown = [layer for layer in randomized if layer not in known]
    if unknown:
        raise RandomizeError(f"no layer {unknown[0]!r} in {source}; layers: {', '.join(known)}")
    constants = _constants(model.graph)
    for key, layer in owners.items():
        if layer in randomized:
            constants[key].CopyFrom(_noise(constants[key], key, seed))
    target = Path(repository) / name / "1"
    with staged_package(Path(repository), target) as staging:
        files = [ONNX_FILE]
        if model.ByteSize() > EMBED_LIMIT:
            onnx.save_model(model, str(staging / ONNX_FILE), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE)
            files.append(DATA_FILE)
        else:
            (staging / ONNX_FILE).write_bytes(model.SerializeToString())
        del model
        manifest.update(name=name, version=1)
        manifest["metadata"] = {**manifest.get("metadata", {}), "randomized": {
            "from": manifest_name(source), "layers": list(randomized), "seed": seed,
            "rule": "each weight tensor ~ N(its mean, its std); BatchNorm statistics kept"}}
        tolerance = manifest.get("verification", {}).get("tolerance")
        manifest["verification"] = {"inputs": len(CHECK_BATCHES), "onnxruntime": "runs",
                                     **({"tolerance": tolerance} if tolerance else {})}
        write_manifest(staging, manifest, files)
        _check_runs(staging)
    return target


def manifest_name(package: Path) -> str:
    data = json.loads((Path(package) / MANIFEST).read_text())
    return f"{data['name']} v{data['version']}"


def _check_runs(folder: Path) -> None:
    """Loads the copy as the server would and runs it on random inputs; raises unless
    every output is finite with one row per input."""
    handle = ModelHandle(folder.name, 1, folder)
    handle.load()
    if not handle.ready:
        raise RandomizeError(f"the randomized copy does not load: {handle.error}")
    spec = handle.spec()
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    outputs = [spec.logits_output, *spec.extra_outputs]
    generator = np.random.default_rng(1)
    for batch in CHECK_BATCHES:
        inputs = generator.standard_normal((batch, *shape)).astype(np.float32)
        for output, values in zip(outputs, handle.run(inputs, outputs), strict=True):
            if values.shape[0] != batch or not np.isfinite(values).all():
                raise RandomizeError(f"the randomized copy's {output} is not finite with "
                                     f"one row per input (shape {list(values.shape)})")
