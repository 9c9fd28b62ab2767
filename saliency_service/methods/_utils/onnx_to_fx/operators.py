"""The op table (ONNX op type → translation) and which operators of a graph it lacks."""

from __future__ import annotations

import onnx
from onnx import AttributeProto

from saliency_service.methods._utils.onnx_to_fx.builder import Translate
from saliency_service.methods._utils.onnx_to_fx.nn_ops import OPS as NN_OPS
from saliency_service.methods._utils.onnx_to_fx.reasons import DEFAULT_DOMAINS, op_label
from saliency_service.methods._utils.onnx_to_fx.resize import OPS as RESIZE_OPS
from saliency_service.methods._utils.onnx_to_fx.shapes import OPS as SHAPE_OPS
from saliency_service.methods._utils.onnx_to_fx.tensor_ops import OPS as TENSOR_OPS

OPS: dict[str, Translate] = {**TENSOR_OPS, **NN_OPS, **RESIZE_OPS, **SHAPE_OPS}


def unsupported_operators(model: onnx.ModelProto) -> list[str]:
    """The op types of ``model`` that cannot be translated, sorted ([] when all can)."""
    found = set()
    for node in model.graph.node:
        subgraph = any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
                       for a in node.attribute)
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in OPS or subgraph:
            found.add(op_label(node))
    return sorted(found)
