"""Staying up under load: bounded admission, deadlines and cancellation through the real server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from saliency.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_config
from tests.production_support import rss_bytes, scrape, slow_repository, slow_request, value

MAX_INFLIGHT = 1
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def busy(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = slow_repository(tmp_path_factory.getbasetemp(), repository)
    # A small memory budget makes many chunks, so deadline checks come often.
    running = RunningServer(
        make_config(
            root, max_inflight=MAX_INFLIGHT, max_queue=MAX_QUEUE, chunk_memory_bytes=8 * 1024 * 1024
        )
    ).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(busy: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(busy.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def wait_idle(server: RunningServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        admission = server.server.admission
        if admission.inflight == 0 and admission.waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the server did not become idle")


def test_overload_is_refused_at_once_and_memory_stays_flat(
    busy: RunningServer, stub: pb_grpc.ExplainerStub
) -> None:
    stub.Explain(slow_request(stride=48), timeout=60)  # warm-up outside the measurement
    wait_idle(busy)
    concurrent, waves = 24, 3
    request = slow_request(batch=2, stride=8)
    rss_before = rss_bytes()
    statuses: Counter[str] = Counter()
    refusal_seconds: list[float] = []
    accepted_seconds: list[float] = []
    rss_waves: list[int] = []
    for _ in range(waves):
        started = time.perf_counter()
        finished: dict[int, float] = {}
        futures = [stub.Explain.future(request, timeout=120) for _ in range(concurrent)]
        for index, future in enumerate(futures):
            future.add_done_callback(
                lambda _, i=index, done=finished, t0=started: done.setdefault(
                    i, time.perf_counter() - t0
                )
            )
        for index, future in enumerate(futures):
            try:
                future.result()
                statuses["OK"] += 1
                accepted_seconds.append(finished[index])
            except grpc.RpcError as error:
                statuses[error.code().name] += 1
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refusal_seconds.append(finished[index])
                    assert "max_inflight=1" in error.details()
                    assert "max_queue=2" in error.details()
        wait_idle(busy)
        rss_waves.append(rss_bytes())
    rss_after = rss_waves[-1]
    admission = busy.server.admission
    accepted, rejected = statuses["OK"], statuses["RESOURCE_EXHAUSTED"]
    print(
        f"\noverload: {waves} waves × {concurrent} concurrent slow requests, max_inflight="
        f"{MAX_INFLIGHT} max_queue={MAX_QUEUE}: accepted {accepted}, rejected {rejected}, "
        f"peak executing {admission.peak_inflight}, peak waiting {admission.peak_waiting}; "
        f"RSS before {rss_before / 2**20:.1f} MiB, after each wave "
        f"{', '.join(f'{r / 2**20:.1f}' for r in rss_waves)} MiB"
    )
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert accepted + rejected == waves * concurrent
    assert admission.peak_inflight == MAX_INFLIGHT
    assert admission.peak_waiting <= MAX_QUEUE
    assert accepted >= waves * (MAX_INFLIGHT + MAX_QUEUE)
    assert rejected >= waves * concurrent // 2
    # Refusals are immediate: the median one arrives long before a request could finish.
    median_refusal = sorted(refusal_seconds)[len(refusal_seconds) // 2]
    print(
        f"median refusal after {median_refusal * 1000:.0f} ms, first accepted request "
        f"done after {min(accepted_seconds) * 1000:.0f} ms"
    )
    assert median_refusal < min(accepted_seconds)
    assert rss_after - rss_before < 64 * 2**20
    assert rss_waves[-1] - rss_waves[0] < 16 * 2**20  # no growth per wave once warm
    samples = scrape(busy.server.metrics_port)
    assert value(samples, "saliency_rejected_total", reason="queue_full") >= rejected


def test_deadline_passed_while_queued_is_not_started(
    busy: RunningServer, stub: pb_grpc.ExplainerStub
) -> None:
    wait_idle(busy)
    before = scrape(busy.server.metrics_port)
    # Long enough (4 + 4 × 625 passes, seconds on 2 cores) to outlast the queued deadline.
    occupying = stub.Explain.future(slow_request(batch=4, stride=2), timeout=120)
    _wait_for(lambda: busy.server.admission.inflight == 1)
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(slow_request(seed=1), timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    first = occupying.result()
    wait_idle(busy)
    after = scrape(busy.server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    labels = {"model": "slow", "method": "occlusion"}
    assert delta("saliency_rejected_total", reason="deadline_in_queue") == 1
    assert delta("saliency_requests_total", code="DEADLINE_EXCEEDED", **labels) == 1
    # Only the occupying request ran: the queued one did no forward pass at all.
    assert (
        delta("saliency_forward_passes_total", engine="onnxruntime", **labels)
        == first.cost.forward_passes
    )


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_deadline_and_cancellation_stop_a_running_method(
    busy: RunningServer, stub: pb_grpc.ExplainerStub, how: str
) -> None:
    wait_idle(busy)
    before = scrape(busy.server.metrics_port)
    request = slow_request(batch=4, stride=2)  # 4 + 4 × 625 forward passes if run to the end
    full = 4 + 4 * 625
    started = time.perf_counter()
    if how == "deadline":
        with pytest.raises(grpc.RpcError) as error:
            stub.Explain(request, timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        future = stub.Explain.future(request, timeout=120)
        _wait_for(lambda: busy.server.admission.inflight == 1)
        time.sleep(0.2)
        future.cancel()
    wait_idle(busy)
    stopped = time.perf_counter() - started
    after = scrape(busy.server.metrics_port)
    code = "DEADLINE_EXCEEDED" if how == "deadline" else "CANCELLED"
    labels = {"model": "slow", "method": "occlusion"}
    done = value(after, "saliency_forward_passes_total", engine="onnxruntime", **labels) - value(
        before, "saliency_forward_passes_total", engine="onnxruntime", **labels
    )
    assert (
        value(after, "saliency_requests_total", code=code, **labels)
        - value(before, "saliency_requests_total", code=code, **labels)
        == 1
    )
    assert 0 < done < full / 2, f"the worker went on for {done} of {full} passes"
    assert stopped < 10
    # The slot is free again: the next request runs.
    assert stub.Explain(slow_request(stride=48), timeout=60).cost.forward_passes > 0


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_grpc_bounds_calls_held_in_memory(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Beyond ``max_concurrent_rpcs`` gRPC refuses calls itself, before reading them, so a
    flood of large messages cannot pile up in memory."""
    root = slow_repository(tmp_path_factory.getbasetemp(), repository)
    running = RunningServer(
        make_config(root, max_inflight=1, max_queue=1, max_concurrent_rpcs=3)
    ).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            futures = [stub.Explain.future(slow_request(stride=8), timeout=120) for _ in range(10)]
            outcomes: Counter[str] = Counter()
            for future in futures:
                try:
                    future.result()
                    outcomes["OK"] += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    by_grpc = "Concurrent RPC limit" in error.details()
                    outcomes["refused by gRPC" if by_grpc else "refused by admission"] += 1
            assert outcomes["OK"] == 2  # one executing, one queued
            assert outcomes["refused by gRPC"] >= 1
            assert sum(outcomes.values()) == 10
            wait_idle(running)
            assert stub.Explain(slow_request(stride=48), timeout=60).cost.forward_passes > 0
    finally:
        running.stop()


