"""DE-CAM: how much does batching every generation into one ONNX Runtime call buy?

Side by side in one run, on the same images, seed and parameters:

* ``batched``: our DE-CAM — the N images' searches in lock-step, each generation (N ×
  population candidates × 2 fitness terms) one memory-bounded ONNX Runtime call;
* ``batched_per_image``: the same, one image at a time (what lock-step adds);
* ``one_candidate_per_call``: the straightforward way — the same DE, the same random numbers,
  but each candidate evaluated by its own ONNX Runtime call (its keep and delete images);
* ``scipy_vectorized``: ``scipy.optimize.differential_evolution(vectorized=True)`` with the
  same fitness, population, generations, F, CR and strategy, one image per search.

The first three share the DE trajectory, so their final fitness must agree up to float noise
(batched and single-image ONNX Runtime results differ in the last bits). Then time-to-map with
default parameters at 128×128 and 224×224 (DemoResNet-shaped models).

    python -m benchmarks.decam [--quick]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import differential_evolution

from benchmarks.common import (
    CACHE,
    base_parser,
    demo_repository,
    fmt,
    sized_repository,
    table,
    write_json,
)
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Job
from saliency_service.methods import registry
from saliency_service.methods._utils.resize import upsample
from saliency_service.methods.base import run_onnx_batched, softmax
from saliency_service.methods.decam import MaskFitness, search_masks
from saliency_service.methods.perturbation import blend


class OneCandidatePerCall(MaskFitness):
    """The same fitness, but one ONNX Runtime call per candidate (its keep + delete images)."""

    def __call__(self, grids: np.ndarray) -> np.ndarray:
        job = self.job
        batch, population = grids.shape[:2]
        height, width = job.inputs.shape[2:]
        fitness = np.zeros((batch, population))
        for item in range(batch):
            x, b = job.inputs[item:item + 1], self.baseline[item:item + 1]
            target, base = job.targets[item], self.base[item]
            for index in range(population):
                mask = upsample(grids[item, index][None], height, width)
                images = np.concatenate([blend(x, b, mask), blend(x, b, 1.0 - mask)])
                (logits,) = run_onnx_batched(job, images)
                keep, delete = softmax(logits)[:, target]
                fitness[item, index] = (
                    self.weights.preservation * keep / base
                    + self.weights.deletion * (base - delete) / base
                    - self.weights.sparsity * grids[item, index].mean())
        return fitness


def load(root: Path, name: str) -> ModelHandle:
    handle = ModelHandle(name, 1, root / name / "1")
    handle.load()
    if not handle.ready:
        raise SystemExit(f"{name} failed to load: {handle.error}")
    return handle


def model_224() -> ModelHandle:
    """A DemoResNet-shaped model at 224×224 (random weights; only the cost matters here)."""
    root = sized_repository("demo", 224)
    return load(root, "demo")


def make_job(handle: ModelHandle, inputs: np.ndarray, params: dict[str, Any],
             seed: int) -> Job:
    handler = registry.get("decam")
    (logits,) = handle.run(inputs)
    job = Job(model=handle, inputs=inputs, targets=logits.argmax(1),
              params=handler.params(None, {}, **params), base_logits=logits, seed=seed)
    handler.check(job)
    return job


def timed_search(handle: ModelHandle, inputs: np.ndarray, params: dict[str, Any], seed: int,
                 fitness_class: type[MaskFitness] = MaskFitness) -> dict[str, Any]:
    job = make_job(handle, inputs, params, seed)
    started = time.perf_counter()
    found = search_masks(job, fitness_class)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "forward_passes": job.cost.forward_passes,
            "fitness": float(found.diagnostics["best_fitness"]),
            "generations_run": found.diagnostics["generations_run"], "maps": found.raw}


def scipy_search(handle: ModelHandle, image: np.ndarray, params: dict[str, Any],
                 seed: int) -> dict[str, Any]:
    """One image through scipy's vectorized DE with our fitness (it minimizes −fitness)."""
    job = make_job(handle, image, params, seed)
    from saliency_service.methods.decam import FitnessWeights, search_baseline  # noqa: PLC0415

    baseline = search_baseline(job, job.rng())
    fitness = MaskFitness(job, baseline, FitnessWeights(
        float(job.params.preservation_weight), float(job.params.deletion_weight),
        float(job.params.sparsity)))
    grid, size = int(job.params.grid), int(job.params.population)

    def negative(x: np.ndarray) -> np.ndarray:  # x: D×S
        return -fitness(x.T.reshape(1, -1, grid, grid))[0]

    started = time.perf_counter()
    result = differential_evolution(
        negative, [(0.0, 1.0)] * grid * grid, strategy=job.params.strategy,
        maxiter=int(job.params.generations), init=job.rng().random((size, grid * grid)),
        mutation=float(job.params.mutation), recombination=float(job.params.crossover),
        tol=0.0, polish=False, vectorized=True, updating="deferred", rng=seed)
    return {"seconds": time.perf_counter() - started,
            "forward_passes": job.cost.forward_passes, "fitness": float(-result.fun)}


