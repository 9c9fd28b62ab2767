"""What a stream holds for a reader that falls behind: the pending progress updates, bounded,
with only the newest map among them (gRPC's ExplainStream and HTTP's event stream)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from saliency_service.proto import explainer_pb2 as pb

T = TypeVar("T")


def superseded(older: pb.ExplainUpdate, newer: pb.ExplainUpdate) -> pb.ExplainUpdate:
    """A pending update once a newer one is pending: without its map when the newer one has
    a map, so a stream holds at most one map that its reader has not taken."""
    superseded_progress(older.progress, newer.progress)
    return older


def superseded_progress(older: pb.Progress, newer: pb.Progress) -> pb.Progress:
    """As ``superseded``, for a stream of bare ``Progress`` (the HTTP event stream)."""
    if newer.HasField("saliency"):
        older.ClearField("saliency")
    return older


class LatestUpdates(Generic[T]):
    """The updates of one stream not yet sent. When the reader falls behind, each pending
    update is passed to ``supersede`` with the newest (progress then drops a map a newer
    one replaces) and beyond ``max_pending`` the oldest are dropped, so a reader that never
    reads holds one map and a few scalars; a reader that keeps up sees every update. The
    result does not pass here."""

    def __init__(self, max_pending: int = 32,
                 supersede: Callable[[T, T], T] | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self.supersede = supersede
        self.dropped = 0  # updates superseded before the reader took them
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put(self, item: T) -> None:
        """Adds ``item``: the pending ones superseded by it, the oldest dropped when full
        (on the event loop)."""
        if self.supersede is not None:
            self._items = deque(self.supersede(older, item) for older in self._items)
        if len(self._items) >= self.max_pending:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> T:
        """The oldest pending item, waiting for one."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


async def drained(pending: LatestUpdates[T] | asyncio.Queue[T], task: asyncio.Future[object],
                  ) -> AsyncIterator[T]:
    """The items put in ``pending`` while ``task`` runs (and any left when it ends); cancels
    the task if the consumer goes away."""
    getter: asyncio.Future[T] | None = None
    try:
        while not task.done() or not pending.empty():
            getter = asyncio.ensure_future(pending.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        if not task.done():
            task.cancel()
