"""``make mar`` (``deploy/torchserve/archive.sh``): the ``.mar`` carries what loading reads
(``model.onnx``, ``manifest.json``, the external-data files the manifest lists) and not the
``model.pt2`` older exports wrote; the adapter serves the unpacked archive."""

from __future__ import annotations

import base64
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import archive_package
from saliency_service.packaging.onnx_import import import_onnx
from saliency_service.protocol.torchserve import SaliencyTorchServeHandler
from tests.conftest import TINY_LABELS, TINY_SHAPE
from tests.hostile_models import add_torch_archive
from tests.models import TinyCNN


def _archiver_missing() -> bool:
    return shutil.which("torch-model-archiver",
                        path=str(Path(sys.executable).parent)) is None


@pytest.mark.skipif(_archiver_missing(), reason="torch-model-archiver is not installed")
def test_the_archive_holds_the_external_data_and_no_torch_archive(tmp_path: Path) -> None:
    """A model exported by plain ``torch.onnx.export`` keeps its weights in
    ``model.onnx.data``; the package (with a stale ``model.pt2`` beside it) archives with
    the data file and without the torch archive, and the adapter explains from it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyCNN(len(TINY_LABELS)), (torch.zeros(2, *TINY_SHAPE),),
                          str(tmp_path / "tiny.onnx"), input_names=["input"],
                          output_names=["logits"], dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert (tmp_path / "tiny.onnx.data").is_file()
    report = import_onnx(tmp_path / "tiny.onnx", name="external", repository=tmp_path / "models",
                         output="logits", class_labels=TINY_LABELS)
    add_torch_archive(report.path, len(TINY_LABELS), TINY_SHAPE)
    mar = archive_package(report.path, tmp_path / "store")
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unpacked")
    assert {"model.onnx", "manifest.json", "tiny.onnx.data"} <= names
    assert "model.pt2" not in names
    handler = SaliencyTorchServeHandler()
    handler.load(tmp_path / "unpacked")
    inputs = np.random.default_rng(0).random((1, *TINY_SHAPE), dtype=np.float32)
    body = {"tensor": {"shape": list(inputs.shape),
                       "data": base64.b64encode(inputs.tobytes()).decode()},
            "method": "vanilla_gradient"}
    reply = handler.explain_handle(None, [{"body": body}])[0]
    assert "saliency" in reply, reply
    saliency = np.frombuffer(base64.b64decode(reply["saliency"]), "<f4")
    assert saliency.size == TINY_SHAPE[1] * TINY_SHAPE[2] and np.abs(saliency).max() > 0
