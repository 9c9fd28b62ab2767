"""Integrated Gradients (Sundararajan et al., arXiv 1703.01365).

attribution = (x − x') ⊙ Σₖ wₖ ∂ logit / ∂ x (x' + αₖ (x − x')), with nodes αₖ and weights wₖ
of a quadrature rule on [0, 1]. The steps of every image run as chunked batched passes.
Completeness (Σ attribution = f(x) − f(x')) is checked and the largest gap over the batch is
reported as ``diagnostics["completeness_error"]`` (absolute, in logits), with
``completeness_error_relative`` = that gap over max |f(x) − f(x')|.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import param
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Attribution
from saliency_service.methods._utils.baselines import baseline_logits, make_baseline
from saliency_service.methods._utils.target_score import selected_scores
from saliency_service.methods._utils.torch_program import FAST, linear_stem, prepared_module
from saliency_service.methods.base import ENGINE_TORCH, Job
from saliency_service.methods.gradients import GradientHandler, summed_input_gradients
from saliency_service.methods.registry import register

RULES = ("gauss_legendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
IG_BASELINES = ("black", "blur", "uniform_noise", "mean", "zero")


@functools.lru_cache(maxsize=256)
def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α in [0, 1] and weights w (summing to 1) of ``rule`` with ``steps`` points,
    read-only and cached (Gauss–Legendre's nodes come from an eigenvalue solve).

    Riemann left/right/middle match Captum (weights 1/steps). The trapezoid rule here is the
    textbook one (nodes linspace(0, 1, steps), spacing 1/(steps − 1), halved end weights);
    Captum's ``riemann_trapezoid`` uses 1/steps spacing, so its weights sum to (steps − 1)/steps
    and its attributions are ours × (steps − 1)/steps.
    """
    nodes, weights = _quadrature(rule, steps)
    nodes.flags.writeable = weights.flags.writeable = False
    return nodes, weights


def _quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    if rule == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if rule == "riemann_trapezoid":
        nodes = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[0] /= 2
        weights[-1] /= 2
        return nodes, weights
    weights = np.full(steps, 1.0 / steps)
    if rule == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / steps, steps), weights
    if rule == "riemann_right":
        return np.linspace(1.0 / steps, 1.0, steps), weights
    if rule == "riemann_middle":
        return np.linspace(0.5 / steps, 1.0 - 0.5 / steps, steps), weights
    raise ValueError(f"unknown quadrature rule {rule!r}")


def target_logits(job: Job, inputs: np.ndarray) -> np.ndarray:
    """logit[target] of ``inputs`` by torch forward passes (no gradients), counted."""
    module = prepared_module(job.model, FAST)
    out = np.empty(inputs.shape[0], dtype=np.float64)
    targets = torch.from_numpy(job.targets.astype(np.int64)).view(-1, 1)
    for part in job.checked_chunks(inputs.shape[0], job.items_per_chunk(backward=True)):
        with torch.no_grad():
            outputs = module(torch.from_numpy(np.ascontiguousarray(inputs[part])))
        out[part] = selected_scores(job, outputs, targets[part]).double().numpy()
        job.cost.forward(part.stop - part.start, ENGINE_TORCH)
    return out


