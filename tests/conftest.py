"""Fixtures: model packages exported for real, and a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from saliency.v1 import explainer_pb2_grpc as pb_grpc
from service.config import Config
from service.export import export_package
from service.server import SaliencyServer
from tests.models import TinyCNN

TINY_SHAPE = (3, 32, 32)
TINY_LABELS = ("alpha", "beta", "gamma", "delta")


class RunningServer:
    """A SaliencyServer on its own event loop in a background thread."""

    def __init__(self, config: Config) -> None:
        self.server = SaliencyServer(config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # noqa: BLE001 - surfaced in start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> RunningServer:
        self.thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)  # type: ignore[arg-type]

    def stop(self, grace: float = 5.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


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
