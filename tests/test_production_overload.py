"""Staying up under load: bounded admission, deadlines and cancellation through the real server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.common import ServerProcess, png_images
from benchmarks.load import Call, mixed_costs
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from tests.conftest import TINY_SHAPE, RunningServer, make_config
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
            # Long enough (169 windows) that all ten arrive while the first executes.
            futures = [stub.Explain.future(slow_request(stride=4), timeout=120) for _ in range(10)]
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
    from saliency_service.core.errors import ResourceExhausted
    from saliency_service.core.request import RequestState
    from saliency_service.serving.admission import Admission
    from saliency_service.serving.metrics import Metrics

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
    from saliency_service.core.request import RequestState
    from saliency_service.serving.admission import Admission
    from saliency_service.serving.metrics import Metrics

    metrics = Metrics()

    async def scenario() -> None:
        admission = Admission(max_inflight=2, max_queue=8, metrics=metrics)
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
    # Every admitted request's wait is in saliency_queue_seconds, the queued one's too.
    assert metrics.registry.get_sample_value("saliency_queue_seconds_count") == 3
    assert metrics.registry.get_sample_value("saliency_queue_seconds_sum") >= 0.01


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


def test_a_request_past_its_estimate_is_expected_to_run_as_long_again() -> None:
    """A running request that overran its cost estimate does not count as finishing at
    once: it is expected to need as long again as it has run, so a newcomer is refused."""
    from saliency_service.core.errors import ResourceExhausted
    from saliency_service.core.request import RequestState
    from saliency_service.serving.admission import Admission
    from saliency_service.serving.metrics import Metrics

    async def scenario() -> None:
        admission = Admission(max_inflight=1, max_queue=8, metrics=Metrics(),
                              max_queue_wait_seconds=0.05)
        running, behind = RequestState(), RequestState()
        await admission.acquire(running, expected_seconds=0.02)
        await asyncio.sleep(0.1)  # five times its estimate
        assert admission.expected_wait() >= 0.1
        with pytest.raises(ResourceExhausted, match="max_queue_wait_ms=50"):
            await admission.acquire(behind, expected_seconds=0.01)
        admission.release(running)

    asyncio.run(scenario())


def test_a_request_still_waiting_when_the_bound_passes_is_refused_then() -> None:
    """Estimates can be wrong (here: a first request, not measured yet, that does not
    finish): a queued request never starts after waiting longer than the bound."""
    from saliency_service.core.errors import ResourceExhausted
    from saliency_service.core.request import RequestState
    from saliency_service.serving.admission import Admission
    from saliency_service.serving.metrics import Metrics

    async def scenario() -> None:
        metrics = Metrics()
        admission = Admission(max_inflight=1, max_queue=8, metrics=metrics,
                              max_queue_wait_seconds=0.05)
        running, queued = RequestState(), RequestState()
        await admission.acquire(running)
        waiter = asyncio.ensure_future(admission.acquire(queued))
        await asyncio.sleep(0.01)
        assert admission.waiting == 1  # admitted: the running one might end at once
        await asyncio.sleep(0.1)
        assert waiter.done() and admission.waiting == 0
        with pytest.raises(ResourceExhausted, match="no worker freed within max_queue_wait_ms=50"):
            waiter.result()
        assert metrics.registry.get_sample_value(
            "saliency_rejected_total", {"reason": "queue_timeout"}) == 1
        admission.release(running)
        assert admission.inflight == 0

    asyncio.run(scenario())


def test_long_requests_leave_a_worker_for_the_ones_that_fit_the_bound() -> None:
    """With the bound set, a request longer than the bound may not take the last worker that
    frees within it while requests that fit the bound are arriving; without such requests
    long ones use every worker."""
    from saliency_service.core.errors import ResourceExhausted
    from saliency_service.core.request import RequestState
    from saliency_service.serving.admission import Admission
    from saliency_service.serving.metrics import Metrics

    async def scenario() -> None:
        admission = Admission(max_inflight=2, max_queue=8, metrics=Metrics(),
                              max_queue_wait_seconds=0.1)
        long1, long2, long3, short1, short2 = (RequestState() for _ in range(5))
        await admission.acquire(long1, expected_seconds=5.0)
        await admission.acquire(long2, expected_seconds=5.0)  # only long ones so far
        admission.release(long2)
        await admission.acquire(short1, expected_seconds=0.01)
        admission.release(short1)
        with pytest.raises(ResourceExhausted, match="leave no worker free within"):
            await admission.acquire(long3, expected_seconds=5.0)
        await admission.acquire(short2, expected_seconds=0.01)  # its worker stayed free
        assert admission.inflight == 2
        admission.release(short2)
        admission.release(long1)

    asyncio.run(scenario())


# Python's GIL switch interval: how long the event loop may wait for a worker thread to
# yield the interpreter. A request granted a worker waits for it twice: once to hear of the
# freed worker (the release comes from a worker thread), once to resume.
SCHEDULING_SLICE_MS = 5.0
GIL_WAITS = 2


def test_queue_wait_bound_holds_for_cheap_requests_beside_expensive_ones(
    repository: Path,
) -> None:
    """``max_queue_wait_ms`` through a real server process under 40 closed-loop clients
    sending a cheap method and DE-CAM (about 70× its cost) equally often: no accepted
    request waited for a worker longer than the bound and two scheduling slices, and the
    cheap requests kept a worker instead of queueing behind DE-CAM."""
    bound_ms = 25.0
    image = png_images(1, TINY_SHAPE[-1], seed=1)[0]

    def explain(method: int) -> pb.ExplainRequest:
        return pb.ExplainRequest(model="tiny", method=method, seed=1,
                                 input=pb.Input(images=pb.EncodedImages(images=[image])))

    decam = explain(pb.METHOD_DECAM)
    decam.decam.population, decam.decam.generations, decam.decam.patience = 64, 50, 0
    calls = [Call("smoe_scale", "Explain", explain(pb.METHOD_SMOE_SCALE)),
             Call("decam", "Explain", decam)]
    config = {"max_inflight": 2, "max_queue": 4, "max_queue_wait_ms": bound_ms,
              "intra_op_threads": 1}
    with ServerProcess(repository, config) as process:
        result = asyncio.run(mixed_costs(process, calls, clients=40, seconds=4.0, timeout=30))
        assert process.alive()
    cheap, costly = result["per_call"]["smoe_scale"], result["per_call"]["decam"]
    print(
        "\nmixed costs, 40 clients, max_queue_wait_ms=25: "
        + "; ".join(
            f"{label}: {entry['counts']}, queue wait p50 {entry['queue_wait']['p50_ms']:.1f} "
            f"p99 {entry['queue_wait']['p99_ms']:.1f} max {entry['queue_wait']['max_ms']:.1f} ms"
            for label, entry in result["per_call"].items()
        )
    )
    for entry in (cheap, costly):
        assert entry["counts"].get("OK", 0) > 0
        assert set(entry["counts"]) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert entry["queue_wait"]["max_ms"] <= bound_ms + GIL_WAITS * SCHEDULING_SLICE_MS
    assert cheap["counts"].get("RESOURCE_EXHAUSTED", 0) > 0  # the load was an overload
    # DE-CAM never held both workers while cheap requests arrived: they were served.
    assert cheap["counts"]["OK"] >= 10 * costly["counts"]["OK"]


def test_recent_cost_follows_the_load_while_the_mean_keeps_history() -> None:
    """Admission prices requests by the moving average of recent run times, so a slowdown
    under contention raises the wait estimate within a few requests."""
    from saliency_service.serving.metrics import RECENT_WEIGHT, Metrics

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
