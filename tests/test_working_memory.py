"""A method's working memory stays inside ``chunk_memory_bytes`` and its deadline is checked
within one chunk, whatever its parameters ask for; served for real on a loopback port.

Memory is numpy's, as tracemalloc sees it in this process (the server runs in a thread of
it): ONNX Runtime's activations are outside it, so a chunk's own arrays alone must stay
under the budget. Each bound subtracts the same request with one mask (or the smallest
population), which measures what does not depend on the parameter (protobuf messages, the
prediction run, the maps) on this machine.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from saliency_service.core.errors import DeadlineExceeded
from saliency_service.core.repository import InputSpec, ModelHandle
from saliency_service.core.request import Job, RequestState
from saliency_service.methods import registry
from saliency_service.methods._utils.baselines import make_baseline
from saliency_service.methods.decam import de_generation
from saliency_service.methods.perturbation import RiseMasks
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import RunningServer, make_config
from tests.models import TinyCNN

SIZE = 128  # the finest legal RISE grid, cells = 128, is one cell per pixel
CHUNK_ACTIVATIONS = 16  # the budget: this many network inputs' activations


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("working_memory")
    export_package(TinyCNN(4), name="tiny", version=1, input_shape=(3, SIZE, SIZE),
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=["a", "b", "c", "d"],
                   repository=root, head="fc", verify_inputs=1)
    return root


@pytest.fixture(scope="module")
def budget(package: Path) -> int:
    manifest = json.loads((package / "tiny" / "1" / "manifest.json").read_text())
    return CHUNK_ACTIVATIONS * int(manifest["activation_bytes"])


@pytest.fixture(scope="module")
def stub(package: Path, budget: int) -> Iterator[pb_grpc.ExplainerStub]:
    # One worker, and nothing runs inline: a request waits for the worker to be free.
    running = RunningServer(make_config(package, max_inflight=1, max_queue=4, max_batch=16,
                                        inline_below_ms=0, chunk_memory_bytes=budget)).start()
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.ExplainerStub(channel)
    running.stop()


def images(batch: int = 1, seed: int = 0) -> pb.Input:
    pixels = np.random.default_rng(seed).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)
    return pb.Input(tensor=array_to_tensor(pixels))


def rise(masks: int, cells: int = SIZE) -> pb.ExplainRequest:
    return pb.ExplainRequest(model="tiny", method=pb.METHOD_RISE, input=images(), seed=3,
                             rise=pb.RiseParams(masks=masks, cells=cells))


def decam(population: int, batch: int = 4) -> pb.ExplainRequest:
    return pb.ExplainRequest(model="tiny", method=pb.METHOD_DECAM, input=images(batch), seed=3,
                             decam=pb.DecamParams(population=population, grid=32,
                                                  generations=1, refine=False,
                                                  # the search's own arrays; the regression
                                                  # map adds a grid²×grid² matrix per image
                                                  aggregate="covariance"))


def traced_peak(call: Callable[[], object]) -> int:
    """The peak of traced allocations (bytes) while ``call`` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rise_working_memory_stays_in_the_chunk_budget(stub: pb_grpc.ExplainerStub,
                                                       budget: int) -> None:
    """2048 masks of 128 × 128 cells: drawn at once, their grids alone are 2048 × 128² float64
    uniforms (268 MB) against a budget of a few dozen MB."""
    masks = 2048
    assert masks * SIZE * SIZE * 8 > 4 * budget  # the test is not vacuous
    fixed = traced_peak(lambda: stub.Explain(rise(masks=1), timeout=60))
    reply: list[pb.ExplainResponse] = []
    peak = traced_peak(lambda: reply.append(stub.Explain(rise(masks=masks), timeout=120)))
    assert reply[0].cost.forward_passes == 1 + masks
    assert peak - fixed <= budget, (peak, fixed, budget)


def test_decam_working_memory_stays_in_the_chunk_budget(stub: pb_grpc.ExplainerStub,
                                                        budget: int) -> None:
    """The largest population on a 32 × 32 grid: a generation's donor keys, donors, mutants
    and random draws used to exist for the whole batch at once, many times the population."""
    population = 256
    fixed = traced_peak(lambda: stub.Explain(decam(population=4), timeout=60))
    peak = traced_peak(lambda: stub.Explain(decam(population=population), timeout=120))
    assert 4 * population * 32 * 32 * 8 * 8 > budget  # eight copies would not fit
    assert peak - fixed <= budget, (peak, fixed, budget)