def helper_model_handle(name: str) -> ModelHandle:
    """A model built with ``onnx.helper`` at 32×32 (cached): ``small`` is a small CNN,
    ``linear`` a logistic-regression-style Flatten → Gemm, where a call costs far more than
    the arithmetic of one image."""
    from tests.onnx_models import linear_classifier, small_cnn, write_package  # noqa: PLC0415

    build = {"small": small_cnn, "linear": linear_classifier}[name]
    root = CACHE / f"decam-{name}"
    if not (root / name / "1" / "manifest.json").is_file():
        write_package(build(classes=10, size=32), root, name)
    return load(root, name)


def seconds_per_forward(handle: ModelHandle, inputs: np.ndarray, batch: int,
                        repeats: int = 5) -> float:
    """Best-of-``repeats`` ONNX Runtime seconds per image when run ``batch`` images a call."""
    images = np.repeat(inputs[:1], batch, axis=0)
    handle.run(images)  # warm-up (allocations for this batch shape)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        handle.run(images)
        best = min(best, time.perf_counter() - started)
    return best / batch


def side_by_side(handle: ModelHandle, inputs: np.ndarray, params: dict[str, Any],
                 seed: int) -> dict[str, Any]:
    """The four ways on the same images, seed and parameters, and the compute floor: the
    forward passes times ONNX Runtime's per-image cost at the batch size our fitness uses
    (no way of evaluating the same candidates can run fewer passes, each at least that)."""
    images = inputs.shape[0]
    job = make_job(handle, inputs, params, seed)
    per_generation = images * int(job.params.population) * 2  # keep + delete images
    chunk = min(job.items_per_chunk(), per_generation)
    per_image_batched = seconds_per_forward(handle, inputs, chunk)
    per_image_pairs = seconds_per_forward(handle, inputs, 2)  # the reference's call size
    batched = timed_search(handle, inputs, params, seed)
    per_image = [timed_search(handle, inputs[i:i + 1], params, seed) for i in range(images)]
    reference = timed_search(handle, inputs, params, seed, OneCandidatePerCall)
    scipy_runs = [scipy_search(handle, inputs[i:i + 1], params, seed) for i in range(images)]
    floor = batched["forward_passes"] * per_image_batched
    rows = []
    for name, seconds, passes, fitness in [
        ("batched (lock-step)", batched["seconds"], batched["forward_passes"],
         batched["fitness"]),
        ("batched, one image at a time", sum(r["seconds"] for r in per_image),
         sum(r["forward_passes"] for r in per_image),
         float(np.mean([r["fitness"] for r in per_image]))),
        ("one candidate per call", reference["seconds"], reference["forward_passes"],
         reference["fitness"]),
        ("scipy vectorized, per image", sum(r["seconds"] for r in scipy_runs),
         sum(r["forward_passes"] for r in scipy_runs),
         float(np.mean([r["fitness"] for r in scipy_runs]))),
        (f"compute floor (passes × ORT per image at batch {chunk})", floor,
         batched["forward_passes"], float("nan")),
    ]:
        rows.append({"model": f"{handle.name} {inputs.shape[2]}×{inputs.shape[3]}", "way": name,
                     "seconds": seconds, "forward_passes": passes,
                     "mean_best_fitness": fitness,
                     "time_vs_batched": seconds / batched["seconds"]})
    return {
        "model": handle.name, "input": list(inputs.shape[1:]), "rows": rows,
        "speedup_vs_one_candidate_per_call": reference["seconds"] / batched["seconds"],
        "ort_seconds_per_image": {"batch_2": per_image_pairs, f"batch_{chunk}": per_image_batched},
        # The most any batching can gain over one call per candidate: the reference's cost per
        # pass over the floor's. Our DE-CAM's time over the floor shows how close it gets.
        "batching_ceiling": per_image_pairs / per_image_batched,
        "batched_over_floor": batched["seconds"] / floor,
        "speedup_lockstep_vs_per_image": rows[1]["seconds"] / batched["seconds"],
        "fitness_gap": abs(batched["fitness"] - reference["fitness"]),
        "map_gap": float(np.abs(batched["maps"] - reference["maps"]).max()),
    }


