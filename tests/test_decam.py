"""DE-CAM, RISE and occlusion on an ONNX model that our exporter did not make, served for real.

The model is built with ``onnx.helper`` and packaged by hand (no ``model.pt2``, no scale
outputs); the server runs on a loopback port with one worker so that a busy worker shows.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest

from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Job
from saliency_service.methods import registry
from saliency_service.methods._utils.resize import upsample
from saliency_service.methods.decam import (
    MaskFitness,
    de_generation,
    plan_search,
    refine_stages,
    search_masks,
    split_generations,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import RunningServer, make_config
from tests.onnx_models import region_model, small_cnn, write_package

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
REGION_SIZE = 24
REGION_BOX = (4, 12, 10, 18)
ONNX_ONLY_MODULES = ("saliency_service/methods/decam.py",
                     "saliency_service/methods/perturbation.py")


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("plain_models")
    write_package(small_cnn(classes=3, size=SIZE), root, "plain")
    write_package(region_model(REGION_SIZE, REGION_BOX), root, "region")
    running = RunningServer(make_config(root, max_inflight=1, max_queue=8)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def plain_stub(plain_server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(plain_server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def inputs(batch: int = 2, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def decam_request(batch: int = 2, model: str = "plain", **params: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, method=pb.METHOD_DECAM,
                             input=pb.Input(tensor=array_to_tensor(inputs(batch))),
                             decam=pb.DecamParams(**params))


# ---- no torch, any ONNX model ----------------------------------------------------------------

def test_onnx_only_handler_modules_import_without_torch() -> None:
    # methods.registry's load_builtin() would import every builtin module (some need torch),
    # so the two modules are imported directly; their @register runs on import.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import saliency_service.methods.decam, saliency_service.methods.perturbation\n"
            "from saliency_service.methods.registry import _HANDLERS\n"
            "assert {'decam', 'rise', 'occlusion'} <= set(_HANDLERS), _HANDLERS\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for relative in ONNX_ONLY_MODULES:
        tree = ast.parse((ROOT / relative).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not any(name.split(".")[0] == "torch" for name in imported), (relative, imported)


def test_get_model_offers_the_black_box_and_gradient_methods(plain_stub) -> None:
    """A graph made without our exporter: the black-box methods, and the gradient methods
    through its translation; the methods that need a feature map say so."""
    info = plain_stub.GetModel(pb.GetModelRequest(model="plain"), timeout=10)
    assert info.status.ready, info.status.error
    assert list(info.scale_outputs) == []
    names = {m.name for m in info.methods}
    assert {"decam", "rise", "occlusion", "vanilla_gradient", "integrated_gradients"} <= names
    missing = {m.name: m.reason for m in info.unavailable_methods}
    assert {"gradcam", "smoe_scale"} <= missing.keys()
    for method in info.methods:
        handler = registry.get(method.name)
        assert not handler.needs_scales, method.name
    decam = next(m for m in info.methods if m.name == "decam")
    assert decam.defaults["grid"] == "8" and decam.defaults["baseline"] == "least_score"


@pytest.mark.parametrize("method, field, params, passes_per_image", [
    (pb.METHOD_RISE, "rise", pb.RiseParams(masks=50, cells=4), 50),
    (pb.METHOD_OCCLUSION, "occlusion", pb.OcclusionParams(window=8, stride=8), 16),
    # Default refinement: stages 4 and 8, each evaluating its start population once; the
    # default baseline tries 4 candidates first.
    (pb.METHOD_DECAM, "decam", pb.DecamParams(population=6, generations=3, patience=0),
     4 + 2 * 6 * (3 + 2)),
])
def test_maps_over_grpc_for_a_model_made_without_our_exporter(
        plain_stub, method: int, field: str, params: object, passes_per_image: int) -> None:
    batch = 2
    request = pb.ExplainRequest(model="plain", method=method,
                                input=pb.Input(tensor=array_to_tensor(inputs(batch))),
                                return_raw=True)
    getattr(request, field).CopyFrom(params)
    reply = plain_stub.Explain(request, timeout=60)
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (batch, SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    # Occlusion clips negative drops, so its map may be blank; the raw answer may not.
    assert np.abs(tensor_to_array(reply.raw)).max() > 0
    assert reply.cost.method == method
    # One pass per image for the prediction, then the method's own passes.
    assert reply.cost.forward_passes == batch + batch * passes_per_image
    assert reply.cost.backward_passes == 0


@pytest.mark.parametrize("method, field, params", [
    (pb.METHOD_DECAM, "decam", pb.DecamParams(baseline=pb.BASELINE_BLACK, grid=6)),
    (pb.METHOD_DECAM, "decam", pb.DecamParams(baseline=pb.BASELINE_BLACK, grid=6,
                                              aggregate="best")),
    (pb.METHOD_RISE, "rise", pb.RiseParams(masks=600, cells=6)),
    (pb.METHOD_OCCLUSION, "occlusion", pb.OcclusionParams(window=4, stride=2)),
])
def test_maps_put_their_mass_on_the_only_evidence(plain_stub, method: int, field: str,
                                                  params: object) -> None:
    """Class 0 of the region model sees nothing but the box: the map must find it."""
    pixels = np.random.default_rng(1).uniform(0.5, 1.0, (2, 3, REGION_SIZE, REGION_SIZE))
    request = pb.ExplainRequest(
        model="region", method=method, target=pb.Target(class_index=0),
        input=pb.Input(tensor=array_to_tensor(((pixels - 0.5) / 0.25).astype(np.float32))))
    getattr(request, field).CopyFrom(params)
    maps = tensor_to_array(plain_stub.Explain(request, timeout=60).saliency)
    y0, y1, x0, x1 = REGION_BOX
    box = np.zeros((REGION_SIZE, REGION_SIZE), bool)
    box[y0:y1, x0:x1] = True
    for item in maps:
        assert box.flat[item.argmax()], "the map's peak is outside the evidence"
        # RISE keeps a raised floor everywhere (every mask keeps half the image), so the
        # check is a contrast, not a share of the mass.
        assert item[box].mean() > 1.5 * item[~box].mean(), (item[box].mean(),
                                                            item[~box].mean())


# ---- streaming, cancellation, deadlines ------------------------------------------------------

def test_stream_reports_generations_then_the_result(plain_stub) -> None:
    generations = 12
    updates = list(plain_stub.ExplainStream(
        decam_request(population=8, generations=generations, patience=0, refine=False), timeout=60))
    kinds = [u.WhichOneof("update") for u in updates]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    progress = [u.progress for u in updates[:-1]]
    assert [p.step for p in progress] == list(range(1, generations + 1))
    assert all(p.total_steps == generations for p in progress)
    passes = [p.forward_passes for p in progress]
    assert all(later > earlier for earlier, later in itertools.pairwise(passes))
    fitness = [p.best_fitness for p in progress]
    assert all(later >= earlier - 1e-9 for earlier, later in itertools.pairwise(fitness))
    # Maps come on steps 1, 5 and 10; one still unsent when a newer map is ready is dropped
    # (a stream holds one pending map), so which arrive depends on how fast the stream is
    # written, but never the last.
    with_maps = [p.step for p in progress if p.HasField("saliency")]
    assert set(with_maps) <= {1, 5, 10} and with_maps[-1] == 10
    first_map = tensor_to_array(next(p for p in progress if p.HasField("saliency")).saliency)
    assert first_map.shape == (2, SIZE, SIZE) and first_map.max() == pytest.approx(1.0)
    result = updates[-1].result
    assert result.cost.forward_passes == 2 + 2 * (4 + 2 * 8 * (generations + 1))
    assert result.cost.forward_passes == passes[-1]
    assert result.diagnostics["best_fitness"] == pytest.approx(fitness[-1])


def _long_request() -> pb.ExplainRequest:
    """Hundreds of generations of a sizeable population: far longer than the test waits."""
    return decam_request(batch=4, population=64, generations=500, patience=0)


def _timed_predict(stub) -> float:
    started = time.perf_counter()
    stub.Predict(pb.PredictRequest(model="plain", input=pb.Input(
        tensor=array_to_tensor(inputs(1)))), timeout=30)
    return time.perf_counter() - started


def test_cancelling_a_stream_frees_the_worker_within_a_generation(plain_stub) -> None:
    call = plain_stub.ExplainStream(_long_request(), timeout=120)
    stamps = []
    for _update in call:
        stamps.append(time.perf_counter())
        if len(stamps) == 4:
            break
    generation = float(np.diff(stamps).mean())
    call.cancel()
    # The only worker was busy with the search; the next request must get it back promptly.
    waited = _timed_predict(plain_stub)
    assert waited < max(1.0, 5 * generation), (waited, generation)
    assert waited < 0.2 * 500 * generation  # nowhere near the search's full length


def test_deadline_stops_the_search_and_frees_the_worker(plain_stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        plain_stub.Explain(_long_request(), timeout=1.0)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _timed_predict(plain_stub) < 2.0


def test_best_effort_returns_the_best_map_so_far(plain_stub) -> None:
    request = _long_request()
    request.budget.best_effort = True
    started = time.perf_counter()
    reply = plain_stub.Explain(request, timeout=2.0)
    assert time.perf_counter() - started < 2.0
    assert reply.cost.truncated
    assert 0 < reply.diagnostics["generations_run"] < 500
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (4, SIZE, SIZE) and maps.max() == pytest.approx(1.0)


def test_cancelled_unary_call_is_not_left_running(plain_stub) -> None:
    future = plain_stub.Explain.future(_long_request(), timeout=120)
    time.sleep(0.5)
    future.cancel()
    assert _timed_predict(plain_stub) < 2.0


# ---- reproducibility and parameter checks ----------------------------------------------------

def test_same_seed_same_map_other_seed_other_map(plain_stub) -> None:
    def maps(seed: int) -> np.ndarray:
        request = decam_request(population=8, generations=5)
        request.seed = seed
        return tensor_to_array(plain_stub.Explain(request, timeout=60).saliency)

    first, again, other = maps(7), maps(7), maps(8)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("params, named", [
    ({"grid": 0}, "grid"),
    ({"grid": 33}, "grid"),
    ({"population": 3}, "population"),
    ({"generations": 0}, "generations"),
    ({"generations": 100_000}, "generations"),
    ({"mutation": 0.0}, "mutation"),
    ({"crossover": 1.5}, "crossover"),
    ({"strategy": "best2exp"}, "strategy"),
    ({"patience": -1}, "patience"),
    ({"deletion_weight": 0.0, "preservation_weight": 0.0}, "deletion_weight"),
    ({"max_forward_passes": -1}, "max_forward_passes"),
    ({"aggregate": "mean"}, "aggregate"),
    ({"spread": "<b>nearest</b>"}, "spread"),
    # Below the prediction and one start population: 1 + 6 candidates × 2 terms = 13.
    ({"population": 6, "max_forward_passes": 12}, "max_forward_passes"),
])
def test_invalid_params_are_invalid_argument_naming_the_parameter(
        plain_stub, params: dict, named: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        plain_stub.Explain(decam_request(**params), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in error.value.details()


# ---- the DE machinery ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["best1bin", "rand1bin"])
def test_de_generation_maximizes_a_known_function(strategy: str) -> None:
    """Ten lock-stepped searches, each toward its own optimum: DE is stochastic and best/1 can
    stall, but nearly all must arrive (scipy's DE stalls on about 1 in 60 such runs too)."""
    rng = np.random.default_rng(0)
    searches = 10
    optimum = rng.uniform(0.1, 0.9, (searches, 1, 4))

    def fitness(population: np.ndarray) -> np.ndarray:
        return -((population - optimum) ** 2).sum(axis=2)

    population = rng.random((searches, 16, 4))
    scores = fitness(population)
    for _ in range(150):
        trial = de_generation(rng, population, scores, 0.6, 0.9, strategy)
        assert trial.min() >= 0.0 and trial.max() <= 1.0
        trial_scores = fitness(trial)
        better = trial_scores >= scores
        population = np.where(better[..., None], trial, population)
        scores = np.where(better, trial_scores, scores)
    best = population[np.arange(searches), scores.argmax(axis=1)]
    arrived = np.abs(best - optimum[:, 0]).max(axis=1) < 1e-3
    assert arrived.sum() >= searches - 1, arrived


def test_refinement_stages_and_generation_split() -> None:
    assert refine_stages(8, False) == [8]
    assert refine_stages(16, True) == [4, 8, 16]
    assert refine_stages(12, True) == [4, 8, 12]
    assert refine_stages(4, True) == [4]
    assert split_generations(30, 3) == [10, 10, 10]
    assert split_generations(31, 3) == [10, 10, 11]
    assert sum(split_generations(7, 3)) == 7


def test_refined_search_streams_across_stages(plain_stub) -> None:
    updates = list(plain_stub.ExplainStream(
        decam_request(grid=16, refine=True, population=6, generations=9, patience=0),
        timeout=60))
    steps = [u.progress.step for u in updates[:-1]]
    assert steps == list(range(1, 10))
    result = updates[-1].result
    # Three stages, each evaluating its seeded population once, then 3 generations each.
    assert result.cost.forward_passes == 2 + 2 * (4 + 2 * 6 * (9 + 3))


# ---- the pass budget -------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [13, 14, 40, 101])
def test_pass_budget_is_spent_exactly_and_reported(plain_stub, budget: int) -> None:
    """Population 6, two fitness terms: a whole evaluation is 12 passes per image, a candidate
    2, so an image costs the budget, or one pass less when the rest after the prediction is
    odd; never more. The budget cuts the 50 generations asked for."""
    batch = 2
    reply = plain_stub.Explain(decam_request(batch=batch, population=6, generations=50,
                                             patience=0, max_forward_passes=budget,
                                             baseline=pb.BASELINE_BLUR), timeout=60)
    assert reply.cost.forward_passes == batch * (1 + 2 * ((budget - 1) // 2))
    assert reply.cost.truncated
    assert reply.diagnostics["budget_bound"] == 1.0
    assert 0 <= reply.diagnostics["generations_run"] < 50


def test_pass_budget_with_one_fitness_term_is_spent_to_the_pass(plain_stub) -> None:
    updates = list(plain_stub.ExplainStream(decam_request(
        population=6, generations=50, patience=0, preservation_weight=0.0,
        max_forward_passes=50), timeout=60))
    result = updates[-1].result
    assert result.cost.forward_passes == 2 * 50
    assert all(u.progress.forward_passes <= 2 * 50 for u in updates[:-1])
    assert updates[-2].progress.forward_passes == 2 * 50


def test_a_budget_that_does_not_bind_changes_nothing(plain_stub) -> None:
    params = {"population": 6, "generations": 3, "patience": 0}
    free = plain_stub.Explain(decam_request(**params), timeout=60)
    roomy = plain_stub.Explain(decam_request(**params, max_forward_passes=10_000), timeout=60)
    assert roomy.cost.forward_passes == free.cost.forward_passes == 2 + 2 * (4 + 2 * 6 * (3 + 2))
    assert not roomy.cost.truncated and "budget_bound" not in roomy.diagnostics
    np.testing.assert_array_equal(tensor_to_array(roomy.saliency),
                                  tensor_to_array(free.saliency))


def test_search_plan_under_a_budget() -> None:
    # No budget: the generations asked for, split between the stages 4 and 8.
    assert plan_search(8, True, 30, 32, 2).generations == (15, 15)
    # 330 passes: 5 evaluations of 64 → two stage starts and 3 whole generations, then
    # (329 − 5·64) // 2 = 4 candidates.
    plan = plan_search(8, True, 30, 32, 2, budget=330)
    assert (plan.stages, plan.generations, plan.tail, plan.budget_bound) == (
        (4, 8), (1, 2), 4, True)
    # Too short for two stages and a generation after each: only the final grid.
    plan = plan_search(8, True, 30, 32, 2, budget=1 + 3 * 64)
    assert (plan.stages, plan.generations, plan.tail) == ((8,), (2,), 0)
    assert plan_search(8, True, 30, 32, 2, budget=1 + 64).generations == (0,)
    with pytest.raises(ValueError, match="below 65"):
        plan_search(8, True, 30, 32, 2, budget=64)


# ---- the map ---------------------------------------------------------------------------------

class RecordingFitness(MaskFitness):
    """Our fitness, keeping every evaluated candidate and its fitness."""

    seen: ClassVar[list[tuple[np.ndarray, np.ndarray]]] = []

    def __call__(self, grids: np.ndarray) -> np.ndarray:
        fitness = super().__call__(grids)
        RecordingFitness.seen.append((grids.copy(), fitness.copy()))
        return fitness


@pytest.mark.parametrize("budget", [0, 150])
def test_covariance_map_is_the_fitness_weighted_sum_of_every_evaluated_mask(
        tmp_path: Path, budget: int) -> None:
    """Σ (e − mean e) · upsample(mask) over all candidates (both stages, the partial last
    generation included), computed here from the recorded candidates, is the raw map; e is
    the model's part of the fitness (the sparsity penalty added back). ``spread: bilinear``:
    the cells' values are spread evenly (``changed_pixels`` is tested in
    test_decam_colour.py)."""
    write_package(small_cnn(classes=3, size=SIZE), tmp_path, "plain")
    handle = ModelHandle("plain", 1, tmp_path / "plain" / "1")
    handle.load()
    x = inputs(2)
    (logits,) = handle.run(x)
    params = registry.get("decam").params(
        None, population=6, generations=40, patience=0, max_forward_passes=budget,
        aggregate="covariance", spread="bilinear")
    job = Job(model=handle, inputs=x, targets=logits.argmax(1), params=params,
              base_logits=logits, seed=3)
    RecordingFitness.seen = []
    raw = search_masks(job, RecordingFitness).raw
    RecordingFitness.seen = [(g, f + params.sparsity * g.reshape(*f.shape, -1).mean(axis=2))
                             for g, f in RecordingFitness.seen]
    candidates = sum(f.shape[1] for _, f in RecordingFitness.seen)
    mean = sum(f.sum(axis=1) for _, f in RecordingFitness.seen) / candidates
    expected = np.zeros_like(raw, dtype=np.float64)
    for grids, fitness in RecordingFitness.seen:
        masks = upsample(grids.reshape(-1, *grids.shape[2:]).astype(np.float32), SIZE, SIZE)
        masks = masks.reshape(*grids.shape[:2], SIZE, SIZE)
        expected += np.einsum("nk,nkij->nij", fitness - mean[:, None], masks) / candidates
    assert {g.shape[2] for g, _ in RecordingFitness.seen} == {4, 8}
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-6)
    assert raw.min() < 0 < raw.max()  # covering some pixels lowers the fitness
