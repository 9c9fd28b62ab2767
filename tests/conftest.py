"""Fixtures: model packages exported for real, and a real server on a free loopback port."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config
from tests.models import TinyCNN

TINY_SHAPE = (3, 32, 32)
TINY_LABELS = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with a working tiny model and a broken package beside it."""
    root = tmp_path_factory.mktemp("models")
    export_package(TinyCNN(len(TINY_LABELS)), name="tiny", version=1, input_shape=TINY_SHAPE,
                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], class_labels=TINY_LABELS,
                   repository=root, head="fc")
    broken = root / "broken" / "1"
    shutil.copytree(root / "tiny" / "1", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["name"] = "broken"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with (broken / "model.onnx").open("ab") as handle:
        handle.write(b"corrupted")
    return root


def make_config(models: Path, **overrides: object) -> Config:
    values: dict[str, object] = {"models": models, "host": "127.0.0.1", "port": 0,
                                 "metrics_port": 0, "max_batch": 8}
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository)).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.ExplainerStub:
    return pb_grpc.ExplainerStub(channel)