def test_expected_wait_bounds_the_queue_by_cost_not_count() -> None:
    """Admission's wait estimate: the executing request's remaining cost plus the waiting
    ones', over the workers. A request behind a long one is refused at once; behind a short
    one it waits and then runs."""
    from handlers.base import RequestState
    from service.errors import ResourceExhausted
    from service.explainer import Admission
    from service.metrics import Metrics

    async def scenario() -> None:
        admission = Admission(max_inflight=1, max_queue=8, metrics=Metrics(),
                              max_queue_wait_seconds=0.2)
        long, short, behind_long, behind_short = (RequestState() for _ in range(4))
        assert admission.expected_wait() == 0.0
        await admission.acquire(long, expected_seconds=5.0)  # a free worker: never refused
        assert 4.5 < admission.expected_wait() <= 5.0
        with pytest.raises(ResourceExhausted, match="max_queue_wait_ms=200"):
            await admission.acquire(behind_long, expected_seconds=0.01)
        assert admission.waiting == 0
        admission.release(long)
        await admission.acquire(short, expected_seconds=0.05)
        waiter = asyncio.ensure_future(admission.acquire(behind_short, expected_seconds=3.0))
        await asyncio.sleep(0.01)
        assert admission.waiting == 1
        # Now the short request's remainder and the waiting 3 s are ahead of a newcomer.
        assert 3.0 <= admission.expected_wait() <= 3.05
        admission.release(short)
        assert await waiter >= 0.0
        assert admission.inflight == 1 and admission.waiting == 0
        admission.release(behind_short)
        assert admission.expected_wait() == 0.0

    asyncio.run(scenario())


