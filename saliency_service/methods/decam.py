"""DE-CAM: a class activation map found by Differential Evolution, using model outputs only.

Karatsiolis & Kamilaris, "A Model-agnostic Approach for Generating Saliency Maps to Explain
Inferred Decisions of Deep Learning Models" (https://arxiv.org/abs/2209.08906): query only the
model's output probabilities and let Differential Evolution search for the image regions that
drive the score of the target class; the best solution is the map. No gradients and no
internals, so any ONNX model can be explained, whatever framework made it.

Our formulation (the paper fixes the principle, not these details):

* A candidate is a mask on a coarse ``grid × grid`` lattice (default 8, at most 32), values in
  [0, 1], upsampled bilinearly to the input size (``M``).
* With ``x`` the input, ``b`` a baseline and
  ``p(·)`` the probability of the target class (``core.outputs``), the fitness to maximize is::

      preservation_weight · p(M·x + (1−M)·b) / p(x)
    + deletion_weight     · (p(x) − p((1−M)·x + M·b)) / p(x)
    − sparsity            · mean(mask)

  Keeping the masked region should keep the score, removing it should destroy the score, and
  the mask should be small. Dividing by ``p(x)`` puts every image on the same scale, so one
  ``sparsity`` suits confident and unconfident predictions alike.
* The baseline (``methods._utils.baselines``): by default ``least_score``, per image the one
  of blur, desaturated blur, the image's mean colour and the dataset mean that lowers the
  target probability most (4 passes per image). A blur alone keeps the colour of a large
  uniform object, so on a colour-decided class it removed nothing and the map was empty
  (``benchmarks/groundtruth.py``).
* Standard DE, best/1/bin (default) or rand/1/bin with weight ``mutation`` (F) and binomial
  ``crossover`` (CR), deferred updating (the whole generation is evaluated at once),
  bounce-back into [0, 1] for mutants that leave it, a trial replacing its parent when it is
  at least as fit.
  ``patience`` generations without improvement of any image's best stop the search early.
* The map (``aggregate``) reads every mask the search evaluated against its fitness without
  the sparsity term (a penalty that steers the search, not evidence about the model):
  ``regression`` (default) is the ridge regression of that fitness on the mask's cells, per
  stage; ``covariance`` the covariance of each cell with it (RISE's estimator, on the
  samples DE steers toward the evidence). DE's samples are correlated (the population
  converges), so a cell that travels with the object takes its covariance; the regression
  divides that out and pointed at the object more often on the ground-truth benchmark.
  ``best`` is the paper's choice, the fittest mask itself. Since upsampling is linear, the
  sums are kept on each stage's grid and upsampled once.
* Within a cell (``spread``): a mask value moves pixel p by M·(x_p − b_p), so a pixel the
  baseline equals cannot carry the cell's effect however the mask is set. ``changed_pixels``
  (default) shares each cell's coefficient among its pixels in proportion to how far the
  perturbation moves them (‖x_p − b_p‖ over channels, plus a tenth of the image's mean so
  that a cell the baseline barely touches spreads nearly evenly), keeping the cell's total;
  a cell whose pixels all move alike gets the plain bilinear map. ``bilinear`` spreads it
  evenly. The search's evidence stays at the grid's resolution, and on an object smaller
  than a cell the map no longer peaks on the background beside it
  (``benchmarks/groundtruth_defaults.py decam``). A map whose positive part covers
  less than one cell (nothing, or a point) is replaced by the best mask
  (``diagnostics["best_mask_fallbacks"]``).
* ``max_forward_passes`` caps what one image may cost, the prediction included (Cost counts
  every image's passes): the plan (``plan_search``) fits as many whole generations as the
  budget allows, drops coarse refinement stages when it cannot pay for their start
  populations, and spends the rest on a last generation that evaluates only the first
  candidates (the others keep their parents), so the search spends the budget exactly.
* ``refine`` (default on) runs coarse-to-fine stages (4 → 8 → … → grid, doubling), splitting
  the generations between stages; each stage starts from the previous stage's population
  upsampled. With it and ``sparsity`` 0.8 the maps put more of their mass on the object for
  about the same forward passes (``benchmarks/localization.py --variant-images 16``).

Why our own DE loop rather than ``scipy.optimize.differential_evolution(vectorized=True)``:
scipy runs one search per call, so a batch of N images would cost N times the ONNX Runtime
calls; here the N searches run in lock-step and one generation of the whole batch (both
fitness terms, N × population candidates) is a single memory-bounded ONNX Runtime call. The
loop also owns what a server needs between generations: the request's seed, deadline and
cancellation checks, streamed progress and a best-so-far answer for best-effort requests.

This module must not import torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from saliency_service.core.errors import DeadlineExceeded, InvalidInput
from saliency_service.core.outputs import target_probabilities
from saliency_service.core.params import param
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Attribution, ProgressUpdate
from saliency_service.methods._utils.baselines import (
    BASELINES,
    LEAST_SCORE_CANDIDATES,
    least_score_baseline,
    make_baseline,
)
from saliency_service.methods._utils.resize import upsample, upsample_bytes
from saliency_service.methods.base import (
    Handler,
    Job,
    chunks,
    run_onnx_batched,
    scale_by_max,
)
from saliency_service.methods.perturbation import base_probabilities
from saliency_service.methods.registry import register

MAX_GRID = 32
MIN_POPULATION = 4
STRATEGIES = ("best1bin", "rand1bin")
AGGREGATES = ("covariance", "regression", "best")
SPREADS = ("changed_pixels", "bilinear")
# ``changed_pixels`` adds this fraction of the image's mean change to every pixel's change, so
# a cell that barely changed spreads its value nearly evenly instead of onto a few pixels.
SPREAD_FLOOR = 0.1
# Ridge of the regression map, relative to the mean variance of the mask cells.
RIDGE = 0.1
# ``least_score``: per image, the baseline of LEAST_SCORE_CANDIDATES that lowers the target
# score most (one pass per candidate).
LEAST_SCORE = "least_score"
DECAM_BASELINES = (*BASELINES, LEAST_SCORE)
# How often (in generations) a progress update carries the current best maps.
MAPS_EVERY = 5
# Smallest improvement of a best fitness that resets the patience counter.
IMPROVEMENT = 1e-6


@dataclass(frozen=True)
class FitnessWeights:
    preservation: float
    deletion: float
    sparsity: float


class MaskFitness:
    """Evaluates masks of N images in lock-step: one ONNX Runtime call per generation."""

    def __init__(self, job: Job, baseline: np.ndarray, weights: FitnessWeights) -> None:
        self.job = job
        self.baseline = baseline
        self.weights = weights
        self.base = np.maximum(base_probabilities(job), 1e-6)  # N
        # keep = b + M·(x − b) and delete = x − M·(x − b): one product per candidate.
        self.difference = (job.inputs - baseline).astype(np.float32)
        self._buffer: np.ndarray | None = None
        # Bytes the search holds throughout (its population), kept out of the chunks' budget.
        self.reserved_bytes = 0

    @property
    def terms(self) -> int:
        """Forward passes per candidate (a zero-weighted term is not evaluated)."""
        return int(self.weights.preservation > 0) + int(self.weights.deletion > 0)

    def __call__(self, grids: np.ndarray) -> np.ndarray:
        """grids N×P×g×g in [0, 1] → fitness N×P (higher is better)."""
        job = self.job
        batch, population = grids.shape[:2]
        flat_grids = grids.reshape(batch * population, *grids.shape[2:])
        owner = np.repeat(np.arange(batch), population)  # the image each candidate explains
        probabilities = np.zeros((self.terms, batch * population))
        # A unit is one candidate: its upsampled mask and its keep and delete images.
        height, width = job.inputs.shape[2:]
        unit_bytes = (self.terms * job.inputs[0].nbytes
                      + upsample_bytes(grids.shape[2], grids.shape[3], height, width))
        for part in job.unit_chunks(batch * population, rows_each=self.terms,
                                    unit_bytes=unit_bytes, reserved_bytes=self.reserved_bytes):
            images = self._masked_images(flat_grids[part], owner[part])
            (scores,) = run_onnx_batched(job, images, chunk_items=images.shape[0])
            targets = np.tile(job.targets[owner[part]], self.terms)
            probabilities[:, part] = target_probabilities(
                scores, job.model.spec().output_kind, targets).reshape(self.terms, -1)
        base = self.base[owner]
        fitness = -self.weights.sparsity * flat_grids.reshape(batch * population, -1).mean(axis=1)
        row = 0
        if self.weights.preservation > 0:
            fitness += self.weights.preservation * probabilities[row] / base
            row += 1
        if self.weights.deletion > 0:
            fitness += self.weights.deletion * (base - probabilities[row]) / base
        return fitness.reshape(batch, population)

    def _masked_images(self, grids: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """The keep images (b + M·(x − b)) then the delete images (x − M·(x − b)) of K
        candidates, as one contiguous (terms·K)×C×H×W batch.

        Written in place into a buffer reused across generations, one image's candidates at a
        time (they are consecutive), so no per-candidate copy of x, b or x − b is gathered:
        these passes over memory, not the arithmetic, are what cost on a small model.
        """
        job = self.job
        height, width = job.inputs.shape[2:]
        count = grids.shape[0]
        shape = (self.terms, count, *job.inputs.shape[1:])
        size = int(np.prod(shape))
        if self._buffer is None or self._buffer.size < size:
            self._buffer = np.empty(size, np.float32)
        images = self._buffer[:size].reshape(shape)
        masks = upsample(grids, height, width)[:, None]  # K×1×H×W
        keep, delete = self.weights.preservation > 0, self.weights.deletion > 0
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        for start, stop in zip(starts, [*starts[1:], count], strict=True):
            item, rows = owner[start], slice(start, stop)
            kept = images[0, rows]
            np.multiply(masks[rows], self.difference[item], out=kept)  # M·(x − b)
            if delete:
                np.subtract(job.inputs[item], kept, out=images[-1, rows])
            if keep:
                kept += self.baseline[item]
        return images.reshape(-1, *job.inputs.shape[1:])


def interpolation_matrix(cells: int, pixels: int) -> np.ndarray:
    """pixels × cells: column c is ``upsample``'s image of a one-hot cell c along one axis
    (the resize is separable, so U(β) = R·β·Cᵀ for a cells_h × cells_w grid β)."""
    eye = np.eye(cells, dtype=np.float32)
    return cv2.resize(eye, (cells, pixels), interpolation=cv2.INTER_LINEAR)


def sandwich(left: np.ndarray, x: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left · x[k] · right for each of the N matrices of ``x`` (a×h, N×h×w, w×b → N×a×b),
    as two 2-D products (numpy's stacked matmul of a transposed operand takes a slow path)."""
    count, height, width = x.shape
    half = (x.reshape(count * height, width) @ right).reshape(count, height, -1)  # N×h×b
    half = np.ascontiguousarray(half.transpose(0, 2, 1)).reshape(-1, height)  # (N·b)×h
    return (half @ left.T).reshape(count, -1, left.shape[0]).transpose(0, 2, 1)


