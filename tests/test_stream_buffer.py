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
from saliency_service.protocol.grpc_servicer import LatestUpdates, drained
from saliency_service.protocol.images import array_to_tensor
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

def test_pending_updates_keep_only_the_latest() -> None:
    async def scenario() -> None:
        pending: LatestUpdates[int] = LatestUpdates()
        for step in range(1, 101):
            pending.put(step)
            assert len(pending) <= 1
        assert pending.dropped == 99
        assert await pending.get() == 100 and pending.empty()
        wider: LatestUpdates[int] = LatestUpdates(max_pending=3)
        for step in range(10):
            wider.put(step)
        assert [await wider.get() for _ in range(3)] == [7, 8, 9]

    asyncio.run(scenario())


def test_drained_ends_with_what_is_pending_when_the_task_ends() -> None:
    async def scenario() -> list[int]:
        pending: LatestUpdates[int] = LatestUpdates()
        task = asyncio.get_running_loop().create_future()
        pending.put(1)
        pending.put(2)
        task.set_result(None)
        return [item async for item in drained(pending, task)]

    assert asyncio.run(scenario()) == [2]


def test_a_reader_that_falls_behind_gets_the_latest_progress_and_the_result(
        demo_server: RunningServer) -> None:
    """The client reads nothing until the search has ended: progress with maps (256 KiB
    each) fills the connection's window, the updates behind it are superseded, and the
    result still arrives, after fewer updates than generations."""
    generations = 40
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
    steps = [update.progress.step for update in updates[:-1]]
    assert steps == sorted(set(steps)) and len(steps) < generations
    assert steps[-1] == generations  # the newest progress is the one kept
    assert updates[-1].result.diagnostics["generations_run"] == generations
