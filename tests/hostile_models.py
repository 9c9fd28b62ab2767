"""Packages a server must survive: a model whose run never ends, manifests that lie, the
``torch.export`` archive (``model.pt2``) earlier exports wrote beside the ONNX file."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from saliency_service.core.repository import MANIFEST
from tests.models import TinyCNN
from tests.onnx_models import IR_VERSION, OPSET, write_package

TORCH_ARCHIVE = "model.pt2"

LOOP_SIZE = 8
LOOP_CLASSES = 4


def never_ending_model() -> onnx.ModelProto:
    """A classifier whose scores come out of a Loop of 2**63 - 1 trips: a run never ends
    (ONNX Runtime checks its terminate flag between the trips)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["condition_in"], ["condition_out"]),
         helper.make_node("Add", ["total_in", "one"], ["total_out"])],
        "body",
        [helper.make_tensor_value_info("trip", TensorProto.INT64, []),
         helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total_out", TensorProto.FLOAT, None)],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "axis"], ["column"]),
        helper.make_node("Loop", ["trips", "forever", "column"], ["total"], body=body),
        helper.make_node("Tile", ["total", "repeats"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "never_ends",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["N", 3, LOOP_SIZE, LOOP_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", LOOP_CLASSES])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [2**63 - 1]),
         helper.make_tensor("forever", TensorProto.BOOL, [], [True]),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
         helper.make_tensor("repeats", TensorProto.INT64, [2], [1, LOOP_CLASSES])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_never_ending_package(repository: Path, name: str = "loop") -> Path:
    return write_package(never_ending_model(), repository, name)


def copy_with_manifest(source: Path, repository: Path, name: str,
                       **changes: Any) -> Path:
    """A copy of the package folder ``source`` as ``repository/name/1`` whose manifest has
    ``changes`` (``input__shape=[...]`` sets ``manifest["input"]["shape"]``)."""
    folder = repository / name / "1"
    shutil.copytree(source, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["name"] = name
    for key, value in changes.items():
        *parents, last = key.split("__")
        target = manifest
        for parent in parents:
            target = target[parent]
        target[last] = value
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@functools.cache
def torch_archive(classes: int, shape: tuple[int, int, int]) -> bytes:
    """The ``model.pt2`` an earlier ``saliency export`` of ``TinyCNN(classes)`` wrote:
    ``torch.export.save`` of its program with a free batch dimension."""
    import torch  # noqa: PLC0415

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(TinyCNN(classes), (torch.zeros(2, *shape),),
                                  dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def add_torch_archive(package: Path, classes: int, shape: tuple[int, int, int],
                      listed: bool = True) -> Path:
    """Puts that archive beside the package's ONNX file, listed in its manifest with its
    sha256 (as those exports did) when ``listed``; returns the archive's path."""
    path = package / TORCH_ARCHIVE
    path.write_bytes(torch_archive(classes, shape))
    if listed:
        manifest = json.loads((package / MANIFEST).read_text())
        manifest["files"][TORCH_ARCHIVE] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        (package / MANIFEST).write_text(json.dumps(manifest))
    return path
