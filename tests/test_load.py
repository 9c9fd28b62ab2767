"""The load generator against real servers on loopback: counts add up, bounds hold, and
overload is refused with RESOURCE_EXHAUSTED while the server keeps serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from benchmarks.common import ServerProcess, percentiles
from benchmarks.load import Call, Picker, closed_loop, open_loop, report, scenarios
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from tests.conftest import TINY_SHAPE, RunningServer, make_config


def _image() -> bytes:
    from benchmarks.common import png_images  # noqa: PLC0415

    return png_images(1, TINY_SHAPE[-1], seed=1)[0]


def _mix(stub: pb_grpc.ExplainerStub) -> list[Call]:
    info = stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=10)
    return scenarios(info, "tiny", _image(), quick=True)["mix"]


def _slow_call() -> Call:
    """Occlusion with a 1-pixel stride: ~1,000 forwards, long enough to pile requests up."""
    request = pb.ExplainRequest(
        model="tiny",
        method=pb.METHOD_OCCLUSION,
        input=pb.Input(images=pb.EncodedImages(images=[_image()])),
    )
    request.occlusion.window = 4
    request.occlusion.stride = 1
    return Call("occlusion", "Explain", request)


def test_closed_loop_counts_add_up(server: RunningServer, stub) -> None:
    calls = _mix(stub)
    assert {"predict", "vanilla_gradient"} <= {c.label for c in calls}
    result = asyncio.run(
        closed_loop(
            server.address, Picker(calls, 0), concurrency=3, max_requests=30, max_seconds=60
        )
    )
    summary = result.summary()
    assert summary["requests"] == 30 == sum(summary["counts"].values())
    assert summary["counts"] == {"OK": 30}
    assert sum(sum(v["counts"].values()) for v in summary["per_label"].values()) == 30
    latency = summary["latency_ok"]
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert summary["throughput_ok"] == pytest.approx(30 / result.elapsed)
    # The server's own execution time of each answered request lies within what the client
    # waited for it, and the load generator's CPU share is a share.
    assert all(0 < o.server_seconds <= o.seconds for o in result.outcomes)
    assert summary["execution_ok"]["count"] == 30
    assert 0 < summary["execution_ok"]["p99_ms"] <= latency["p99_ms"]
    assert 0 < summary["client_cpu_share"] < 2


def test_duration_bound_stops_a_closed_loop(server: RunningServer, stub) -> None:
    started = time.perf_counter()
    result = asyncio.run(
        closed_loop(
            server.address,
            Picker(_mix(stub), 1),
            concurrency=2,
            max_requests=10**6,
            max_seconds=1.0,
        )
    )
    assert time.perf_counter() - started < 15
    assert 0 < len(result.outcomes) < 10**6


def test_open_loop_sends_at_the_offered_rate(server: RunningServer, stub) -> None:
    predict = Call(
        "predict",
        "Predict",
        pb.PredictRequest(model="tiny", input=pb.Input(images=pb.EncodedImages(images=[_image()]))),
    )
    result = asyncio.run(
        open_loop(server.address, Picker([predict]), rate=40.0, max_requests=20, max_seconds=10)
    )
    assert len(result.outcomes) == 20
    # 20 arrivals 25 ms apart: the last leaves at 475 ms; the run cannot be much shorter.
    assert result.elapsed >= 0.47
    assert result.counts() == {"OK": 20}


@pytest.fixture()
def tiny_capacity(repository: Path):
    running = RunningServer(make_config(repository, max_inflight=1, max_queue=0)).start()
    yield running
    running.stop()


def test_overload_is_refused_with_resource_exhausted(tiny_capacity: RunningServer) -> None:
    result = asyncio.run(
        open_loop(
            tiny_capacity.address,
            Picker([_slow_call()]),
            rate=50.0,
            max_requests=25,
            max_seconds=10,
            timeout=60,
        )
    )
    counts = result.counts()
    assert sum(counts.values()) == 25
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0, counts
    assert counts.get("OK", 0) > 0, counts
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
    text = report(
        {
            "model": "tiny",
            "input_size": 32,
            "runs": {"overload": result.summary()},
            "overload": {},
            "memory": {},
        }
    )
    assert "RESOURCE_EXHAUSTED" in text
    # Still serving afterwards.
    with grpc.insecure_channel(tiny_capacity.address) as channel:
        reply = pb_grpc.ExplainerStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert any(m.name == "tiny" and m.ready for m in reply.models)


def test_server_subprocess_reports_its_memory(repository: Path) -> None:
    with ServerProcess(repository, {"max_inflight": 2, "intra_op_threads": 1}) as process:
        before = process.rss_kib()
        with grpc.insecure_channel(process.address) as channel:
            calls = _mix(pb_grpc.ExplainerStub(channel))
        result = asyncio.run(closed_loop(process.address, Picker(calls, 2), 2, 40, 60))
        assert result.counts() == {"OK": 40}
        after = process.rss_kib()
        assert process.alive()
    assert min(before, after) > 50_000  # a Python server with torch: tens of MiB
    assert not process.alive()


def test_percentiles_of_nothing_are_zero() -> None:
    assert percentiles([])["p99_ms"] == 0.0
    assert percentiles([0.001, 0.002, 0.003])["p50_ms"] == pytest.approx(2.0)