def integrated_gradients(
    job: Job, baseline: np.ndarray, steps: int, rule: str
) -> np.ndarray:
    """The IG attribution (N×C×H×W float32); rows are step-major like Captum's expansion.

    When the program starts with a convolution of the input alone, the path is walked in
    that convolution's output space: stem(x' + α(x − x')) = stem(x') + α·stem₀(x − x') costs
    two stem passes per image instead of one per step, and the weighted gradient sum goes
    back through the stem once per image (``python -m benchmarks.rewrites``).
    """
    nodes, weights = quadrature(rule, steps)
    inputs = torch.from_numpy(np.ascontiguousarray(job.inputs, dtype=np.float32))
    reference = torch.from_numpy(np.ascontiguousarray(baseline, dtype=np.float32))
    difference = inputs - reference
    targets = torch.from_numpy(job.targets.astype(np.int64))
    batch = inputs.shape[0]
    alphas = torch.tensor(nodes, dtype=torch.float32)
    stem = linear_stem(job.model)
    if stem is not None:
        with torch.no_grad():
            start, direction = stem(reference), stem(difference, with_bias=False)
    else:
        start, direction = reference, difference

    def make_rows(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(part.start, part.stop)
        step, image = rows // batch, rows % batch
        scaled = torch.empty((len(rows), *start.shape[1:]), dtype=torch.float32,
                             memory_format=torch.channels_last)
        for n in range(batch):  # the rows of image n: every batch-th, from ``first``
            first = (n - part.start) % batch
            if first >= len(rows):
                continue
            torch.addcmul(start[n : n + 1], alphas[step[first::batch]].view(-1, 1, 1, 1),
                          direction[n : n + 1], out=scaled[first::batch])
        return scaled, targets[image]

    rows = torch.arange(batch * steps)
    step_weights = torch.tensor(weights, dtype=torch.float64)
    mean_gradient = summed_input_gradients(job, make_rows, rows % batch, inputs.shape,
                                           step_weights[rows // batch], stem)
    return (mean_gradient * difference.double()).float().numpy()


@dataclass(frozen=True)
class IntegratedGradientsParams:
    """Quadrature points along the path, the baseline it starts from, and the rule."""

    steps: int = param(32, low=1, limit="max_steps")
    baseline: str = param("black", choices=IG_BASELINES)
    rule: str = param("gauss_legendre", choices=RULES)


@register
class IntegratedGradients(GradientHandler):
    """Integrated Gradients along the straight path from a baseline to the input.

    Map: |attribution| maxed over channels, divided by the image's maximum.
    Cost: steps forward + steps backward per image, plus 1 forward for f(baseline) (on
    ONNX Runtime when the prediction run gave f(x); none when the baseline is black or zero
    and f(baseline) is known from an earlier request to the loaded model).
    """

    name = "integrated_gradients"
    Params = IntegratedGradientsParams
    auto_rank = 5
    description = (
        "Path integral of gradients from a baseline (black/blur/uniform noise/mean); "
        "steps forward + steps backward + 1 forward (none for a known black/zero baseline), "
        "batched."
    )
    paper = "https://arxiv.org/abs/1703.01365"

    def check(self, job: Job) -> None:
        if job.params.rule == "riemann_trapezoid" and job.params.steps < 2:
            raise InvalidInput("integrated_gradients.steps must be >= 2 for the trapezoid "
                               f"rule, got {job.params.steps}")

    def repeats(self, model: ModelHandle) -> float:
        return float(IntegratedGradientsParams().steps)

    def _compute(self, job: Job) -> Attribution:
        params = job.params
        baseline = make_baseline(params.baseline, job.inputs, job.model.spec().input, job.rng(),
                                 job.state)
        attribution = integrated_gradients(job, baseline, params.steps, params.rule)
        if job.base_logits is not None:
            # f(x) came from the ONNX Runtime prediction run: f(x') from the same engine
            # (also cheaper than a torch forward pass).
            index = np.arange(job.batch)
            at_input = job.base_logits[index, job.targets].astype(np.float64)
            logits = baseline_logits(job, params.baseline, baseline)
            at_baseline = logits[index, job.targets].astype(np.float64)
        else:
            at_input = target_logits(job, job.inputs)
            at_baseline = target_logits(job, baseline)
        expected = at_input - at_baseline
        gap = np.abs(attribution.reshape(job.batch, -1).sum(axis=1, dtype=np.float64) - expected)
        return Attribution(raw=attribution, diagnostics={
            "completeness_error": float(gap.max()),
            "completeness_error_relative": float(
                gap.max() / max(float(np.abs(expected).max()), 1e-12)),
        })
