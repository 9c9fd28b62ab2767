"""Hostile and broken model packages against the real server: nothing from a package runs
code on load (or on reload): a ``model.pt2`` that earlier exports wrote is never read, even
when it would run code; manifest paths stay inside the package, and a package that cannot
serve its own manifest is not ready. The other packages keep serving throughout."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from saliency_service.client.client import SaliencyClient
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import TINY_LABELS, TINY_SHAPE, RunningServer, make_config
from tests.hostile_models import add_torch_archive


def code_running_pickle(marker: Path) -> bytes:
    """A protocol-0 pickle that creates ``marker`` when unpickled (``open(marker, 'w')``)."""
    return f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()


def rewrite_archive(path: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Rewrites the zip at ``path`` with ``edit`` applied to its {member: bytes}."""
    with zipfile.ZipFile(path) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    edit(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as target:
        for name, data in members.items():
            target.writestr(name, data)
    path.write_bytes(buffer.getvalue())


def reseal(package: Path) -> None:
    """Updates the manifest's sha256 of every listed file, as an attacker would."""
    manifest = json.loads((package / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        target = package / name
        if target.is_file():
            entry["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (package / "manifest.json").write_text(json.dumps(manifest))


def copy_package(repository: Path, root: Path, name: str) -> Path:
    package = root / name / "1"
    shutil.copytree(repository / "tiny" / "1", package)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["name"] = name
    (package / "manifest.json").write_text(json.dumps(manifest))
    return package


def member(members: dict[str, bytes], suffix: str) -> str:
    return next(name for name in members if name.endswith(suffix))


def plant_pickle(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        members[member(members, "data/sample_inputs/model.pt")] = code_running_pickle(marker)
    return edit


def pickled_weight(members: dict[str, bytes]) -> None:
    name = member(members, "model_weights_config.json")
    config = json.loads(members[name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    members[name] = json.dumps(config).encode()


def compiled_code(members: dict[str, bytes]) -> None:
    prefix = member(members, "archive_format").removesuffix("archive_format")
    members[prefix + "data/aotinductor/model/model.so"] = b"\x7fELF"


def manifest_files(entries: dict[str, str]) -> Callable[[Path], None]:
    def edit(package: Path) -> None:
        manifest = json.loads((package / "manifest.json").read_text())
        for name, sha in entries.items():
            manifest["files"][name] = {"sha256": sha}
        (package / "manifest.json").write_text(json.dumps(manifest))
    return edit


TORCH_PACKAGES = ("planted", "planted_unlisted", "pickled_weight", "compiled", "unreadable")


def torch_package(repository: Path, root: Path, name: str,
                  edit: Callable[[dict[str, bytes]], None], listed: bool = True) -> Path:
    """A copy of the tiny package carrying a hostile ``model.pt2`` made by ``edit``, listed
    in the manifest with its sha256 (as older exports listed it) unless ``listed`` is off."""
    package = copy_package(repository, root, name)
    archive = add_torch_archive(package, len(TINY_LABELS), TINY_SHAPE, listed)
    rewrite_archive(archive, edit)
    reseal(package)
    return package


@pytest.fixture(scope="module")
def hostile(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[RunningServer, Path]]:
    """A server over the good tiny package and hostile ones beside it."""
    root = tmp_path_factory.mktemp("hostile")
    markers = tmp_path_factory.mktemp("markers")
    shutil.copytree(repository / "tiny", root / "tiny")
    torch_package(repository, root, "planted", plant_pickle(markers / "planted"))
    torch_package(repository, root, "planted_unlisted",
                  plant_pickle(markers / "planted_unlisted"), listed=False)
    for name, edit in (("pickled_weight", pickled_weight), ("compiled", compiled_code)):
        torch_package(repository, root, name, edit)
    # A named pipe: opening it to read would block the loader, so ready means never opened.
    unreadable = copy_package(repository, root, "unreadable")
    os.mkfifo(unreadable / "model.pt2")
    manifest_files({"model.pt2": "0" * 64})(unreadable)
    host_sha = hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest() if Path(
        "/etc/hostname").is_file() else "0" * 64
    for name, entries in (("escape", {"../../../../etc/hostname": host_sha}),
                          ("absolute", {"/etc/hostname": host_sha})):
        manifest_files(entries)(copy_package(repository, root, name))
    linked = copy_package(repository, root, "symlink")
    (linked / "labels.txt").symlink_to("/etc/hostname")
    manifest_files({"labels.txt": host_sha})(linked)
    mismatch = copy_package(repository, root, "mismatch")
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["input"]["shape"] = [1, 1, *TINY_SHAPE[1:]]
    manifest["input"]["mean"], manifest["input"]["std"] = [0.5], [0.25]
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    running = RunningServer(make_config(root)).start()
    yield running, markers
    running.stop()


def statuses(server: RunningServer) -> dict[str, pb.ModelStatus]:
    with grpc.insecure_channel(server.address) as channel:
        listed = pb_grpc.ExplainerStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return {model.name: model for model in listed.models}


def test_a_planted_pickle_never_runs_on_load_or_reload(hostile: tuple[RunningServer, Path]
                                                       ) -> None:
    """The archive is never read: the package is ready on its ONNX graph, listed in the
    manifest or not, and the pickle's marker is never written."""
    server, markers = hostile
    for _ in range(2):
        for name in ("planted", "planted_unlisted"):
            status = statuses(server)[name]
            assert status.ready, status.error
            assert not (markers / name).exists()
        server.call(server.server.reload(force=True))
    assert not list(markers.iterdir())


@pytest.mark.parametrize("name", TORCH_PACKAGES)
def test_a_package_with_a_torch_archive_serves_from_its_onnx_graph(
        hostile: tuple[RunningServer, Path], name: str) -> None:
    """Predictions, an ONNX method and a gradient method answer as for the same package
    without the archive."""
    server, markers = hostile
    assert statuses(server)[name].ready
    pixels = np.random.default_rng(0).random((2, *TINY_SHAPE), dtype=np.float32)
    with SaliencyClient(server.address, timeout=120) as client:
        methods = {m.name for m in client.get_model(name).methods}
        assert {"vanilla_gradient", "gradcam", "occlusion"} <= methods, methods
        for method in ("vanilla_gradient", "occlusion"):
            ours = client.explain(name, method, tensor=pixels, target=[0, 1], seed=0).maps
            plain = client.explain("tiny", method, tensor=pixels, target=[0, 1], seed=0).maps
            np.testing.assert_array_equal(ours, plain)
        ours_top = client.predict(name, tensor=pixels).predictions
        plain_top = client.predict("tiny", tensor=pixels).predictions
    assert [list(p.top) for p in ours_top] == [list(p.top) for p in plain_top]
    assert not list(markers.iterdir())


@pytest.mark.parametrize(("name", "words"), [
    ("escape", "must be a path inside the package folder"),
    ("absolute", "must be a path inside the package folder"),
    ("symlink", "leads outside the package folder"),
])
def test_manifest_files_must_stay_inside_the_package(
        hostile: tuple[RunningServer, Path], name: str, words: str) -> None:
    status = statuses(hostile[0])[name]
    assert not status.ready and words in status.error
    host = Path("/etc/hostname")
    if host.is_file():  # nothing of the host file's hash leaks into the message
        assert hashlib.sha256(host.read_bytes()).hexdigest()[:8] not in status.error


def test_a_package_whose_warm_up_fails_is_not_ready(hostile: tuple[RunningServer, Path]
                                                    ) -> None:
    status = statuses(hostile[0])["mismatch"]
    assert not status.ready
    assert status.error.startswith("warm-up failed: predict:")


def test_the_good_package_serves_beside_the_hostile_ones(
        hostile: tuple[RunningServer, Path]) -> None:
    server, _ = hostile
    assert statuses(server)["tiny"].ready
    inputs = np.zeros((1, *TINY_SHAPE), np.float32)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        reply = stub.Predict(pb.PredictRequest(model="tiny", input=pb.Input(
            tensor=array_to_tensor(inputs))), timeout=30)
        assert reply.predictions[0].top
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(pb.PredictRequest(model="escape", input=pb.Input(
                tensor=array_to_tensor(inputs))), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "inside the package folder" in refused.value.details()


def test_torch_alone_would_have_run_the_planted_pickle(repository: Path, tmp_path: Path
                                                       ) -> None:
    """The planted archive is a real attack: plain ``torch.export.load`` runs it (with
    torch's default unpickling), which the server never calls."""
    marker = tmp_path / "marker"
    package = torch_package(repository, tmp_path, "planted", plant_pickle(marker))
    environment = {k: v for k, v in os.environ.items() if "WEIGHTS_ONLY" not in k}
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.export.load(sys.argv[1])",
                    str(package / "model.pt2")], env=environment, capture_output=True,
                   timeout=120, check=False)
    assert marker.exists()
