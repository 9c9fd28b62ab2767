"""A stream whose reader falls behind keeps only its latest progress, never losing the
result: unread progress does not pile up in the server's memory."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.protocol.stream_updates import (
    LatestUpdates,
    drained,
    superseded,
    superseded_progress,
)
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config
from tests.production_support import scrape, value

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo" / "1"
SIDE = 128  # the demo model's input side


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(DEMO, root / "demo" / "1")
    running = RunningServer(make_config(root, max_batch=8)).start(timeout=600)
    yield running
    running.stop()


def demo_inputs(batch: int) -> pb.Input:
    inputs = np.random.default_rng(0).normal(size=(batch, 3, SIDE, SIDE)).astype(np.float32)
    return pb.Input(tensor=array_to_tensor(inputs))

def progress(step: int, with_map: bool) -> pb.ExplainUpdate:
    update = pb.ExplainUpdate(progress=pb.Progress(step=step, total_steps=100))
    if with_map:
        update.progress.saliency.CopyFrom(array_to_tensor(np.ones((2, 8, 8), np.float32)))
    return update


def test_pending_updates_are_bounded_and_hold_one_map() -> None:
    """A reader that never reads: at most ``max_pending`` updates wait, the newest ones,
    and only the newest map among them."""
    async def scenario() -> None:
        pending: LatestUpdates[pb.ExplainUpdate] = LatestUpdates(supersede=superseded)
        for step in range(1, 101):
            pending.put(progress(step, with_map=step % 5 == 0))
            assert len(pending) <= pending.max_pending
            assert sum(u.progress.HasField("saliency") for u in pending._items) <= 1
        assert pending.dropped == 100 - pending.max_pending
        kept = [await pending.get() for _ in range(pending.max_pending)]
        assert [u.progress.step for u in kept] == list(range(101 - pending.max_pending, 101))
        assert [u.progress.step for u in kept if u.progress.HasField("saliency")] == [100]
        assert pending.empty()

    asyncio.run(scenario())


def test_the_http_event_stream_holds_one_map_too() -> None:
    """HTTP's stream carries bare ``Progress`` messages, bounded the same way."""
    async def scenario() -> None:
        pending: LatestUpdates[pb.Progress] = LatestUpdates(supersede=superseded_progress)
        for step in range(1, 101):
            pending.put(progress(step, with_map=step % 5 == 0).progress)
            assert len(pending) <= pending.max_pending
            assert sum(p.HasField("saliency") for p in pending._items) <= 1
        kept = [await pending.get() for _ in range(pending.max_pending)]
        assert [p.step for p in kept if p.HasField("saliency")] == [100]

    asyncio.run(scenario())


def test_a_reader_that_keeps_up_sees_every_update_and_map() -> None:
    async def scenario() -> None:
        pending: LatestUpdates[pb.ExplainUpdate] = LatestUpdates(supersede=superseded)
        for step in range(1, 5):  # maps on 1 and 4, with plain updates between
            pending.put(progress(step, with_map=step in (1, 4)))
        taken = [await pending.get() for _ in range(4)]
        assert [u.progress.HasField("saliency") for u in taken] == [False, False, False, True]
        pending.put(progress(5, with_map=True))
        assert (await pending.get()).progress.HasField("saliency")

    asyncio.run(scenario())


def test_drained_ends_with_what_is_pending_when_the_task_ends() -> None:
    async def scenario() -> list[int]:
        pending: LatestUpdates[int] = LatestUpdates(max_pending=1)
        task = asyncio.get_running_loop().create_future()
        pending.put(1)
        pending.put(2)
        task.set_result(None)
        return [item async for item in drained(pending, task)]

    assert asyncio.run(scenario()) == [2]


def test_a_reader_that_falls_behind_gets_the_latest_progress_and_the_result(
        demo_server: RunningServer) -> None:
    """The client reads nothing until the search has ended: the first progress map
    (256 KiB) fills the connection's window, the updates behind it are superseded (older
    maps dropped, the oldest updates beyond the bound too), and the result still arrives,
    after fewer updates than generations."""
    generations = 50
    request = pb.ExplainRequest(model="demo", method=pb.METHOD_DECAM, input=demo_inputs(4))
    request.decam.population = 4
    request.decam.generations = generations
    request.decam.patience = 0
    request.decam.refine = False
    labels = {"model": "demo", "method": "decam", "code": "OK"}
    port = demo_server.server.metrics_port
    done_before = value(scrape(port), "saliency_requests_total", **labels)
    # No bandwidth probing: the window stays at HTTP/2's 64 KiB while nothing is read.
    options = [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(demo_server.address, options=options) as channel:
        call = pb_grpc.ExplainerStub(channel).ExplainStream(request, timeout=600)
        deadline = time.monotonic() + 600
        while value(scrape(port), "saliency_requests_total", **labels) == done_before:
            assert time.monotonic() < deadline, "the search did not finish"
            time.sleep(0.1)
        updates = list(call)
    kinds = [update.WhichOneof("update") for update in updates]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    progress = [update.progress for update in updates[:-1]]
    steps = [p.step for p in progress]
    assert steps == sorted(set(steps)) and len(steps) < generations
    assert steps[-1] == generations  # the newest progress is kept, with its map
    with_maps = [p.step for p in progress if p.HasField("saliency")]
    assert with_maps[-1] == generations and len(with_maps) <= 3
    assert updates[-1].result.diagnostics["generations_run"] == generations
