"""Perturbation baselines on ONNX Runtime only: occlusion and RISE.

These call nothing but the session's outputs, so they explain any ONNX model.
This module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from saliency_service.core.errors import InvalidInput, OverLimit
from saliency_service.core.outputs import target_probabilities as probabilities_of
from saliency_service.core.params import param
from saliency_service.core.repository import ModelHandle
from saliency_service.methods._utils.baselines import BASELINES, make_baseline
from saliency_service.methods._utils.resize import bilinear_taps
from saliency_service.methods.base import (
    Handler,
    Job,
    normalize_per_image,
    run_onnx_batched,
    scale_by_max,
)
from saliency_service.methods.registry import register


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis, always including one flush with the far edge."""
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def window_coverage(starts: list[int], window: int, length: int) -> np.ndarray:
    """How many windows cover each position along one axis; a pixel's count over the grid
    of windows is the product of its row's and its column's."""
    counts = np.zeros(length, np.float64)
    for start in starts:
        counts[start:start + window] += 1.0
    return counts


def target_probabilities(job: Job, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Probability of each row's target class (from the model's scores, whatever their
    kind: ``saliency_service.core.outputs``), via batched ONNX Runtime calls."""
    (scores,) = run_onnx_batched(job, batch)
    return probabilities_of(scores, job.model.spec().output_kind, targets)


def base_probabilities(job: Job) -> np.ndarray:
    """Target probabilities of the unperturbed inputs (reusing the prediction's scores)."""
    if job.base_logits is not None:
        return probabilities_of(job.base_logits, job.model.spec().output_kind, job.targets)
    return target_probabilities(job, job.inputs, job.targets)


@dataclass(frozen=True)
class OcclusionParams:
    """The occluding window's side, its stride and what replaces the pixels under it."""

    window: int = param(16, low=1)
    stride: int = param(8, low=1)
    baseline: str = param("black", choices=BASELINES)


def window_count(height: int, width: int, window: int, stride: int) -> int:
    """Window positions per image."""
    return len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))


@register
class Occlusion(Handler):
    """Zeiler & Fergus (arXiv 1311.2901): slide a window of baseline over the image; a pixel's
    attribution is the mean drop in target probability over the windows that cover it."""

    name = "occlusion"
    Params = OcclusionParams
    warm_up_overrides: ClassVar[dict[str, Any]] = {"stride": 16}
    auto_rank = 4
    description = "Drop in target probability when a window is replaced by a baseline."
    paper = "https://arxiv.org/abs/1311.2901"

    def check(self, job: Job) -> None:
        height, width = job.inputs.shape[2:]
        window, stride = job.params.window, job.params.stride
        for name, value in (("window", window), ("stride", stride)):
            if value > min(height, width):
                raise InvalidInput(f"occlusion.{name}={value} exceeds the input size "
                                   f"{height}×{width}")
        windows = window_count(height, width, window, stride)
        limit = job.limits.get("max_windows")
        if limit is not None and windows > limit:
            raise OverLimit(
                f"occlusion window={window} stride={stride} gives {windows} windows per "
                f"image, over the server limit max_windows={limit:g} (--max-windows): use a "
                "larger stride or window")

    def repeats(self, model: ModelHandle) -> float:
        spec, defaults = model.spec().input, OcclusionParams()
        return float(window_count(spec.height, spec.width, defaults.window, defaults.stride))

    def _compute(self, job: Job) -> np.ndarray:
        window, stride = job.params.window, job.params.stride
        batch, _, height, width = job.inputs.shape
        baseline = make_baseline(job.params.baseline, job.inputs, job.model.spec().input,
                                 job.rng(), job.state)
        rows, columns = window_starts(height, window, stride), window_starts(width, window, stride)
        positions = [(y, x) for y in rows for x in columns]
        base = base_probabilities(job)
        attribution = np.zeros((batch, height, width), np.float32)
        coverage = np.outer(window_coverage(rows, window, height),
                            window_coverage(columns, window, width)).astype(np.float32)
        # A unit is one window position on every item, with its perturbed copies.
        for part in job.unit_chunks(len(positions), rows_each=batch,
                                    unit_bytes=job.inputs.nbytes):
            group = positions[part]
            perturbed = np.repeat(job.inputs[None], len(group), axis=0)  # P×N×C×H×W
            for index, (y, x) in enumerate(group):
                perturbed[index, :, :, y:y + window, x:x + window] = baseline[
                    :, :, y:y + window, x:x + window
                ]
            flat = perturbed.reshape(-1, *job.inputs.shape[1:])
            probabilities = target_probabilities(job, flat, np.tile(job.targets, len(group)))
            drops = base[None, :] - probabilities.reshape(len(group), batch)
            for index, (y, x) in enumerate(group):
                attribution[:, y:y + window, x:x + window] += drops[index][:, None, None]
        # A stride beyond the window leaves pixels no window covers: no evidence, 0.
        return np.divide(attribution, coverage[None], out=np.zeros_like(attribution),
                         where=coverage[None] > 0)

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        """Only evidence for the class counts: negative drops clip to 0, then scale by max."""
        return scale_by_max(np.maximum(raw, 0.0))


