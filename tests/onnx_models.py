"""ONNX models built directly with ``onnx.helper`` (no PyTorch, no exporter) and packaged by
hand, to show that the ONNX-only methods explain a model from any framework."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from saliency_service.core.repository import MANIFEST, ONNX_FILE, sha256_file

OPSET = 17
IR_VERSION = 8


def small_cnn(classes: int = 3, channels: int = 3, size: int = 24, seed: int = 0,
              width: int = 8) -> onnx.ModelProto:
    """Conv → Relu → MaxPool → Conv → Relu → GlobalAveragePool → Flatten → Gemm → "logits",
    NCHW input "input" with a free batch dimension, random weights from ``seed``."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0.0, scale, shape).astype(np.float32), name)

    initializers = [
        weight("w1", width, channels, 3, 3, scale=0.4),
        weight("b1", width, scale=0.1),
        weight("w2", 2 * width, width, 3, 3, scale=0.2),
        weight("b2", 2 * width, scale=0.1),
        weight("w3", classes, 2 * width, scale=1.0),
        weight("b3", classes, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_package(model: onnx.ModelProto, repository: Path, name: str, version: int = 1,
                  mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                  std: tuple[float, ...] = (0.25, 0.25, 0.25),
                  labels: tuple[str, ...] | None = None,
                  outputs: dict[str, str] | None = None) -> Path:
    """A package with ``model.onnx`` and a hand-written manifest only: no scale outputs,
    nothing our exporter would add. ``outputs``: the manifest's (default: a classifier's
    ``logits``)."""
    folder = Path(repository) / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / ONNX_FILE))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [-1, *(int(d.dim_value) for d in dims[1:])]
    classes = int(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    manifest = {
        "format": 1,
        "name": name,
        "version": version,
        "input": {"name": "input", "shape": shape, "mean": list(mean), "std": list(std),
                  "value_range": [0.0, 1.0], "layout": "NCHW", "dtype": "float32"},
        "class_labels": list(labels or (f"class_{i}" for i in range(classes))),
        "outputs": outputs or {"logits": "logits"},
        "files": {ONNX_FILE: {"sha256": sha256_file(folder / ONNX_FILE)}},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def linear_classifier(classes: int = 10, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Flatten → Gemm over 3×size×size pixels, random weights: the graph a converter makes of a
    logistic-regression classifier (e.g. skl2onnx), whose cost per image is tiny next to the
    cost of an ONNX Runtime call."""
    rng = np.random.default_rng(seed)
    weights = (rng.normal(size=(classes, 3 * size * size)) / size).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weights, "w"),
         numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def region_model(size: int = 24, box: tuple[int, int, int, int] = (4, 12, 10, 18),
                 gain: float = 0.05) -> onnx.ModelProto:
    """A linear model whose class-0 logit is ``gain`` × the sum of all channels inside ``box``
    (y0, y1, x0, x1) and whose class-1 logit is 0: the evidence for class 0 is exactly the box,
    so a map of class 0 must put its mass there."""
    y0, y1, x0, x1 = box
    weights = np.zeros((2, 3, size, size), np.float32)
    weights[0, :, y0:y1, x0:x1] = gain
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "region",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weights.reshape(2, -1), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def box_detector(size: int = 32, box: tuple[float, float, float, float] = (4, 4, 20, 20)
                 ) -> onnx.ModelProto:
    """A post-NMS detector ("boxes" N×1×4, "scores" N×1, "classes" N×1) that always reports
    one ``box`` of class 0, scored by the sigmoid of the image's mean: the smallest graph a
    detector method can explain."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["scores"]),
        helper.make_node("Mul", ["scores", "zero"], ["classes"]),
        helper.make_node("Unsqueeze", ["classes", "axis2"], ["c3"]),
        helper.make_node("Add", ["c3", "box"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes, "box_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 1, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
         numpy_helper.from_array(np.asarray([2], np.int64), "axis2"),
         numpy_helper.from_array(np.asarray([[box]], np.float32), "box")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
