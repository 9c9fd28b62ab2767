"""A global-average-pool + linear head read from a package's ONNX graph, for FastCAM's
backward-free class activation map."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from saliency_service.core.repository import ONNX_FILE, ModelHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearHead:
    """logits = GAP(scale) @ weight.T + bias, read from the package's ONNX graph."""

    weight: np.ndarray  # classes × features
    bias: np.ndarray  # classes

    def cam(self, activations: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """ReLU(Σ_k W[c,k] A_k) / (h·w): the Grad-CAM of this head, N×h×w."""
        _, _, height, width = activations.shape
        rows = self.weight[targets].astype(np.float32)[:, :, None, None]  # N × C × 1 × 1
        cam = (rows * activations.astype(np.float32, copy=False)).sum(axis=1)
        return np.maximum(cam, 0.0) / np.float32(height * width)

    def logits(self, activations: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
        """All logits (N×classes), or only ``classes[n]`` of each item (N) — the latter with
        no matrix product, which BLAS threads make slow on a busy machine."""
        pooled = activations.mean(axis=(2, 3))
        if classes is None:
            return pooled @ self.weight.T + self.bias
        return (pooled * self.weight[classes]).sum(axis=1) + self.bias[classes]


def linear_head(model: ModelHandle) -> LinearHead | None:
    """The package's GAP+linear head weights, or None; read once per loaded package.

    Read from ``model.onnx`` (already checksum-verified, no unpickling, no torch): the
    initializers named after the manifest's linear module, else the Gemm (or MatMul + Add)
    producing the logits. Reading the graph rather than a file written beside it keeps
    every package exported so far usable, and the weights can never disagree with the
    network that served the prediction (each request also checks the logits, see FastCAM).
    """
    spec = model.spec()
    if spec.head.get("type") != "gap_linear":
        return None
    return model.derived("linear_head", _head_or_none)


def _head_or_none(model: ModelHandle) -> LinearHead | None:
    spec = model.spec()
    try:
        return _read_linear_head(model, str(spec.head.get("linear", "")), spec.logits_output)
    except Exception as exc:  # noqa: BLE001 - an unreadable head means the slow path
        log.warning("model %s: cannot read the linear head (%s); FastCAM will use Grad-CAM",
                    model.name, exc)
        return None


def _read_linear_head(model: ModelHandle, linear: str, logits_name: str) -> LinearHead | None:
    import onnx  # noqa: PLC0415 - only needed once per package
    from onnx import numpy_helper  # noqa: PLC0415

    graph = onnx.load(str(model.path / ONNX_FILE)).graph
    initializers = {t.name: t for t in graph.initializer}
    for constant in (n for n in graph.node if n.op_type == "Constant"):  # traced weights
        value = next((a.t for a in constant.attribute if a.name == "value"), None)
        if value is not None:
            initializers[constant.output[0]] = value
    for prefix in ("model.", ""):
        weight = initializers.get(f"{prefix}{linear}.weight")
        if weight is not None:
            bias = initializers.get(f"{prefix}{linear}.bias")
            w = numpy_helper.to_array(weight).astype(np.float32)
            b = (numpy_helper.to_array(bias).astype(np.float32) if bias is not None
                 else np.zeros(w.shape[0], np.float32))
            return LinearHead(w, b)
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(logits_name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and node.input[1] in initializers and not attrs.get("transA", 0):
        b_matrix = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        w = b_matrix if attrs.get("transB", 0) else b_matrix.T
        w = w * np.float32(attrs.get("alpha", 1.0))
        bias = np.zeros(w.shape[0], np.float32)
        if len(node.input) > 2 and node.input[2] in initializers:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            bias = np.broadcast_to(bias * np.float32(attrs.get("beta", 1.0)), w.shape[:1])
        return LinearHead(w, np.array(bias, np.float32))
    if node.op_type == "Add":
        matmul = next((producers[i] for i in node.input if i in producers
                       and producers[i].op_type == "MatMul"), None)
        bias_name = next((i for i in node.input if i in initializers), None)
        if matmul is not None and matmul.input[1] in initializers:
            w = numpy_helper.to_array(initializers[matmul.input[1]]).astype(np.float32).T
            bias = (numpy_helper.to_array(initializers[bias_name]).astype(np.float32)
                    if bias_name else np.zeros(w.shape[0], np.float32))
            return LinearHead(w, bias)
    return None