def blend(inputs: np.ndarray, baseline: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``inputs`` where ``keep`` is 1, ``baseline`` where it is 0 (keep: K×H×W or K×1×H×W)."""
    if keep.ndim == 3:
        keep = keep[:, None]
    return (baseline + keep * (inputs - baseline)).astype(np.float32, copy=False)


def rise_mask_bytes(cells: int, height: int, width: int) -> int:
    """Bytes ``RiseMasks.render`` holds per mask at most: the uniform draws (float64), the
    kept cells (bool, then float32), the two column taps (cells × W) and the two row taps
    (H × W, float32), one of which is the mask returned."""
    return 13 * cells * cells + 8 * cells * width + 8 * height * width


class RiseMasks:
    """The random part of RISE, addressable mask by mask so that each chunk draws only its own.

    The numbers are those of one draw from the request's generator: every grid (masks ×
    cells² uniforms, mask after mask), then the y shifts, then the x shifts. Only the shifts
    are drawn up front (16 bytes a mask); mask m's grid comes from a copy of the generator
    advanced past the m grids before it, so neither the chunk size nor the order of the
    chunks changes a mask.
    """

    def __init__(self, rng: np.random.Generator, masks: int, cells: int,
                 keep_probability: float, height: int, width: int) -> None:
        if not hasattr(rng.bit_generator, "advance"):
            raise TypeError(f"RISE needs a bit generator that can advance, not "
                            f"{type(rng.bit_generator).__name__}")
        self._kind = type(rng.bit_generator)
        self._state = rng.bit_generator.state
        self.masks, self.cells, self.keep_probability = masks, cells, keep_probability
        self.height, self.width = height, width
        self.cell = (int(np.ceil(height / cells)), int(np.ceil(width / cells)))
        after = self._stream(masks)
        self.shifts = np.stack([after.integers(0, self.cell[0], masks),
                                after.integers(0, self.cell[1], masks)], axis=1).astype(np.int64)

    def _stream(self, first: int) -> np.random.Generator:
        """The request's generator as it stands before mask ``first``'s grid."""
        bit_generator = self._kind()
        bit_generator.state = self._state
        bit_generator.advance(first * self.cells * self.cells)
        return np.random.Generator(bit_generator)

    def grids(self, part: slice) -> np.ndarray:
        """The binary ``cells × cells`` grids of masks ``part`` (float32 K×s×s)."""
        count = part.stop - part.start
        uniforms = self._stream(part.start).random((count, self.cells, self.cells))
        return (uniforms < self.keep_probability).astype(np.float32)

    def render(self, part: slice) -> np.ndarray:
        """Masks ``part`` as float32 K×H×W: each grid upsampled bilinearly to (s+1)·cell and
        cropped at its shift (Petsiuk et al., Sec. 3.2). Each output pixel blends its two
        taps along each axis, so a mask costs O(s·W + H·W), not a matrix product."""
        grids = self.grids(part)
        shifts = self.shifts[part]
        columns = _blend_taps(grids, 2, shifts[:, 1], self.cells,
                              (self.cells + 1) * self.cell[1], self.width)
        del grids
        return _blend_taps(columns, 1, shifts[:, 0], self.cells,
                           (self.cells + 1) * self.cell[0], self.height)


def _blend_taps(maps: np.ndarray, axis: int, shifts: np.ndarray, source: int, upsampled: int,
                length: int) -> np.ndarray:
    """Along ``axis`` of K maps: positions shift_k … shift_k + length − 1 of a bilinear
    upsampling from ``source`` to ``upsampled`` (float32)."""
    low, high, frac = bilinear_taps(source, upsampled)
    positions = shifts[:, None] + np.arange(length)[None]  # K×length
    shape = [len(maps), 1, 1]
    shape[axis] = length
    weight = frac[positions].astype(np.float32).reshape(shape)
    result = np.take_along_axis(maps, low[positions].reshape(shape), axis=axis)
    upper = np.take_along_axis(maps, high[positions].reshape(shape), axis=axis)
    upper -= result
    upper *= weight
    result += upper
    return result


@dataclass(frozen=True)
class RiseParams:
    """Random masks, their grid of cells per side and the chance a cell is kept."""

    masks: int = param(1000, low=1, limit="max_masks")
    cells: int = param(7, low=1)
    keep_probability: float = param(0.5, low=0.0, high=1.0, low_open=True, high_open=True)


@register
class Rise(Handler):
    """Petsiuk et al., RISE (arXiv 1806.07421): the saliency of a pixel is the expected target
    probability over random masks that keep it, ``S = Σ_i p(I ⊙ M_i) M_i / (N · p_keep)``.

    Masked-out pixels become 0 in model-input space (the normalization mean), as in the
    authors' code where masks multiply the normalized tensor. The masks are shared by every
    item of the batch; each chunk of masks × items is one ONNX Runtime call.
    """

    name = "rise"
    Params = RiseParams
    warm_up_overrides: ClassVar[dict[str, Any]] = {"masks": 64}
    description = "Expected target probability over random upsampled binary masks."
    paper = "https://arxiv.org/abs/1806.07421"

    def check(self, job: Job) -> None:
        height, width = job.inputs.shape[2:]
        if job.params.cells > min(height, width):
            raise InvalidInput(f"rise.cells={job.params.cells} exceeds the input size "
                               f"{height}×{width}")

    def repeats(self, model: ModelHandle) -> float:
        return float(RiseParams().masks)

    def _compute(self, job: Job) -> np.ndarray:
        masks, cells = job.params.masks, job.params.cells
        keep = float(job.params.keep_probability)
        batch, _, height, width = job.inputs.shape
        drawn = RiseMasks(job.rng(), masks, cells, keep, height, width)
        saliency = np.zeros((batch, height, width), np.float64)
        # A unit is one mask on every item: its rendering and its perturbed copies.
        unit_bytes = rise_mask_bytes(cells, height, width) + job.inputs.nbytes
        for part in job.unit_chunks(masks, rows_each=batch, unit_bytes=unit_bytes):
            rendered = drawn.render(part)  # K×H×W
            # K×N×C×H×W: every mask on every item; the zero baseline makes blending a product.
            perturbed = job.inputs[None] * rendered[:, None, None]
            flat = perturbed.reshape(-1, *job.inputs.shape[1:])
            probabilities = target_probabilities(
                job, flat, np.tile(job.targets, rendered.shape[0])
            ).reshape(rendered.shape[0], batch)
            # One mask after another in float64 (each product exact): the sums come out the
            # same however the masks were chunked.
            for mask, weights in zip(rendered, probabilities.astype(np.float64), strict=True):
                saliency += weights[:, None, None] * mask
        return (saliency / (masks * keep)).astype(np.float32)

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        """The expectation is positive everywhere; min-max per image shows where it peaks."""
        return normalize_per_image(raw)
