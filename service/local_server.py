"""The real server on a free loopback port, on its own event loop in a background thread.

For tools that need the service over a repository of their own making (``saliency evaluate``
serves the randomized copies of a package for the sanity checks this way): the same
``SaliencyServer`` a deployment runs, so the packages load, warm up and answer as anywhere.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from service.config import Config
from service.server import SaliencyServer


class LocalServer:
    """``with LocalServer(models) as server: SaliencyClient(server.address)``."""

    def __init__(self, models: Path, start_timeout: float = 600.0, **config: Any) -> None:
        values: dict[str, Any] = {"models": Path(models), "host": "127.0.0.1", "port": 0,
                                  "metrics_port": 0, "log_level": "WARNING"}
        values.update(config)
        self.server = SaliencyServer(Config(**values))
        self.loop = asyncio.new_event_loop()
        self.start_timeout = start_timeout
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # noqa: BLE001 - raised again in start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> LocalServer:
        self.thread.start()
        if not self._started.wait(self.start_timeout):
            raise TimeoutError(f"the local server did not start in {self.start_timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._error is None and self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
