"""ONNX models whose weights live in external data files, as ``torch.onnx.export`` writes
them by default: ``saliency import`` embeds the data in the package (listed and hashed) and
the server loads it from there, never from its working directory; data kept outside the
model's folder is refused at import with one line."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from saliency_service.core.repository import ModelHandle, sha256_file
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import RunningServer, make_config, run_cli

SHAPE = (3, 16, 16)
CLASSES = 5


class Small(torch.nn.Module):
    """A classifier big enough that the exporter moves its weights to external data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 3)
        self.head = torch.nn.Linear(64, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` + ``model.onnx.data`` from ``torch.onnx.export(dynamo=True)``."""
    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(Small().eval(), (torch.zeros(1, *SHAPE),), str(folder / "model.onnx"),
                          dynamo=True, input_names=["images"], output_names=["logits"])
    assert (folder / "model.onnx.data").is_file()
    return folder / "model.onnx"



@pytest.fixture(scope="module")
def imported(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[RunningServer, Path]]:
    """The exported model imported from another working directory, and a server on it
    started from a third."""
    repository = tmp_path_factory.mktemp("repository")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("import_cwd"))
        code, _, err = run_cli("import", str(exported), "--name", "external", "--models",
                               str(repository))
        assert code == 0, err
        patch.chdir(tmp_path_factory.mktemp("server_cwd"))
        running = RunningServer(make_config(repository)).start()
        try:
            yield running, repository / "external" / "1"
        finally:
            running.stop()


def test_import_copies_the_external_data_into_the_package_listed_and_hashed(
        imported: tuple[RunningServer, Path], exported: Path) -> None:
    _, package = imported
    manifest = json.loads((package / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data"}
    data = package / "model.onnx.data"
    assert data.read_bytes() == (exported.parent / "model.onnx.data").read_bytes()
    assert manifest["files"]["model.onnx.data"]["sha256"] == sha256_file(data)


def test_the_server_predicts_what_onnx_runtime_gives_on_the_original(
        imported: tuple[RunningServer, Path], exported: Path) -> None:
    server, _ = imported
    inputs = np.random.default_rng(1).normal(size=(3, *SHAPE)).astype(np.float32)
    original = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    expected = np.concatenate([original.run(["logits"], {"images": inputs[i:i + 1]})[0]
                               for i in range(len(inputs))])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        assert listed["external"].ready, listed["external"].error
        reply = stub.Predict(pb.PredictRequest(model="external", input=pb.Input(
            tensor=array_to_tensor(inputs))), timeout=60)
    np.testing.assert_allclose(tensor_to_array(reply.logits), expected, rtol=1e-5, atol=1e-5)


def test_a_changed_data_file_is_refused_by_its_hash(
        imported: tuple[RunningServer, Path], tmp_path: Path) -> None:
    package = imported[1]
    copy = tmp_path / "external" / "1"
    copy.mkdir(parents=True)
    for name in ("manifest.json", "model.onnx", "model.onnx.data"):
        (copy / name).write_bytes((package / name).read_bytes())
    with (copy / "model.onnx.data").open("r+b") as data:
        data.write(b"\xff\xff\xff\x7f")
    handle = ModelHandle("external", 1, copy)
    handle.load()
    assert not handle.ready and "model.onnx.data: sha256 does not match" in handle.error


def relocated(exported: Path, folder: Path, location: str) -> Path:
    """A copy of ``exported`` in ``folder`` whose external data is at ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load_model_from_string(exported.read_bytes())
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


@pytest.mark.parametrize(("case", "words"), [
    ("parent", "is not a relative path inside the model's folder"),
    ("absolute", "is not a relative path inside the model's folder"),
    ("symlink", "lies outside the model's folder"),
    ("missing", "is not a data file beside the model"),
])
def test_import_refuses_external_data_outside_the_models_folder(
        exported: Path, tmp_path: Path, case: str, words: str) -> None:
    data = (exported.parent / "model.onnx.data").read_bytes()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data)
    folder = tmp_path / "model"
    if case == "parent":
        source = relocated(exported, folder, "../outside.bin")
    elif case == "absolute":
        source = relocated(exported, folder, str(outside))
    elif case == "symlink":
        source = relocated(exported, folder, "weights.bin")
        (folder / "weights.bin").symlink_to(outside)
    else:
        source = relocated(exported, folder, "weights.bin")
    code, out, err = run_cli("import", str(source), "--name", "refused", "--models",
                             str(tmp_path / "repository"))
    assert code != 0 and not out
    assert len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "repository" / "refused").exists()
