"""Cheap one-item tensor requests on an idle server run on the event loop, and nothing else
does: through the real server, counted by ``saliency_inline_requests_total``."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.config import MAX_INLINE_MS, Config
from tests.conftest import RunningServer, make_config
from tests.production_support import scrape, slow_repository, slow_request, value


@pytest.fixture(scope="module")
def servers(repository: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, RunningServer]]:
    root = slow_repository(tmp_path_factory.getbasetemp(), repository)
    # The widest bound, so that a noisy host's slow Predict (the tiny model's take ~0.1 ms,
    # one took over 2 ms on a loaded CI machine) still counts as cheap.
    running = {"default": RunningServer(make_config(root, inline_below_ms=MAX_INLINE_MS)).start(),
               "off": RunningServer(make_config(root, inline_below_ms=0)).start()}
    yield running
    for server in running.values():
        server.stop()


def predict_request(batch: int = 1, seed: int = 0) -> pb.PredictRequest:
    inputs = np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32)
    return pb.PredictRequest(model="tiny", input=pb.Input(tensor=array_to_tensor(inputs)))


def inline_count(server: RunningServer, method: str = "predict") -> float:
    return value(scrape(server.server.metrics_port), "saliency_inline_requests_total",
                 model="tiny", method=method)


def measure_as_cheap(server: RunningServer, stub: pb_grpc.ExplainerStub) -> None:
    """Predicts until the method's recent cost, which starts at the first (cold) call's,
    falls below the inline bound of the ``default`` server (the server that has inlining
    off is brought to the same state, so only its setting differs)."""
    bound = MAX_INLINE_MS / 1000.0
    for seed in range(100):
        stub.Predict(predict_request(seed=seed), timeout=30)
        if server.server.metrics.mean_cost("tiny", "predict").recent_seconds < bound:
            return
    raise AssertionError("Predict of the tiny model never measured under the inline bound")


def test_measured_cheap_requests_run_inline_with_the_same_answers(
    servers: dict[str, RunningServer],
) -> None:
    with grpc.insecure_channel(servers["default"].address) as a, \
            grpc.insecure_channel(servers["off"].address) as b:
        inline, pooled = pb_grpc.ExplainerStub(a), pb_grpc.ExplainerStub(b)
        measure_as_cheap(servers["default"], inline)
        measure_as_cheap(servers["off"], pooled)
        before, off_before = inline_count(servers["default"]), inline_count(servers["off"])
        for seed in range(4):
            request = predict_request(seed=seed)
            ours, theirs = inline.Predict(request, timeout=30), pooled.Predict(request, timeout=30)
            assert ours.logits.data == theirs.logits.data
            assert ours.predictions == theirs.predictions
            assert ours.cost.forward_passes == 1
        assert inline_count(servers["default"]) - before == 4
        assert inline_count(servers["off"]) - off_before == 0  # --inline-below-ms 0


def test_batches_and_images_go_to_the_pool(servers: dict[str, RunningServer]) -> None:
    server = servers["default"]
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 90)).save(png, format="PNG")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        measure_as_cheap(server, stub)
        before = inline_count(server)
        stub.Predict(predict_request(batch=2), timeout=30)
        images = pb.Input(images=pb.EncodedImages(images=[png.getvalue()]))
        stub.Predict(pb.PredictRequest(model="tiny", input=images), timeout=30)
        assert inline_count(server) == before
        stub.Predict(predict_request(), timeout=30)  # while one item still goes inline
        assert inline_count(server) == before + 1


def test_a_busy_server_hands_off_and_answers_meanwhile(servers: dict[str, RunningServer]) -> None:
    """While a long request executes, a cheap one goes to the pool, so it is answered before
    the long one ends (the event loop stays free)."""
    server = servers["default"]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        measure_as_cheap(server, stub)
        long = threading.Thread(target=lambda: stub.Explain(slow_request(stride=2), timeout=120))
        long.start()
        try:
            deadline = time.monotonic() + 30
            while server.server.admission.inflight == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert server.server.admission.inflight == 1
            before = inline_count(server)
            stub.Predict(predict_request(), timeout=30)
            assert server.server.admission.inflight == 1  # the long request is still running
            assert inline_count(server) == before
        finally:
            long.join(120)


@pytest.mark.parametrize("bad", [-1.0, 25.0, float("nan")])
def test_inline_bound_is_checked_at_start(bad: float) -> None:
    with pytest.raises(ValueError, match="inline_below_ms must be within"):
        Config(inline_below_ms=bad)
