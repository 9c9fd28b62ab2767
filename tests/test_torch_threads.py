"""Torch runs only on the explain workers: the warm-up, a reload and every torch request.

Each thread that runs a parallel torch op gets an OpenMP team of its own, and once the
process holds more OpenMP threads than cores, libgomp puts every team's threads to sleep
between ops; a warm-up on another thread made ResNet-50 explanations ~8% slower. Through the
real server, with the thread of every ``Core.explain`` call recorded as it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.config import MAX_INLINE_MS
from saliency_service.serving.engine import ExplainOrder, Prepared
from tests.conftest import RunningServer, make_config
from tests.production_support import scrape, value


@pytest.fixture(scope="module")
def recorded(repository: Path) -> Iterator[tuple[RunningServer, list[tuple[str, str]]]]:
    """A server (inline bound at its widest) whose ``Engine.explain`` records (thread, method)."""
    running = RunningServer(make_config(repository, max_inflight=1, intra_op_threads=2,
                                        inline_below_ms=MAX_INLINE_MS))
    calls: list[tuple[str, str]] = []
    explain: Callable[..., Any] = running.server.core.engine.explain

    def recording(order: ExplainOrder | Prepared, *args: Any, **kwargs: Any) -> Any:
        method = order.order.method if isinstance(order, Prepared) else order.method
        calls.append((threading.current_thread().name, method))
        return explain(order, *args, **kwargs)

    running.server.core.engine.explain = recording  # type: ignore[method-assign]
    running.start()
    yield running, calls
    running.stop()


def request(method: int, seed: int) -> pb.ExplainRequest:
    inputs = np.random.default_rng(seed).normal(size=(1, 3, 32, 32)).astype(np.float32)
    return pb.ExplainRequest(model="tiny", method=method,
                             input=pb.Input(tensor=array_to_tensor(inputs)))


def measured_cheap(running: RunningServer, stub: pb_grpc.ExplainerStub, method: int,
                   name: str) -> None:
    """Explains until the method's recent cost falls under the inline bound."""
    for seed in range(100):
        stub.Explain(request(method, seed), timeout=30)
        if running.server.metrics.mean_cost("tiny", name).recent_seconds < MAX_INLINE_MS / 1e3:
            return
    raise AssertionError(f"{name} on the tiny model never measured under the inline bound")


def inline_count(running: RunningServer, name: str) -> float:
    return value(scrape(running.server.metrics_port), "saliency_inline_requests_total",
                 model="tiny", method=name)


def test_warm_up_and_reload_run_on_the_explain_workers(
    recorded: tuple[RunningServer, list[tuple[str, str]]],
) -> None:
    running, calls = recorded
    warm_up = list(calls)
    assert any(method == "vanilla_gradient" for _, method in warm_up)  # torch ran
    assert all(thread.startswith("explain") for thread, _ in warm_up), warm_up
    calls.clear()
    assert running.call(running.server.reload(force=True))
    assert calls, "the reload warmed nothing up"
    assert all(thread.startswith("explain") for thread, _ in calls), calls


def test_cheap_torch_requests_stay_off_the_event_loop(
    recorded: tuple[RunningServer, list[tuple[str, str]]],
) -> None:
    """A gradient measured under the inline bound still goes to a worker, while an ONNX
    Runtime method measured as cheap runs inline."""
    running, calls = recorded
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        measured_cheap(running, stub, pb.METHOD_VANILLA_GRADIENT, "vanilla_gradient")
        measured_cheap(running, stub, pb.METHOD_SMOE_SCALE, "smoe_scale")
        gradients, smoe = inline_count(running, "vanilla_gradient"), inline_count(running,
                                                                                  "smoe_scale")
        calls.clear()
        for seed in range(3):
            stub.Explain(request(pb.METHOD_VANILLA_GRADIENT, seed), timeout=30)
            stub.Explain(request(pb.METHOD_SMOE_SCALE, seed), timeout=30)
    assert inline_count(running, "vanilla_gradient") == gradients
    assert inline_count(running, "smoe_scale") == smoe + 3
    torch_threads = {thread for thread, method in calls if method == "vanilla_gradient"}
    assert torch_threads and all(thread.startswith("explain") for thread in torch_threads)
