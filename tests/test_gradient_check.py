"""The check that a translated graph reproduces ONNX Runtime before gradient methods are
offered: probabilities are compared on their 0…1 scale, and a graph that differs is refused
with the operator and node where it starts to differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from saliency_service.core.repository import MANIFEST, ONNX_FILE, Repository, sha256_file
from saliency_service.methods._utils.gradient_program import gradient_problem

SIZE = 8


def quiet_multilabel(offset: float = -16.0) -> onnx.ModelProto:
    """Sigmoid(Gemm(x) + offset): a multi-label model that finds nothing in random inputs,
    every probability ~1e-7, where ONNX Runtime's Sigmoid is exact to ~1e-7 absolute only."""
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.05, (3, 3 * SIZE * SIZE)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1),
             helper.make_node("Sigmoid", ["logits"], ["probabilities"])]
    graph = helper.make_graph(
        nodes, "quiet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "w"),
         numpy_helper.from_array(np.full(3, offset, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def load(model: onnx.ModelProto, root: Path, kind: str, size: int = SIZE,
         output: str = "probabilities") -> Repository:
    folder = root / "quiet" / "1"
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / ONNX_FILE))
    manifest = {
        "format": 1, "name": "quiet", "version": 1,
        "input": {"name": "input", "shape": [-1, 3, size, size], "mean": [0.5] * 3,
                  "std": [0.25] * 3, "value_range": [0.0, 1.0], "layout": "NCHW",
                  "dtype": "float32"},
        "class_labels": ["a", "b", "c"],
        "outputs": {"kind": kind, "logits": output},
        "files": {ONNX_FILE: {"sha256": sha256_file(folder / ONNX_FILE)}},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    repository = Repository(root, intra_op_threads=1)
    repository.load_all()
    return repository


def test_tiny_probabilities_are_compared_on_their_own_scale(tmp_path: Path) -> None:
    repository = load(quiet_multilabel(), tmp_path, "sigmoid")
    assert gradient_problem(repository.get("quiet")) == ""


def shrinking_classifier() -> onnx.ModelProto:
    """Gemm(Flatten(Resize(x))) on 3×7×7 inputs, whose Resize (nearest, asymmetric,
    round_prefer_ceil, 7 → 4 columns) ONNX Runtime rounds up where float32 arithmetic puts
    column 2 just below 3.5: a translation that is not exact, upstream of the logits."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Resize", ["input", "", "", "sizes"], ["small"], name="shrink",
                              mode="nearest", coordinate_transformation_mode="asymmetric",
                              nearest_mode="round_prefer_ceil"),
             helper.make_node("Flatten", ["small"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "shrinking",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 7, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array([1, 3, 7, 4], np.int64), "sizes"),
         numpy_helper.from_array(rng.normal(0, 1, (3, 3 * 7 * 4)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_graph_that_differs_is_refused_naming_the_operator_and_node(tmp_path: Path) -> None:
    repository = load(shrinking_classifier(), tmp_path, "logits", size=7, output="logits")
    problem = gradient_problem(repository.get("quiet"))
    assert "the translated graph's output 'logits' differs from ONNX Runtime's" in problem
    assert "; it first differs at Resize node 'shrink', whose output differs by" in problem, \
        problem
