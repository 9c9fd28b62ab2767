"""The graph walker: one pass over the ONNX graph, in its node order, builds the
GraphModule; ONNX shape inference tells the translations what is known of each input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from onnx import TensorProto
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.annotate import annotate
from saliency_service.methods._utils.onnx_to_fx.builder import Builder, Op, Value
from saliency_service.methods._utils.onnx_to_fx.data import (
    DTYPES,
    attribute_value,
    checked_attribute,
    read_tensor,
)
from saliency_service.methods._utils.onnx_to_fx.operators import OPS, unsupported_operators
from saliency_service.methods._utils.onnx_to_fx.reasons import (
    DEFAULT_DOMAINS,
    Problem,
    UnsupportedGraph,
    op_label,
)


def _opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return int(versions[0]) if versions else 21


_SMALL_INITIALIZER = 4096  # elements: shape arithmetic's constants, kept for inference


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without the file's value_info, output shapes or large weights (declared as
    inputs instead): what shape inference needs, without copying the weights."""
    skeleton = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, source = skeleton.graph, model.graph
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        if math.prod(tensor.dims) <= _SMALL_INITIALIZER and \
                tensor.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _static_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types found by ONNX's shape inference, ignoring the file's own value_info."""
    skeleton = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False,
                                                     data_prop=True)
    except Exception:
        inferred = skeleton
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.input, *graph.output)}


def _type_facts(value_type: onnx.TypeProto | None) -> tuple[tuple | None, torch.dtype | None]:
    if value_type is None or not value_type.HasField("tensor_type"):
        return None, None
    tensor_type = value_type.tensor_type
    dtype = DTYPES.get(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return None, dtype
    dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                 for d in tensor_type.shape.dim)
    return dims, dtype


class _Translation:
    """One pass over the ONNX graph, in its (topological) node order."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = _opset(model)
        self.builder = Builder()
        self.values: dict[str, Value] = {}
        self.failed: set[str] = set()
        self.problems: list[str] = []
        self.types = _static_types(model)

    def run(self) -> tuple[fx.GraphModule, onnx.ValueInfoProto]:
        source = self._inputs()
        used = {name for node in self.graph.node for name in node.input}
        used |= {o.name for o in self.graph.output}
        for node in self.graph.node:
            self._node(node, used)
        outputs = [self._output(o.name) for o in self.graph.output]
        if self.problems:
            raise UnsupportedGraph("; ".join(dict.fromkeys(self.problems)))
        self.builder.graph.output(tuple(outputs))
        module = fx.GraphModule(self.builder.root, self.builder.graph)
        module.graph.eliminate_dead_code()
        module.recompile()
        return module, source

    def _inputs(self) -> onnx.ValueInfoProto:
        initializers = {t.name for t in self.graph.initializer}
        for tensor in self.graph.initializer:
            try:
                self.values[tensor.name] = read_tensor(tensor, f"initializer {tensor.name!r}")
            except Problem as exc:
                self.problems.append(str(exc))
                self.failed.add(tensor.name)
        if len(self.graph.sparse_initializer):
            self.problems.append("sparse initializers")
        sources = [i for i in self.graph.input if i.name not in initializers]
        if len(sources) != 1:
            raise UnsupportedGraph(f"the graph must take one input tensor, it takes "
                                   f"{len(sources)}")
        elem = sources[0].type.tensor_type.elem_type
        if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            raise UnsupportedGraph("the graph's input is not a float tensor")
        self.values[sources[0].name] = self.builder.graph.placeholder("x")
        return sources[0]

    def _facts(self, name: str) -> tuple[tuple | None, torch.dtype | None]:
        value = self.values.get(name)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype
        return _type_facts(self.types.get(name))

    def _node(self, node: onnx.NodeProto, used: set[str]) -> None:
        label = op_label(node)
        names = list(node.input)
        if any(n in self.failed for n in names if n):
            self.failed.update(node.output)
            return
        missing = [n for n in names if n and n not in self.values]
        if missing:
            self.problems.append(f"{label} reads {missing[0]!r} before it is computed")
            self.failed.update(node.output)
            return
        facts = [self._facts(n) if n else (None, None) for n in names]
        op = Op(op_type=node.op_type, opset=self.opset,
                 inputs=[self.values[n] if n else None for n in names],
                 shapes=[f[0] for f in facts], dtypes=[f[1] for f in facts],
                 attrs={},
                 used=[bool(o) and o in used for o in node.output])
        try:
            op.attrs = {a.name: checked_attribute(a.name, attribute_value(a))
                        for a in node.attribute}
            results = OPS[node.op_type](self.builder, op)
        except Problem as exc:
            self.problems.append(f"{label}: {exc}")
            self.failed.update(node.output)
            return
        except Exception as exc:  # never let a malformed graph escape as another error
            self.problems.append(f"{label}: {type(exc).__name__}: {exc}")
            self.failed.update(node.output)
            return
        for name, value in zip(node.output, results, strict=False):
            if name:
                if isinstance(value, fx.Node):
                    value.meta["onnx_node"] = node.name
                    value.meta["onnx_op"] = node.op_type
                    # Every ONNX tensor this node holds (an Identity adds its own name).
                    value.meta.setdefault("onnx_tensors", []).append(name)
                self.values[name] = value
        for name, is_used in zip(node.output[len(results):], op.used[len(results):],
                                 strict=False):
            if is_used:
                self.problems.append(f"{label}: output {name!r} is not computed")

    def _output(self, name: str) -> Any:
        value = self.values.get(name)
        if value is None:
            if name not in self.failed:
                self.problems.append(f"graph output {name!r} is never computed")
            return None
        if isinstance(value, torch.Tensor):
            return self.builder.constant(value)
        if not isinstance(value, fx.Node):
            return self.builder.constant(torch.tensor(value))
        return value


def to_graph_module(model: onnx.ModelProto) -> fx.GraphModule:
    """The ONNX graph as a GraphModule of aten ops: ``forward(x)`` takes the graph's one
    input (float32, any batch size) and returns a tuple of its outputs in order.

    Raises :class:`UnsupportedGraph` naming every operator, attribute or tensor it cannot
    translate, and when the translated graph fails on an example input of the declared
    shape (checked when all of the input's dimensions but the batch are fixed)."""
    unsupported = unsupported_operators(model)
    if unsupported:
        raise UnsupportedGraph(
            f"operators not supported for gradients: {', '.join(unsupported)}")
    try:
        module, source = _Translation(model).run()
        annotate(module, source)
    except UnsupportedGraph:
        raise
    except Exception as exc:  # a malformed graph never escapes as another error
        raise UnsupportedGraph(f"cannot translate the graph: {type(exc).__name__}: {exc}"
                               ) from exc
    return module


@dataclass(frozen=True)
class GraphProgram:
    """Stands in for a ``torch.export.ExportedProgram`` where only ``module()`` is used
    (``torch_program.build_variant``): each call returns a fresh copy to rewrite."""

    graph_module: fx.GraphModule

    def module(self) -> fx.GraphModule:
        return copy.deepcopy(self.graph_module)
