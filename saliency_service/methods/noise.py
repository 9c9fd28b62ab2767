"""Noise-averaged gradients: SmoothGrad, VarGrad and Guided AbsoluteGrad.

Like Captum's ``NoiseTunnel`` this is a wrapper around the gradient pass, not a copy of it:
``noise_tunnel`` draws ``samples`` noisy copies of every image, runs them through
``methods.gradients.gradient_rows`` in memory-bounded chunks and keeps only running float64
sums (Σg, Σg², Σ|g|; SmoothGrad Σg alone) per image, so memory does not grow with the sample
count (each chunk's own sum is one float32 matrix product, as precise as Captum's float32
throughout).

Noise: σ = noise_level × (max(x) − min(x)) per image; row ``i·samples + s`` (image i, sample s,
Captum's order) gets ε ~ N(0, σ²) drawn from a torch Generator seeded with the request's seed,
one C×H×W draw per row in row order, so results are bit-for-bit reproducible and do not depend
on the chunk size. Default noise levels (SmoothGrad 0.05, VarGrad and Guided AbsoluteGrad 0.15)
are measured on the ground-truth models: ``benchmarks/results/groundtruth_noise.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import param
from saliency_service.core.repository import ModelHandle
from saliency_service.methods._utils.torch_program import FAST, linear_stem
from saliency_service.methods.base import Job, normalize_per_image, scale_by_max
from saliency_service.methods.gradients import (
    GradientHandler,
    gradient_rows,
    sum_rows_by_image,
    summed_input_gradients,
)
from saliency_service.methods.registry import register

# (row index, image index) → the noise ε (C×H×W) added to that image for that row.
NoiseSource = Callable[[int, int], torch.Tensor]


@dataclass
class NoiseStats:
    """Per-image sums over the noisy samples' gradients (float64, N×C×H×W each); the sums of
    squares and of absolute values are None when only the mean was asked for."""

    samples: int
    total: np.ndarray
    total_squares: np.ndarray | None
    total_abs: np.ndarray | None

    def mean(self) -> np.ndarray:
        return self.total / self.samples

    def variance(self, unbiased: bool = False) -> np.ndarray:
        """E[g²] − E[g]² (Captum's VarGrad) or, unbiased, the sample variance (ddof = 1)."""
        if self.total_squares is None:
            raise ValueError("the noise tunnel ran without gathering squares")
        centered = self.total_squares - self.total * self.total / self.samples
        denominator = self.samples - 1 if unbiased else self.samples
        return np.maximum(centered, 0.0) / max(denominator, 1)


def noise_sigmas(inputs: np.ndarray, noise_level: float) -> np.ndarray:
    """σ per image: noise_level × (max − min) of that image (Smilkov et al.'s convention)."""
    flat = inputs.reshape(inputs.shape[0], -1)
    return (noise_level * (flat.max(axis=1) - flat.min(axis=1))).astype(np.float32)


def seeded_noise(seed: int, shape: tuple[int, ...], sigmas: np.ndarray) -> NoiseSource:
    """ε for each row in row order from one Generator; rows must be asked for in order."""
    generator = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    expected = [0]

    def draw(row: int, image: int) -> torch.Tensor:
        if row != expected[0]:
            raise RuntimeError(
                f"noise rows must be drawn in order: got {row}, expected {expected[0]}"
            )
        expected[0] += 1
        return torch.randn(shape, generator=generator) * float(sigmas[image])

    return draw


def noise_tunnel(
    job: Job, samples: int, noise_level: float, noise: NoiseSource | None = None,
    spread: bool = True, variant: str = FAST,
) -> NoiseStats:
    """Sums of ∂ logit[target] / ∂ x over ``samples`` noisy copies of every image, through
    any gradient variant of the program (``FAST``: plain gradients; ``GUIDED``: Guided
    Backprop's).

    ``spread=False`` gathers Σg only. Σg is linear in the gradients, so when the program
    starts with a convolution of the input alone the backward passes stop at its output and
    their sum goes back through it once per image (``methods._utils.torch_program.LinearStem``).
    """
    inputs = torch.from_numpy(np.ascontiguousarray(job.inputs, dtype=np.float32))
    targets = torch.from_numpy(job.targets.astype(np.int64))
    batch = inputs.shape[0]
    if noise is None:
        noise = seeded_noise(
            job.seed, tuple(inputs.shape[1:]), noise_sigmas(job.inputs, noise_level)
        )
    shape = tuple(inputs.shape)
    stem = None if spread or variant != FAST else linear_stem(job.model)

    def make_rows(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = range(part.start, part.stop)
        images = [row // samples for row in rows]
        noisy = torch.stack(
            [inputs[image] + noise(row, image) for row, image in zip(rows, images, strict=True)]
        )
        if stem is not None:
            with torch.no_grad():
                noisy = stem(noisy)
        return noisy, targets[images]

    if not spread and variant == FAST:
        total = summed_input_gradients(job, make_rows, torch.arange(batch * samples) // samples,
                                       inputs.shape, stem=stem)
        return NoiseStats(samples, total.numpy(), None, None)
    stats = NoiseStats(samples, np.zeros(shape), np.zeros(shape), np.zeros(shape))

    def consume(part: slice, grad: torch.Tensor, _selected: torch.Tensor) -> None:
        images = torch.arange(part.start, part.stop) // samples
        # Float32 sums within a chunk, float64 across chunks; the tensors share memory with
        # the numpy sums.
        for total, values in ((stats.total, grad), (stats.total_squares, grad * grad),
                              (stats.total_abs, grad.abs())):
            torch.from_numpy(total).add_(sum_rows_by_image(values, images, batch))

    gradient_rows(job, batch * samples, make_rows, consume, variant)
    return stats


@dataclass(frozen=True)
class NoiseParams:
    """Noisy copies per image and their σ as a fraction of the input range."""

    samples: int = param(20, low=1, limit="max_samples")
    noise_level: float = param(0.15, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class GuidedAbsoluteGradParams(NoiseParams):
    """Noise parameters and the variance guide's quantile (0 = plain AbsoluteGrad)."""

    quantile: float = param(0.85, low=0.0, high=1.0)


@dataclass(frozen=True)
class SmoothGradParams(NoiseParams):
    """Noise parameters; σ 0.05 of the range puts more of the map on the deciding object."""

    noise_level: float = param(0.05, low=0.0, high=1.0, low_open=True)


class NoiseHandler(GradientHandler):
    """Shared sample count and noise level of the noise-tunnel methods."""

    Params = NoiseParams
    min_samples = 1

    def check(self, job: Job) -> None:
        if job.params.samples < self.min_samples:
            raise InvalidInput(
                f"{self.params_field}.samples must be >= {self.min_samples} for {self.name} "
                f"(it needs a variance), got {job.params.samples}"
            )

    def repeats(self, model: ModelHandle) -> float:
        return float(self.Params().samples)


@register
class SmoothGrad(NoiseHandler):
    """Smilkov et al. (arXiv 1706.03825): the mean gradient over noisy copies of the input.

    Map: |mean gradient| maxed over channels, divided by the image's maximum.
    """

    name = "smoothgrad"
    Params = SmoothGradParams
    description = (
        "Mean gradient over noisy copies (σ = noise_level × input range); "
        "samples forward + samples backward, batched."
    )
    paper = "https://arxiv.org/abs/1706.03825"

    def _compute(self, job: Job) -> np.ndarray:
        stats = noise_tunnel(job, job.params.samples, job.params.noise_level,
                             spread=False)
        return stats.mean().astype(np.float32)


@register
class VarGrad(NoiseHandler):
    """Adebayo et al. (arXiv 1810.03292): the variance E[g²] − E[g]² of the noisy gradients.

    Map: the variance summed over channels, divided by the image's maximum.
    """

    name = "vargrad"
    min_samples = 2
    description = (
        "Variance of the gradient over noisy copies; samples forward + samples backward, batched."
    )
    paper = "https://arxiv.org/abs/1810.03292"

    def _compute(self, job: Job) -> np.ndarray:
        stats = noise_tunnel(job, job.params.samples, job.params.noise_level)
        return stats.variance().astype(np.float32)

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        return scale_by_max(raw.sum(axis=1))


def guided_absolutegrad(stats: NoiseStats, quantile: float) -> np.ndarray:
    """M = Σᵢ |gᵢ| ⊙ Vₛ with the variance guide Vₛ (Huang & Liu, arXiv 2404.15564).

    V is the unbiased variance of the gradients; Q its ``quantile`` over H×W per image and
    channel (linear interpolation); Vₛ = 1 where V > Q, else V. ``quantile`` 0 gives Vₛ = 1
    (plain AbsoluteGrad), as in the authors' code.
    """
    if stats.total_abs is None:
        raise ValueError("the noise tunnel ran without gathering absolute values")
    if quantile <= 0:
        return stats.total_abs.astype(np.float32)
    variance = stats.variance(unbiased=True)
    batch, channels, height, width = variance.shape
    threshold = np.quantile(
        variance.reshape(batch, channels, height * width), quantile, axis=2
    ).reshape(batch, channels, 1, 1)
    guide = np.where(variance > threshold, 1.0, variance)
    return (stats.total_abs * guide).astype(np.float32)


@register
class GuidedAbsoluteGrad(NoiseHandler):
    """Huang & Liu (arXiv 2404.15564): absolute noisy gradients guided by their variance.

    σ = noise_level × (max − min) per image (the authors' code takes max/min over the batch
    it is given; per image, a map does not depend on what else is in the request).
    Map: |M| summed over channels, min-max normalized per image (the authors' last step).
    """

    name = "guided_absolutegrad"
    auto_rank = 7
    min_samples = 2
    Params = GuidedAbsoluteGradParams
    description = (
        "Σ|noisy gradients| × variance guide (quantile 0 = AbsoluteGrad); "
        "samples forward + samples backward, batched."
    )
    paper = "https://arxiv.org/abs/2404.15564"

    def _compute(self, job: Job) -> np.ndarray:
        stats = noise_tunnel(job, job.params.samples, job.params.noise_level)
        return guided_absolutegrad(stats, float(job.params.quantile))

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        return normalize_per_image(np.abs(raw).sum(axis=1))