def spread_over_changed(grids: np.ndarray, change: np.ndarray,
                        floor: float = SPREAD_FLOOR) -> np.ndarray:
    """N×g×g cell coefficients β → N×H×W pixels: d ⊙ U(β ⊘ Uᵀd) · (H·W / g²), with d =
    ``change`` (N×H×W, ≥ 0) plus ``floor`` × its image's mean and U the bilinear
    upsampling. Each cell's coefficient goes to its pixels in proportion to their change,
    its total kept; a uniform d gives U(β)."""
    change = change + floor * change.mean(axis=(1, 2), keepdims=True)
    height, width = change.shape[1:]
    rows = interpolation_matrix(grids.shape[1], height)
    cols = interpolation_matrix(grids.shape[2], width)
    totals = sandwich(rows.T, change, cols)  # Uᵀd, N×g×g: the change per cell
    floor = 1e-6 * totals.mean(axis=(1, 2), keepdims=True) + 1e-12
    scale = height * width / (grids.shape[1] * grids.shape[2])
    per_change = grids / np.maximum(totals, floor) * scale
    return (change * sandwich(rows, per_change.astype(np.float32), cols.T)).astype(np.float32)


def donor_indices(rng: np.random.Generator, batch: int, population: int) -> np.ndarray:
    """N×P×3 indices of three distinct population members, none equal to the target i."""
    keys = rng.random((batch, population, population))
    keys[:, np.arange(population), np.arange(population)] = np.inf
    return np.argsort(keys, axis=2)[:, :, :3]


