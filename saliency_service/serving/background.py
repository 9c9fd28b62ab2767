"""The real server on its own event loop in a background thread, over a loopback port: for
tests, in-process benchmarks and tools that serve a repository of their own making
(``saliency evaluate`` serves the randomized copies of a package this way)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from saliency_service.serving.config import Config
from saliency_service.serving.server import SaliencyServer


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

    def start(self, timeout: float = 120.0) -> RunningServer:
        """Starts the server and waits until it has loaded and warmed its models."""
        self.thread.start()
        ready = self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        if not ready:
            raise TimeoutError(f"the server was not ready after {timeout:.0f} s")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)  # type: ignore[arg-type]

    def stop(self, grace: float = 5.0) -> None:
        if self._error is None and self.thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def __enter__(self) -> RunningServer:
        return self.start(timeout=600.0)

    def __exit__(self, *_: object) -> None:
        self.stop(grace=1.0)


def local_server(models: Path, **config: Any) -> RunningServer:
    """``with local_server(models) as running: SaliencyClient(running.address)``: the
    repository ``models`` on a free loopback port, metrics on a free port, quiet logs."""
    values: dict[str, Any] = {"models": Path(models), "host": "127.0.0.1", "port": 0,
                              "metrics_port": 0, "log_level": "WARNING", **config}
    return RunningServer(Config(**values))
