"""Where a translated graph starts to differ from ONNX Runtime: every node's output is compared
in graph order, so a refusal names the operator and node to look at, not only the output."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.reasons import op_label
from saliency_service.methods._utils.onnx_to_fx.walker import _skeleton, _Translation

# Intermediate outputs held at once by both runtimes (one row); larger graphs are not searched.
MAX_SEARCH_BYTES = 512 * 1024 * 1024


def first_difference(model: onnx.ModelProto, inputs: np.ndarray, tolerance: float) -> str:
    """The first node whose translated output differs from ONNX Runtime's by more than
    ``tolerance`` of that output's largest magnitude, as "<op> node '<name>' …" text; "" when
    none does (the difference builds up over many nodes) or the graph is too large to search.

    ``inputs`` is a batch in the graph's own layout; only its first row is used. Never raises:
    the search only adds to a refusal already made."""
    try:
        return _search(model, inputs, tolerance)
    except Exception:
        return ""


def _search(model: onnx.ModelProto, inputs: np.ndarray, tolerance: float) -> str:
    translation = _Translation(model)
    module, _ = translation.run()
    producers = {out: node for node in model.graph.node for out in node.output if out}
    names = [name for name in producers
             if isinstance(translation.values.get(name), fx.Node)
             and not getattr(translation.values[name], "_erased", False)]
    row = inputs[:1]
    types = _row_types(model, row.shape)
    sizes = [_bytes(types.get(name)) for name in names]
    if not names or None in sizes or sum(sizes) > MAX_SEARCH_BYTES:  # type: ignore[arg-type]
        return ""
    graph = translation.builder.graph
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (tuple(translation.values[name] for name in names),)
    with torch.no_grad():
        ours = fx.GraphModule(module, graph)(torch.from_numpy(np.ascontiguousarray(row)))
    theirs = _reference(model, names, row)
    for name, got, want in zip(names, ours, theirs, strict=True):
        if not isinstance(got, torch.Tensor) or not np.issubdtype(want.dtype, np.floating):
            continue
        got = got.detach().double().numpy()
        if got.shape != want.shape:
            return _where(producers[name], name, f"has shape {list(got.shape)}, ONNX "
                                                 f"Runtime's {list(want.shape)}")
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-12)
        error = float(np.abs(got - want).max(initial=0.0)) / scale
        if not error <= tolerance:
            return _where(producers[name], name, f"differs by {error:.1e} of its scale")
    return ""


def _row_types(model: onnx.ModelProto, shape: tuple[int, ...]) -> dict[str, onnx.TypeProto]:
    """Every value's type when the graph's input has ``shape`` (shape inference, no weights
    copied)."""
    skeleton = _skeleton(model)
    initializers = {t.name for t in model.graph.initializer}
    source = next(i.name for i in model.graph.input if i.name not in initializers)
    for value in skeleton.graph.input:
        if value.name == source:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shape:
                dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False,
                                                     data_prop=True)
    except Exception:
        return {}
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.output)}


def _bytes(value_type: onnx.TypeProto | None) -> int | None:
    """Bytes (as float64) of a value whose dimensions shape inference fixed, else None."""
    if value_type is None or not value_type.HasField("tensor_type"):
        return None
    dims = value_type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return 8 * math.prod(d.dim_value for d in dims)


def _reference(model: onnx.ModelProto, names: list[str], row: np.ndarray) -> list[np.ndarray]:
    """ONNX Runtime's values of ``names`` on ``row`` (the file's graph, outputs added)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(exposed.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    dtype = np.float16 if source.type == "tensor(float16)" else (
        np.float64 if source.type == "tensor(double)" else np.float32)
    return session.run(names, {source.name: row.astype(dtype)})


def _where(node: onnx.NodeProto, name: str, what: str) -> str:
    label = repr(node.name[:80]) if node.name else f"making {name[:80]!r}"
    return f"it first differs at {op_label(node)} node {label}, whose output {what}"
