"""Translates an ONNX graph into a differentiable ``torch.fx`` GraphModule of aten ops.

Gradient methods need a torch graph; ONNX files from any exporter can give one without a
``torch.export`` archive. The file is read as plain data: each node's op type is looked up in
a fixed table of translation functions written here, attributes are numbers, strings and
tensors, and nothing from the file is ever run as code (no eval, exec, pickle or attribute
lookup by a name from the file; node and buffer names in the FX graph are our own).

The graph uses the aten overloads that :mod:`torch_program`'s passes rewrite (``conv2d``,
``batch_norm``, ``relu``, ``add.Tensor``), so BatchNorm folding, guided ReLUs, Grad-CAM cuts,
the stem split and channels-last weights work on it as on a ``torch.export`` program.

Nodes whose inputs are all constants are computed once here and stored as buffers. Shape
arithmetic on the input's runtime shape (``Shape → Gather → Concat → Reshape``) stays in the
graph as small int64 computations, so the batch dimension stays free. ``node.meta["val"]``
holds a fake tensor with a symbolic batch size when the input's other dimensions are fixed.

Modules: ``walker`` (one pass over the graph builds the module), ``builder`` (emits nodes or
folds constants), ``operators`` (the op table), ``shapes``, ``tensor_ops``, ``nn_ops`` and
``resize`` (the translations), ``data`` (tensors and attributes from the protobuf),
``annotate`` (``node.meta["val"]``), ``reasons`` (why a graph cannot be translated),
``divergence`` (the first node whose output differs from ONNX Runtime's).

Use: ``torch_program.build_variant(GraphProgram(to_graph_module(onnx.load(path))), variant)``.
"""

from saliency_service.methods._utils.onnx_to_fx.data import MAX_BYTES
from saliency_service.methods._utils.onnx_to_fx.divergence import first_difference
from saliency_service.methods._utils.onnx_to_fx.operators import unsupported_operators
from saliency_service.methods._utils.onnx_to_fx.reasons import UnsupportedGraph
from saliency_service.methods._utils.onnx_to_fx.walker import GraphProgram, to_graph_module

__all__ = ["MAX_BYTES", "GraphProgram", "UnsupportedGraph", "first_difference",
           "to_graph_module", "unsupported_operators"]
