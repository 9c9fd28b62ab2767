"""A server on its own event loop in a background thread, for tests and in-process
benchmarks that call it over a real loopback port."""

from __future__ import annotations

import asyncio
import threading

from service.config import Config
from service.server import SaliencyServer


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
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