def test_decam_search_larger_than_the_budget_is_refused(stub: pb_grpc.ExplainerStub,
                                                        budget: int) -> None:
    """A population that cannot be held inside one chunk is refused before any work."""
    batch = 16
    assert 17 * batch * 256 * 32 * 32 > budget
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(decam(population=256, batch=batch), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk memory budget" in error.value.details()
    assert "population=256" in error.value.details()


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_rise_past_its_deadline_frees_the_worker_within_a_chunk(
        stub: pb_grpc.ExplainerStub) -> None:
    """The largest legal RISE request with a deadline it cannot meet: DEADLINE_EXCEEDED, and
    the only worker takes the next request after at most the chunk it was in."""
    # Each mask of a one-image chunk needs one input's activations, so a chunk holds at most
    # CHUNK_ACTIVATIONS masks: a request of that many takes at least one chunk's time.
    one_chunk = rise(masks=CHUNK_ACTIVATIONS)
    probe = pb.PredictRequest(model="tiny", input=images())
    stub.Predict(probe, timeout=60)  # warm
    stub.Explain(one_chunk, timeout=60)
    # Upper bounds on this machine now: the slowest of three, each a whole request.
    probe_alone = max(_seconds(lambda: stub.Predict(probe, timeout=60)) for _ in range(3))
    chunk = max(_seconds(lambda: stub.Explain(one_chunk, timeout=60)) for _ in range(3))
    deadline = 0.5
    waits = []
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as error:
            stub.Explain(rise(masks=10240), timeout=deadline)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        waits.append(_seconds(lambda: stub.Predict(probe, timeout=60)))
    # Noise only adds time, so the best of three tries is the one to bound.
    assert min(waits) <= probe_alone + 2 * chunk, (waits, probe_alone, chunk)


def test_blur_baseline_stops_at_the_deadline_between_planes() -> None:
    """The blur baseline (DE-CAM's default; occlusion's and Integrated Gradients' choice) runs
    before any chunk, and its cost grows with σ = size / 16 as well as with the pixels: on a
    batch of large images it checks the deadline before each plane."""
    inputs = np.random.default_rng(0).random((4, 3, 512, 512), dtype=np.float32)
    spec = InputSpec(shape=(-1, 3, 512, 512), mean=(0.5,) * 3, std=(0.25,) * 3)
    plane = max(_seconds(lambda: make_baseline("blur", inputs[:1, :1], spec))
                for _ in range(3))
    state = RequestState(time.monotonic() + plane)
    with pytest.raises(DeadlineExceeded):
        make_baseline("blur", inputs, spec, state=state)
    assert state.deadline is not None
    overrun = time.monotonic() - state.deadline
    assert overrun <= 2 * plane < inputs.shape[0] * inputs.shape[1] * plane / 4, (overrun, plane)


def test_rise_maps_do_not_depend_on_the_chunk_budget(package: Path) -> None:
    """Bit for bit, from one mask per chunk to every mask in one chunk."""
    handle = ModelHandle("tiny", 1, package / "tiny" / "1")
    handle.load()
    handler = registry.get("rise")
    inputs = np.random.default_rng(4).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    params = handler.params(masks=60, cells=9)

    def raw(chunk_memory_bytes: int) -> np.ndarray:
        job = Job(model=handle, inputs=inputs, targets=np.array([1, 2]), seed=8,
                         params=params, limits={"chunk_memory_bytes": chunk_memory_bytes})
        return handler.explain(job).raw

    whole = raw(1 << 40)
    for chunk_memory_bytes in (1, 3 * int(handle.spec().extra["activation_bytes"]), 1 << 26):
        np.testing.assert_array_equal(raw(chunk_memory_bytes), whole)


def test_rise_grids_drawn_per_chunk_are_those_of_one_draw() -> None:
    """Any slice of masks, in any order, gets the grids and shifts one draw would give."""
    masks, cells, keep = 37, 6, 0.4
    rng = np.random.default_rng(12)
    grids = (rng.random((masks, cells, cells)) < keep).astype(np.float32)
    shifts = np.stack([rng.integers(0, 4, masks), rng.integers(0, 4, masks)], axis=1)
    drawn = RiseMasks(np.random.default_rng(12), masks, cells, keep, 20, 20)
    np.testing.assert_array_equal(drawn.shifts, shifts)
    for part in (slice(30, 37), slice(0, 1), slice(5, 29)):
        np.testing.assert_array_equal(drawn.grids(part), grids[part])


@pytest.mark.parametrize("strategy", ["best1bin", "rand1bin"])
def test_de_generation_in_blocks_is_the_same_generation(strategy: str) -> None:
    """Blocks of images bound a generation's temporaries without changing its numbers, or
    the generator's state after it."""
    def generation(block: int | None) -> tuple[np.ndarray, float]:
        rng = np.random.default_rng(6)
        population, fitness = rng.random((5, 12, 9)), rng.random((5, 12))
        trial = de_generation(rng, population, fitness, 0.6, 0.7, strategy, block)
        return trial, float(rng.random())

    whole, after = generation(None)
    for block in (1, 2, 3, 4):
        trial, next_draw = generation(block)
        np.testing.assert_array_equal(trial, whole)
        assert next_draw == after

