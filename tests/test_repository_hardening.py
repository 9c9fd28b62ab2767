"""Hostile manifests: every field is checked at load, and a package that fails is not ready
with the reason while the others serve, at start-up and on a SIGHUP reload."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from saliency_service.core.repository import InvalidManifest, Manifest, Repository
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from tests.hostile_models import copy_with_manifest
from tests.test_production_shutdown import ServeProcess

GOOD = {
    "format": 1, "name": "m", "version": 1,
    "input": {"name": "input", "shape": [-1, 3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
              "value_range": [0.0, 1.0], "layout": "NCHW", "dtype": "float32"},
    "class_labels": ["a", "b"], "outputs": {"logits": "logits"},
    "files": {"model.onnx": {"sha256": "0" * 64}},
}

# (field changed, value, words the refusal must hold)
HOSTILE = [
    ("input.shape", [-1, 3, -5, 32], "input.shape"),
    ("input.shape", [-1, 3, 200000, 200000], "pixels"),
    ("input.shape", [1e8, 3, 32, 32], "integers"),
    ("input.shape", [100_000_000, 3, 32, 32], "batch size"),
    ("input.shape", [-1, 3, 32], "4 integers"),
    ("input.shape", [-1, 7, 32, 32], "channels"),
    ("input.shape", "big", "must be a list"),
    ("input.mean", [0.5, 0.5], "2 values for 3 channels"),
    ("input.mean", [float("nan")] * 3, "finite"),
    ("input.std", [0.25, 0.0, 0.25], "> 0"),
    ("input.std", [1e309] * 3, "finite"),
    ("input.value_range", [1.0, 0.0], "low < high"),
    ("input.value_range", [0.0], "low < high"),
    ("input.dtype", "float64", "float32"),
    ("input.layout", "CHWN", "NCHW"),
    ("class_labels", ["x" * 10_000], "characters"),
    ("class_labels", [1, 2], "must be a string"),
    ("outputs.kind", "odds", "logits"),
    ("outputs.logits", 5, "must be a string"),
    ("name", None, "lacks name"),
    ("version", "one", "integer"),
    ("files", {"model.onnx": {"sha256": 7}}, "sha256"),
]


def changed(field: str, value: Any) -> dict[str, Any]:
    manifest = json.loads(json.dumps(GOOD))
    *parents, last = field.split(".")
    target = manifest
    for parent in parents:
        target = target[parent]
    target[last] = value
    return manifest


@pytest.mark.parametrize(("field", "value", "words"), HOSTILE,
                         ids=[f"{f}={str(v)[:24]}" for f, v, _ in HOSTILE])
def test_every_manifest_field_is_checked(field: str, value: Any, words: str) -> None:
    with pytest.raises(InvalidManifest) as refused:
        Manifest.from_json(changed(field, value))
    message = str(refused.value)
    assert words in message and field.split(".")[-1] in message, message
    assert len(message) < 300


def test_one_mean_or_std_value_stands_for_every_channel() -> None:
    manifest = Manifest.from_json(changed("input.mean", [0.5]))
    assert manifest.input.mean == (0.5, 0.5, 0.5)
    assert Manifest.from_json(GOOD).input.std == (0.25, 0.25, 0.25)


def test_the_repository_answers_unavailable_until_it_has_been_scanned(tmp_path: Path) -> None:
    from saliency_service.core.errors import NotFound, Unavailable

    repository = Repository(tmp_path)
    with pytest.raises(Unavailable, match="models are loading"):
        repository.get("tiny")
    repository.load_all()
    with pytest.raises(NotFound, match="available models"):
        repository.get("tiny")


def png_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def hostile_repository(repository: Path, root: Path) -> Path:
    """tiny, and copies of it whose manifests lie in one way each."""
    tiny = repository / "tiny" / "1"
    copy_with_manifest(tiny, root, "tiny")
    copy_with_manifest(tiny, root, "negative", input__shape=[-1, 3, -5, 32])
    copy_with_manifest(tiny, root, "huge", input__shape=[-1, 3, 200000, 200000])
    copy_with_manifest(tiny, root, "batch", input__shape=[1e8, 3, 32, 32])
    copy_with_manifest(tiny, root, "two_means", input__mean=[0.5, 0.5])
    copy_with_manifest(tiny, root, "one_mean", input__mean=[0.5])
    copy_with_manifest(tiny, root, "labels", class_labels=["a", "b", "c"])
    return root


NOT_READY = {"negative": "input.shape", "huge": "pixels", "batch": "input.shape",
             "two_means": "input.mean", "labels": "3 class labels"}


def predict_png(stub: pb_grpc.ExplainerStub, model: str) -> pb.PredictResponse:
    request = pb.PredictRequest(model=model,
                                input=pb.Input(images=pb.EncodedImages(images=[png_bytes()])))
    return stub.Predict(request, timeout=30)


def test_hostile_packages_are_not_ready_and_the_others_serve(
        repository: Path, tmp_path: Path) -> None:
    """Start-up with packages whose manifests lie: the server starts, each bad package is
    listed not ready with the field at fault (one log line each, no traceback), the others
    serve images; a SIGHUP that adds more of them does the same without a stray task
    error."""
    root = hostile_repository(repository, tmp_path / "models")
    server = ServeProcess(root)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            statuses = {m.name: m for m in
                        stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
            for name, words in NOT_READY.items():
                assert not statuses[name].ready, name
                assert words in statuses[name].error, (name, statuses[name].error)
                info = stub.GetModel(pb.GetModelRequest(model=name), timeout=30)
                assert not info.status.ready and words in info.status.error
                with pytest.raises(grpc.RpcError) as refused:
                    predict_png(stub, name)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert words in refused.value.details()
            assert statuses["tiny"].ready and statuses["one_mean"].ready
            assert predict_png(stub, "tiny").predictions[0].top
            assert predict_png(stub, "one_mean").predictions[0].top

            copy_with_manifest(repository / "tiny" / "1", root, "added_negative",
                               input__shape=[-1, 3, -5, 32])
            copy_with_manifest(repository / "tiny" / "1", root, "added_one_mean",
                               input__mean=[0.5])
            server.process.send_signal(signal.SIGHUP)
            server.wait_for_event("reload", timeout=120)
            statuses = {m.name: m for m in
                        stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
            assert not statuses["added_negative"].ready
            assert "input.shape" in statuses["added_negative"].error
            assert statuses["added_one_mean"].ready
            assert predict_png(stub, "added_one_mean").predictions[0].top
            assert predict_png(stub, "tiny").predictions[0].top
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        log = server.rest_of_log()
        # One line per bad package and load (the reload loads every package again).
        failures = [entry["message"].split()[1] for entry in log
                    if "failed to load" in entry.get("message", "")]
        assert sorted(failures) == sorted(
            [f"{name}/1" for name in ("negative", "huge", "batch", "two_means")] * 2
            + ["added_negative/1"])
        text = json.dumps(log)
        assert "Traceback" not in text and "Task exception" not in text
        assert not [entry for entry in log if "exc_info" in entry or "traceback" in entry]
    finally:
        server.kill()
