"""Fixtures: model packages exported for real, and a real server on a free loopback port."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from saliency_service import cli
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config
from tests.models import TinyCNN

if TYPE_CHECKING:
    from tests.detection_support import Trained

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


def run_cli(*args: str) -> tuple[int, str, str]:
    """``saliency ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: a second torch thread only waits on the first
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that wants it)."""
    import torch  # noqa: PLC0415

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(caller_threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The shipped detector and segmenters, exported to ONNX once per test module."""
    from tests.detection_support import load_trained  # noqa: PLC0415

    return load_trained(tmp_path_factory.mktemp("detection-models"))