def cell_inputs(handle: ModelHandle, images: int, seed: int) -> np.ndarray:
    """Test cells when the dataset module is there, else Gaussian noise."""
    spec = handle.spec().input
    try:
        from saliency_service.evaluation.cells import TEST_CONFIG, CellConfig, generate  # noqa: PLC0415
        from saliency_service.protocol.inputs import preprocess_pixels  # noqa: PLC0415

        cells = generate(images, CellConfig(size=spec.height, seed=TEST_CONFIG.seed))
        return preprocess_pixels(cells.images, spec)
    except ImportError:
        return np.random.default_rng(seed).normal(size=(images, *spec.shape[1:])).astype(
            np.float32)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = 2 if args.quick else args.images
    # The side-by-side run uses no early stop so all ways do exactly the same generations.
    params = ({"population": 16, "generations": 8, "patience": 0} if args.quick
              else {"population": 32, "generations": 30, "patience": 0})

    handles = [load(demo_repository(), "demo"), helper_model_handle("small"),
               helper_model_handle("linear")]
    comparisons = [side_by_side(handle, cell_inputs(handle, images, args.seed), params,
                                args.seed) for handle in handles]

    timing = []
    for label, handle in [("128×128", handles[0]), ("224×224", model_224())]:
        image = cell_inputs(handle, 1, args.seed)
        defaults = {"generations": 8, "population": 16} if args.quick else {}
        run = timed_search(handle, image, defaults, args.seed)
        timing.append({"input": label, "model": handle.name,
                       "params": "quick" if args.quick else "defaults",
                       "seconds_to_map": run["seconds"],
                       "forward_passes": run["forward_passes"],
                       "generations_run": run["generations_run"]})

    print(f"DE-CAM, {images} images, params {params}, seed {args.seed}\n")
    print(table([{k: fmt(v) for k, v in row.items()}
                 for comparison in comparisons for row in comparison["rows"]]))
    for comparison in comparisons:
        print(f"{comparison['model']}: one-candidate-per-call / batched wall time "
              f"{comparison['speedup_vs_one_candidate_per_call']:.1f}× (target >= 10×); "
              f"lock-step gain {comparison['speedup_lockstep_vs_per_image']:.2f}×; "
              f"ceiling for any batching (ORT per image at batch 2 / large batch) "
              f"{comparison['batching_ceiling']:.2f}×; ours / compute floor "
              f"{comparison['batched_over_floor']:.2f}; "
              f"|fitness gap| {comparison['fitness_gap']:.2e}, "
              f"max |map gap| {comparison['map_gap']:.2e}")
    print()
    print(table([{k: fmt(v) for k, v in row.items()} for row in timing]))
    path = write_json("decam", {
        "quick": args.quick, "images": images, "params": params, "seed": args.seed,
        "comparisons": comparisons, "time_to_map": timing,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