def test_expected_wait_plays_the_queue_forward_over_several_workers() -> None:
    """With two workers a newcomer waits for the first one to free, not for the average:
    behind a 4 s and a 0.1 s request it waits 0.1 s; a waiting 1 s request takes that
    worker, so the next newcomer waits 1.1 s (that worker frees again before the 4 s one)."""
    from handlers.base import RequestState
    from service.explainer import Admission
    from service.metrics import Metrics

    async def scenario() -> None:
        admission = Admission(max_inflight=2, max_queue=8, metrics=Metrics())
        long, short, queued = (RequestState() for _ in range(3))
        await admission.acquire(long, expected_seconds=4.0)
        assert admission.expected_wait() == 0.0  # one worker still free
        await admission.acquire(short, expected_seconds=0.1)
        assert 0.05 < admission.expected_wait() <= 0.1
        waiter = asyncio.ensure_future(admission.acquire(queued, expected_seconds=1.0))
        await asyncio.sleep(0.01)
        assert admission.waiting == 1
        assert 1.0 < admission.expected_wait() <= 1.1
        admission.release(short)
        await waiter
        assert 0.9 < admission.expected_wait() <= 1.0  # now the queued one's worker
        admission.release(queued)
        admission.release(long)
        assert admission.expected_wait() == 0.0

    asyncio.run(scenario())


def test_server_refuses_what_would_wait_too_long(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``max_queue_wait_ms`` through the real server: with a measured long request running,
    a newcomer is refused at once with RESOURCE_EXHAUSTED although the queue has room; once
    the worker is free the same request runs."""
    root = slow_repository(tmp_path_factory.getbasetemp(), repository)
    running = RunningServer(
        make_config(root, max_inflight=1, max_queue=8, max_queue_wait_ms=100,
                    chunk_memory_bytes=8 * 1024 * 1024)
    ).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            long_request = slow_request(batch=2, stride=2)
            measured = stub.Explain(long_request, timeout=120).cost.wall_seconds
            assert measured > 0.3, f"the long request took only {measured:.3f} s"
            occupying = stub.Explain.future(long_request, timeout=120)
            _wait_for(lambda: running.server.admission.inflight == 1)
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as error:
                stub.Explain(slow_request(stride=48), timeout=60)
            refused_after = time.perf_counter() - started
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_wait_ms=100" in error.value.details()
            assert refused_after < measured / 2
            assert occupying.result().cost.forward_passes > 0
            wait_idle(running)
            assert stub.Explain(slow_request(stride=48), timeout=60).cost.forward_passes > 0
            samples = scrape(running.server.metrics_port)
            assert value(samples, "saliency_rejected_total", reason="queue_wait") == 1
    finally:
        running.stop()


def test_recent_cost_follows_the_load_while_the_mean_keeps_history() -> None:
    """Admission prices requests by the moving average of recent run times, so a slowdown
    under contention raises the wait estimate within a few requests."""
    from service.metrics import RECENT_WEIGHT, Metrics

    metrics = Metrics()
    for _ in range(50):
        metrics.observe("m", "x", "OK", 0.010, 0.0, {}, 0)
    for _ in range(10):
        metrics.observe("m", "x", "OK", 0.100, 0.0, {}, 0)
    metrics.observe("m", "x", "INTERNAL", 5.0, 0.0, {}, 0)  # failures do not count
    cost = metrics.mean_cost("m", "x")
    assert cost.requests == 60
    assert cost.mean_seconds == pytest.approx(0.025)
    assert cost.recent_seconds == pytest.approx(0.100 - 0.090 * (1 - RECENT_WEIGHT) ** 10)
    assert cost.recent_seconds > 0.09
    assert metrics.mean_cost("m", "unseen").recent_seconds == 0.0