def generation_bytes(population: int, dims: int) -> int:
    """Bytes ``de_generation`` holds per image while it works on a block of images: the
    donor keys and their order (P² each) and about eight P×D float64 temporaries."""
    return 16 * population * population + 64 * population * dims


def search_bytes(batch: int, population: int, dims: int) -> int:
    """Bytes a DE search holds throughout: the population and the trial population
    (float64) and the crossover choices (bool), N×P×D each."""
    return 17 * batch * population * dims


def de_generation(rng: np.random.Generator, population: np.ndarray, fitness: np.ndarray,
                  mutation: float, crossover: float, strategy: str,
                  block: int | None = None) -> np.ndarray:
    """One DE/x/1/bin trial population for N lock-stepped searches (N×P×D in [0, 1]).

    The temporaries exist for ``block`` images at a time (all N by default). Each kind of
    random number is drawn block after block in image order, so the trial population does
    not depend on ``block``.
    """
    batch, size, dims = population.shape
    parts = list(chunks(batch, block or batch))
    donors = np.concatenate([donor_indices(rng, part.stop - part.start, size)
                             for part in parts])
    trial = np.empty(population.shape, np.float64)
    for part in parts:
        members, count = population[part], part.stop - part.start
        pick = np.arange(count)[:, None]
        r0, r1, r2 = (members[pick, donors[part, :, k]] for k in range(3))
        if strategy == "best1bin":
            base = members[np.arange(count), fitness[part].argmax(axis=1)][:, None]
        else:
            base = r0
        mutant = base + mutation * (r1 - r2)
        del r0, r1, r2
        # Bounce-back: a coordinate that leaves [0, 1] lands between its base and the bound it
        # crossed. Plain clipping piles coordinates onto the bound, where r1 − r2 = 0 freezes
        # them.
        bounce = rng.random((count, size, dims))
        base_full = np.broadcast_to(base, mutant.shape)
        mutant = np.where(mutant < 0.0, base_full * bounce, mutant)
        trial[part] = np.where(mutant > 1.0, base_full + bounce * (1.0 - base_full), mutant)
    cross = np.empty((batch, size, dims), bool)
    for part in parts:
        np.less(rng.random((part.stop - part.start, size, dims)), crossover, out=cross[part])
    forced = rng.integers(0, dims, (batch, size))
    cross[np.arange(batch)[:, None], np.arange(size)[None], forced] = True
    np.copyto(trial, population, where=~cross)
    return trial


