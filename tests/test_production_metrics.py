"""``/metrics`` adds up to the responses: known requests, then the deltas on a real scrape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.serving.metrics import LATENCY_BUCKETS
from tests.conftest import RunningServer, make_config
from tests.production_support import scrape, tiny_request, value


@pytest.fixture(scope="module")
def metered(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository)).start()
    yield running
    running.stop()


def test_counters_and_histograms_equal_the_costs_in_responses(metered: RunningServer) -> None:
    port = metered.server.metrics_port
    before = scrape(port)
    with grpc.insecure_channel(metered.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        replies = {"vanilla_gradient": [], "occlusion": [], "predict": []}
        for seed in range(3):
            replies["vanilla_gradient"].append(
                stub.Explain(
                    tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=2, seed=seed), timeout=30
                )
            )
        for seed in range(2):
            request = tiny_request(pb.METHOD_OCCLUSION, batch=1, seed=seed)
            request.occlusion.stride = 16
            replies["occlusion"].append(stub.Explain(request, timeout=30))
        for seed in range(2):
            request = tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=3, seed=seed)
            replies["predict"].append(
                stub.Predict(pb.PredictRequest(model="tiny", input=request.input), timeout=30)
            )
        info = stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=10)
        after = scrape(port)
        bad = tiny_request(pb.METHOD_VANILLA_GRADIENT, shape=(3, 31, 32))
        with pytest.raises(grpc.RpcError) as invalid:
            stub.Explain(bad, timeout=30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unavailable:
            stub.Explain(
                pb.ExplainRequest(model="broken", method=pb.METHOD_OCCLUSION, input=bad.input),
                timeout=30,
            )
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    failed = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for method, responses in replies.items():
        costs = [r.cost for r in responses]
        labels = {"model": "tiny", "method": method}
        assert delta("saliency_requests_total", code="OK", **labels) == len(costs)
        assert delta("saliency_request_seconds_count", **labels) == len(costs)
        assert delta("saliency_request_seconds_sum", **labels) == pytest.approx(
            sum(c.wall_seconds for c in costs), rel=1e-9, abs=1e-12
        )
        assert delta("saliency_cpu_seconds_total", **labels) == pytest.approx(
            sum(c.cpu_seconds for c in costs), rel=1e-9, abs=1e-12
        )
        forward = sum(
            delta("saliency_forward_passes_total", engine=engine, **labels)
            for engine in ("torch", "onnxruntime")
        )
        assert forward == sum(c.forward_passes for c in costs)
        assert delta("saliency_backward_passes_total", **labels) == sum(
            c.backward_passes for c in costs
        )
        # Every observation lands in exactly the bucket its Cost says.
        for bound in LATENCY_BUCKETS:
            expected = sum(c.wall_seconds <= bound for c in costs)
            assert delta("saliency_request_seconds_bucket", le=_le(bound), **labels) == expected
    # Gradients run on torch: one torch forward per backward; the prediction on ONNX Runtime.
    gradient = {"model": "tiny", "method": "vanilla_gradient"}
    assert delta("saliency_forward_passes_total", engine="torch", **gradient) == 6
    assert delta("saliency_forward_passes_total", engine="onnxruntime", **gradient) == 6
    assert delta("saliency_backward_passes_total", **gradient) == 6

    # Failed requests are counted by code but stay out of the latency histogram (it
    # describes the methods' cost).
    def failed_delta(name: str, **labels: str) -> float:
        return value(failed, name, **labels) - value(after, name, **labels)

    assert (
        failed_delta(
            "saliency_requests_total",
            model="tiny",
            method="vanilla_gradient",
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    assert (
        failed_delta(
            "saliency_requests_total", model="broken", method="occlusion", code="UNAVAILABLE"
        )
        == 1
    )
    assert (
        failed_delta("saliency_request_seconds_count", model="tiny", method="vanilla_gradient") == 0
    )

    # GetModel's measured mean is the same figures: what METHOD_AUTO ranks by.
    methods = {m.name: m for m in info.methods}
    for method in ("vanilla_gradient", "occlusion"):
        walls = [r.cost.wall_seconds for r in replies[method]]
        assert methods[method].measured_requests == len(walls)
        assert methods[method].mean_seconds == pytest.approx(sum(walls) / len(walls), rel=1e-9)


def test_gauges_and_model_readiness(metered: RunningServer) -> None:
    samples = scrape(metered.server.metrics_port)
    assert value(samples, "saliency_inflight_requests") == 0
    assert value(samples, "saliency_queued_requests") == 0
    assert value(samples, "saliency_model_ready", model="tiny", version="1") == 1
    assert ("saliency_model_ready", frozenset({("model", "broken"), ("version", "1")})) in samples
    assert value(samples, "saliency_model_ready", model="broken", version="1") == 0
    buckets = {
        dict(labels)["le"] for name, labels in samples if name == "saliency_queue_seconds_bucket"
    }
    assert {"0.001", "120.0", "+Inf"} <= buckets


def test_unknown_models_and_methods_do_not_create_label_values(metered: RunningServer) -> None:
    """Fuzzed names must not grow the metric series without bound."""
    with grpc.insecure_channel(metered.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for name in ("nope-1", "nope-2"):
            with pytest.raises(grpc.RpcError) as error:
                stub.Explain(pb.ExplainRequest(model=name, method=999), timeout=10)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
    samples = scrape(metered.server.metrics_port)
    models = {
        dict(labels).get("model") for name, labels in samples if name == "saliency_requests_total"
    }
    assert "nope-1" not in models and "unknown" in models
    assert (
        value(
            samples, "saliency_requests_total", model="unknown", method="unknown", code="NOT_FOUND"
        )
        == 2
    )


def _le(bound: float) -> str:
    return str(float(bound))