def refine_stages(grid: int, refine: bool) -> list[int]:
    """Grid sides of the coarse-to-fine stages: 4 → 8 → … → grid (just ``grid`` otherwise)."""
    if not refine or grid <= 4:
        return [grid]
    stages = [4]
    while stages[-1] * 2 < grid:
        stages.append(stages[-1] * 2)
    return [*stages, grid]


def split_generations(generations: int, stages: int) -> list[int]:
    """Generations per stage, the remainder going to the finest stages."""
    base, extra = divmod(generations, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


# Forward passes per image outside the search: the prediction (or the base probabilities).
PREDICTION_PASSES = 1


@dataclass(frozen=True)
class SearchPlan:
    """Stages, whole generations per stage, and the candidates per image of one last partial
    generation (``tail``, 0 = none); ``budget_bound`` when the pass budget cut the plan."""

    stages: tuple[int, ...]
    generations: tuple[int, ...]
    tail: int = 0
    budget_bound: bool = False

    @property
    def steps(self) -> int:
        return sum(self.generations) + (1 if self.tail else 0)


def min_forward_passes(population: int, terms: int) -> int:
    """The smallest pass budget per image: the prediction and one start population."""
    return PREDICTION_PASSES + population * terms


def search_baseline(job: Job, rng: np.random.Generator) -> np.ndarray:
    """The reference image the search removes evidence towards (N×C×H×W): the named
    baseline, or per image the ``least_score`` choice."""
    if job.params.baseline == LEAST_SCORE:
        return least_score_baseline(job, rng=rng)[0]
    return make_baseline(job.params.baseline, job.inputs, job.model.spec().input, rng,
                         job.state)


def baseline_passes(baseline: str) -> int:
    """Forward passes per image that choosing the baseline costs (``least_score``: one per
    candidate)."""
    return len(LEAST_SCORE_CANDIDATES) if baseline == LEAST_SCORE else 0


def plan_search(grid: int, refine: bool, generations: int, population: int, terms: int,
                budget: int = 0) -> SearchPlan:
    """What the search runs so that one image costs at most ``budget`` forward passes (0 =
    ``generations`` whole generations, no budget). Each stage first evaluates its start
    population; a stage is worth having only with at least one generation after it, so the
    coarsest stages go first when the budget is short."""
    stages = refine_stages(grid, refine)
    if budget <= 0:
        return SearchPlan(tuple(stages), tuple(split_generations(generations, len(stages))))
    unit = population * terms  # passes per image of one whole evaluation of the population
    spend = budget - PREDICTION_PASSES
    evaluations = spend // unit
    if evaluations < 1:
        raise ValueError(f"budget {budget} is below {min_forward_passes(population, terms)}")
    while len(stages) > 1 and evaluations < 2 * len(stages):
        stages = stages[1:]
    whole = min(generations, evaluations - len(stages))
    tail = 0
    if whole < generations:
        tail = (spend - (len(stages) + whole) * unit) // terms
    return SearchPlan(tuple(stages), tuple(split_generations(whole, len(stages))), tail,
                      budget_bound=whole < generations)


@dataclass(frozen=True)
class DecamParams:
    """The search: mask grid, DE population and generations, DE rates, fitness weights."""

    grid: int = param(8, low=2, high=MAX_GRID)
    population: int = param(32, low=MIN_POPULATION, limit="max_population")
    generations: int = param(30, low=1, limit="max_generations")
    mutation: float = param(0.6, low=0.0, high=2.0, low_open=True)
    crossover: float = param(0.7, low=0.0, high=1.0)
    sparsity: float = param(0.8, low=0.0, high=100.0)
    deletion_weight: float = param(1.0, low=0.0, high=100.0)
    preservation_weight: float = param(1.0, low=0.0, high=100.0)
    baseline: str = param(LEAST_SCORE, choices=DECAM_BASELINES)
    strategy: str = param("best1bin", choices=STRATEGIES)
    refine: bool = param(True)
    patience: int = param(8, low=0)
    max_forward_passes: int = param(0, low=0)
    aggregate: str = param("regression", choices=AGGREGATES)
    spread: str = param("changed_pixels", choices=SPREADS)


@register
class Decam(Handler):
    """DE-CAM (https://arxiv.org/abs/2209.08906): Differential Evolution over coarse masks,
    fitness from ONNX Runtime probabilities only; the best mask is the map."""

    name = "decam"
    auto_rank = 1  # second to Guided Grad-CAM on the object, passes the sanity checks
    Params = DecamParams
    warm_up_overrides: ClassVar[dict[str, Any]] = {"population": 8, "generations": 1}
    description = ("Differential Evolution searches coarse masks that keep/remove the target "
                   "class score (output-only, gradient-free).")
    paper = "https://arxiv.org/abs/2209.08906"

    def check(self, job: Job) -> None:
        params = job.params
        height, width = job.inputs.shape[2:]
        if params.grid > min(height, width):
            raise InvalidInput(f"decam.grid={params.grid} exceeds the input size "
                               f"{height}×{width}")
        dims = params.grid * params.grid
        held = (search_bytes(job.batch, params.population, dims)
                + generation_bytes(params.population, dims))
        if params.aggregate == "regression":  # Σ mask·maskᵀ per image, float64
            held += 8 * job.batch * dims * dims
        if held > job.chunk_memory_bytes:
            raise InvalidInput(
                f"population={params.population} with grid={params.grid} on {job.batch} "
                f"image(s) needs {held} bytes for the search, more than the chunk memory "
                f"budget of {job.chunk_memory_bytes} bytes (--chunk-memory-bytes): use a "
                "smaller population, grid or batch")
        if params.deletion_weight == 0 and params.preservation_weight == 0:
            raise InvalidInput("deletion_weight and preservation_weight are both 0: at least "
                               "one fitness term must query the model")
        budget = int(params.max_forward_passes)
        terms = int(params.preservation_weight > 0) + int(params.deletion_weight > 0)
        least = (min_forward_passes(int(params.population), terms)
                 + baseline_passes(str(params.baseline)))
        if 0 < budget < least:
            raise InvalidInput(
                f"decam.max_forward_passes={budget} is below the {least} passes per image "
                f"that the prediction, the baseline and one population of "
                f"{params.population} candidates × {terms} fitness term(s) need: raise it or "
                "lower decam.population")

    def repeats(self, model: ModelHandle) -> float:
        defaults = DecamParams()
        return float(defaults.population * defaults.generations)

    def _compute(self, job: Job) -> Attribution:
        return search_masks(job)

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        return scale_by_max(raw)


def search_masks(job: Job, fitness_class: type[MaskFitness] = MaskFitness) -> Attribution:
    """Runs the (optionally coarse-to-fine) DE search; returns the best masks (N×H×W) with
    the search's diagnostics.

    ``fitness_class`` lets a benchmark swap in another way of evaluating the same candidates.
    """
    params = job.params
    rng = job.rng()
    height, width = job.inputs.shape[2:]
    baseline = search_baseline(job, rng)
    fitness_of = fitness_class(job, baseline, FitnessWeights(
        preservation=float(params.preservation_weight),
        deletion=float(params.deletion_weight),
        sparsity=float(params.sparsity)))
    budget = int(params.max_forward_passes)
    if budget > 0:
        budget -= baseline_passes(str(params.baseline))
    plan = plan_search(int(params.grid), bool(params.refine), int(params.generations),
                       int(params.population), fitness_of.terms, budget)
    search = _Search(job, rng, fitness_of, plan.steps)
    population: np.ndarray | None = None
    for index, (grid, generations) in enumerate(zip(plan.stages, plan.generations,
                                                    strict=True)):
        last = index == len(plan.stages) - 1
        if population is None:
            population = rng.random((job.batch, int(params.population), grid, grid))
        else:  # seed the finer stage with the coarser stage's population
            coarse = population.reshape(-1, *population.shape[2:])
            population = np.clip(upsample(coarse, grid, grid), 0.0, 1.0).reshape(
                job.batch, -1, grid, grid)
        population = search.run(population, generations, plan.tail if last else 0)
        if search.stopped:
            break
    maps, fallbacks = search.map(height, width)
    diagnostics = search.diagnostics()
    if fallbacks:
        diagnostics["best_mask_fallbacks"] = float(fallbacks)
    if plan.budget_bound:
        diagnostics["budget_bound"] = 1.0
    return Attribution(raw=maps,
                       diagnostics=diagnostics,
                       truncated=search.truncated or plan.budget_bound)


class _Search:
    """The DE state of one request across refinement stages."""

    def __init__(self, job: Job, rng: np.random.Generator, fitness_of: MaskFitness,
                 total_steps: int) -> None:
        self.job = job
        self.rng = rng
        self.fitness_of = fitness_of
        params = job.params
        self.mutation = float(params.mutation)
        self.crossover = float(params.crossover)
        self.strategy = str(params.strategy)
        self.patience = int(params.patience)
        self.total_steps = total_steps
        self.step = 0
        self.stopped = False  # truncated by the deadline: no further stages
        self.truncated = False
        self.best: np.ndarray | None = None  # N×g×g
        self.best_fitness = np.full(job.batch, -np.inf)
        self.stale = 0
        self.generation_seconds = 0.0
        self.block = job.batch  # images per block of a generation's temporaries
        self.aggregate = str(params.aggregate)
        self.spread = str(params.spread)
        self._change: np.ndarray | None = None
        # Covariance map: per stage grid, Σ fitness·mask and Σ mask; per image Σ fitness, count.
        self.weighted: dict[tuple[int, ...], np.ndarray] = {}
        self.masks_sum: dict[tuple[int, ...], np.ndarray] = {}
        self.fitness_sum = np.zeros(job.batch)
        self.samples = 0
        # Regression map: per stage grid, Σ mask·maskᵀ, Σ evidence, and the sample count.
        self.gram: dict[tuple[int, ...], np.ndarray] = {}
        self.evidence_sum: dict[tuple[int, ...], np.ndarray] = {}
        self.stage_samples: dict[tuple[int, ...], int] = {}

    def _evaluate(self, candidates: np.ndarray) -> np.ndarray | None:
        """Fitness of N×P candidates, or None when a best-effort request ran out of time."""
        job = self.job
        try:
            fitness = self.fitness_of(candidates)
        except DeadlineExceeded:
            if job.best_effort and self.best is not None:
                return None
            raise
        self._accumulate(candidates, fitness)
        return fitness

    def _accumulate(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        """Adds N×K evaluated candidates to the covariance (or regression) map's sums."""
        if self.aggregate == "best":
            return
        shape = candidates.shape[2:]
        if shape not in self.weighted:
            self.weighted[shape] = np.zeros((candidates.shape[0], *shape))
            self.masks_sum[shape] = np.zeros((candidates.shape[0], *shape))
        # The model's part of the fitness: the sparsity penalty steers the search but is no
        # evidence, and its covariance with every pixel is negative, which pushed whole maps
        # below zero (all-zero after clipping) when the model terms were weak.
        sparsity = self.fitness_of.weights.sparsity
        evidence = fitness + sparsity * candidates.reshape(*fitness.shape, -1).mean(axis=2)
        self.weighted[shape] += np.einsum("nk,nkij->nij", evidence, candidates)
        self.masks_sum[shape] += candidates.sum(axis=1)
        self.fitness_sum += evidence.sum(axis=1)
        self.samples += candidates.shape[1]
        if self.aggregate == "regression":
            flat = candidates.reshape(*fitness.shape, -1)
            if shape not in self.gram:
                self.gram[shape] = np.zeros((fitness.shape[0], flat.shape[2], flat.shape[2]))
                self.evidence_sum[shape] = np.zeros(fitness.shape[0])
                self.stage_samples[shape] = 0
            self.gram[shape] += np.einsum("nki,nkj->nij", flat, flat)
            self.evidence_sum[shape] += evidence.sum(axis=1)
            self.stage_samples[shape] += candidates.shape[1]

    def _regression_grids(self, shape: tuple[int, ...]) -> np.ndarray:
        """Ridge regression of the evidence on the stage's mask cells (N×g×g coefficients):
        the covariance map with the correlation between cells divided out. DE's samples
        are far from independent (the population converges), so a cell that merely travels
        with the object's cells takes their covariance; the regression does not."""
        count = self.stage_samples[shape]
        mean_mask = self.masks_sum[shape].reshape(self.job.batch, -1) / count
        mean_evidence = self.evidence_sum[shape] / count
        covariance = self.gram[shape] / count - mean_mask[:, :, None] * mean_mask[:, None, :]
        cross = (self.weighted[shape].reshape(self.job.batch, -1) / count
                 - mean_mask * mean_evidence[:, None])
        dims = covariance.shape[1]
        ridge = RIDGE * np.trace(covariance, axis1=1, axis2=2) / dims + 1e-12
        system = covariance + ridge[:, None, None] * np.eye(dims)
        return np.linalg.solve(system, cross[:, :, None])[:, :, 0].reshape(
            self.job.batch, *shape)

    def map(self, height: int, width: int) -> tuple[np.ndarray, int]:
        """The raw N×H×W map (the covariance of mask and the model's fitness terms, or the
        best mask) and how many images fell back to their best mask.

        A covariance map is degenerate when its positive part covers less than one cell of
        the finest grid (nothing, or a point after clipping): the search found no region
        whose presence raises the fitness more than chance, and the fittest mask is the
        better answer. Judged on the cells' values spread evenly: an object smaller than a
        cell on a background the baseline leaves alone is a small map, not a failed search."""
        best = upsample(self.best_grids(), height, width)
        if self.aggregate == "best" or not self.samples:
            return best, 0
        mean = (self.fitness_sum / self.samples)[:, None, None]
        even = np.zeros((self.job.batch, height, width), np.float32)
        out = even if self.spread == "bilinear" else np.zeros_like(even)
        change = self.change() if self.spread == "changed_pixels" else None
        finest = 0
        for shape, weighted in self.weighted.items():
            if self.aggregate == "regression":
                grids = self._regression_grids(shape).astype(np.float32)
            else:
                grids = ((weighted - mean * self.masks_sum[shape])
                         / self.samples).astype(np.float32)
            even += upsample(grids, height, width)
            if change is not None:
                out += spread_over_changed(grids, change)
            finest = max(finest, shape[0] * shape[1])
        cell = height * width / max(finest, 1)
        support = (even > 0).reshape(self.job.batch, -1).sum(axis=1)
        degenerate = (support < cell) | (out.reshape(self.job.batch, -1).max(axis=1) <= 0)
        out[degenerate] = best[degenerate]
        return out, int(degenerate.sum())

    def change(self) -> np.ndarray:
        """How far the baseline moves each pixel: ‖x − b‖ over channels, N×H×W (computed
        once)."""
        if self._change is None:
            difference = self.fitness_of.difference
            self._change = np.sqrt(np.einsum("nchw,nchw->nhw", difference, difference))
        return self._change

    def _out_of_time(self) -> bool:
        """Best effort: stop when the next generation would not finish before the deadline."""
        state = self.job.state
        if not self.job.best_effort or state.deadline is None or self.best is None:
            return False
        # Room for one more generation (with slack for a noisy machine) and the reply.
        margin = max(0.1, 2.0 * self.generation_seconds)
        return time.monotonic() + margin >= state.deadline

    def _truncate(self) -> None:
        self.truncated = True
        self.stopped = True

    def run(self, population: np.ndarray, generations: int, tail: int = 0) -> np.ndarray:
        """Evolves N×P×g×g ``population`` for up to ``generations`` (in place once it is
        float64, like the trials), then, unless it converged, one generation in which only
        the first ``tail`` trials are evaluated; returns the last population."""
        job = self.job
        batch, size = population.shape[:2]
        shape = population.shape[2:]
        if self._out_of_time():
            self._truncate()
            return population
        dims = int(np.prod(shape))
        held = search_bytes(batch, size, dims)
        self.fitness_of.reserved_bytes = held
        self.block = job.units_per_chunk(rows_each=0, unit_bytes=generation_bytes(size, dims),
                                         reserved_bytes=held)
        job.state.check()
        fitness = self._evaluate(population)
        if fitness is None:
            self._truncate()
            return population
        self._track(population, fitness)
        vectors = population.reshape(batch, size, -1)
        evaluated = [size] * generations + ([tail] if tail else [])
        for count in evaluated:
            if self._out_of_time():
                self._truncate()
                break
            job.state.check()
            started = time.perf_counter()
            trial = de_generation(self.rng, vectors, fitness, self.mutation, self.crossover,
                                  self.strategy, self.block)
            trial_fitness = self._evaluate(trial.reshape(batch, size, *shape)[:, :count])
            if trial_fitness is None:
                self._truncate()
                break
            if count < size:  # a partial generation: the other members keep their parents
                trial_fitness = np.concatenate([trial_fitness, fitness[:, count:]], axis=1)
            better = trial_fitness >= fitness
            better[:, count:] = False
            if vectors.dtype == trial.dtype:
                np.copyto(vectors, trial, where=better[:, :, None])
            else:  # a refined stage starts float32; its trials are float64
                vectors = np.where(better[:, :, None], trial, vectors)
            del trial
            fitness = np.where(better, trial_fitness, fitness)
            self.generation_seconds = time.perf_counter() - started
            self.step += 1
            improved = self._track(vectors.reshape(batch, size, *shape), fitness)
            self._report()
            self.stale = 0 if improved else self.stale + 1
            if self.patience and self.stale >= self.patience:
                break  # this stage converged (no tail); a finer stage may still improve
        return vectors.reshape(batch, size, *shape)

    def _track(self, population: np.ndarray, fitness: np.ndarray) -> bool:
        """Updates the per-image best; True when any image's best improved."""
        leader = fitness.argmax(axis=1)
        leader_fitness = fitness[np.arange(fitness.shape[0]), leader]
        improved = leader_fitness > self.best_fitness + IMPROVEMENT
        if self.best is None or self.best.shape[1:] != population.shape[2:]:
            # A new refinement stage: its best replaces the coarser one.
            self.best = population[np.arange(fitness.shape[0]), leader].copy()
            self.best_fitness = leader_fitness.copy()
            return True
        self.best[improved] = population[np.arange(fitness.shape[0]), leader][improved]
        self.best_fitness = np.where(improved, leader_fitness, self.best_fitness)
        return bool(improved.any())

    def best_grids(self) -> np.ndarray:
        assert self.best is not None
        return self.best.astype(np.float32)

    def _report(self) -> None:
        job = self.job
        if job.on_progress is None:
            return
        maps = None
        if self.step % MAPS_EVERY == 0 or self.step == 1:
            height, width = job.inputs.shape[2:]
            maps = scale_by_max(self.map(height, width)[0])
        job.on_progress(ProgressUpdate(
            step=self.step, total_steps=self.total_steps,
            best_fitness=float(self.best_fitness.mean()),
            forward_passes=job.cost.forward_passes, maps=maps))

    def diagnostics(self) -> dict[str, float]:
        assert self.best is not None
        return {
            "best_fitness": float(self.best_fitness.mean()),
            "generations_run": float(self.step),
            "mask_mean": float(self.best.mean()),
        }
