"""Perturbation baselines on ONNX Runtime only: occlusion and RISE.

These call nothing but the session's outputs, so they explain any ONNX model.
This module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from handlers.base import (
    ExplainJob,
    Handler,
    chunks,
    normalize_per_image,
    run_onnx_batched,
    scale_by_max,
    softmax,
)
from handlers.baselines import BASELINES, make_baseline
from handlers.registry import register
from handlers.resize import bilinear_matrix
from saliency.v1 import explainer_pb2 as pb
from service.errors import InvalidInput


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis, always including one flush with the far edge."""
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def target_probabilities(job: ExplainJob, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Softmax probability of each row's target class, via batched ONNX Runtime calls."""
    (logits,) = run_onnx_batched(job, batch)
    return softmax(logits)[np.arange(batch.shape[0]), targets]


def base_probabilities(job: ExplainJob) -> np.ndarray:
    """Target probabilities of the unperturbed inputs (reusing the prediction's logits)."""
    if job.base_logits is not None:
        return softmax(job.base_logits)[np.arange(job.batch), job.targets]
    return target_probabilities(job, job.inputs, job.targets)


@register
class Occlusion(Handler):
    """Zeiler & Fergus (arXiv 1311.2901): slide a window of baseline over the image; a pixel's
    attribution is the mean drop in target probability over the windows that cover it."""

    method = pb.METHOD_OCCLUSION
    name = "occlusion"
    params_field = "occlusion"
    defaults: ClassVar[dict[str, Any]] = {"window": 16, "stride": 8, "baseline": "black"}
    description = "Drop in target probability when a window is replaced by a baseline."
    paper = "https://arxiv.org/abs/1311.2901"

    def validate(self, params: dict, job: ExplainJob) -> None:
        height, width = job.inputs.shape[2:]
        self.require_positive(params, "window", limit=min(height, width))
        self.require_positive(params, "stride", limit=min(height, width))
        self.require_choice(params, "baseline", BASELINES)
        windows = len(window_starts(height, params["window"], params["stride"])) * len(
            window_starts(width, params["window"], params["stride"])
        )
        if windows > job.limits.max_samples * 16:
            raise InvalidInput(
                f"window={params['window']} stride={params['stride']} gives {windows} windows "
                f"per image; the limit is {job.limits.max_samples * 16}: use a larger stride"
            )

    def _compute(self, job: ExplainJob) -> np.ndarray:
        window, stride = job.params["window"], job.params["stride"]
        batch, _, height, width = job.inputs.shape
        baseline = make_baseline(job.params["baseline"], job.inputs, job.model.spec().input,
                                 job.rng())
        positions = [(y, x) for y in window_starts(height, window, stride)
                     for x in window_starts(width, window, stride)]
        base = base_probabilities(job)
        attribution = np.zeros((batch, height, width), np.float32)
        coverage = np.zeros((height, width), np.float32)
        for y, x in positions:
            coverage[y:y + window, x:x + window] += 1.0
        # Chunk over window positions so the perturbed copies stay within the memory budget.
        per_chunk = max(1, job.items_per_chunk() // batch)
        for start in range(0, len(positions), per_chunk):
            group = positions[start:start + per_chunk]
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

    def to_maps(self, raw: np.ndarray, job: ExplainJob) -> np.ndarray:
        """Only evidence for the class counts: negative drops clip to 0, then scale by max."""
        return scale_by_max(np.maximum(raw, 0.0))


def blend(inputs: np.ndarray, baseline: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``inputs`` where ``keep`` is 1, ``baseline`` where it is 0 (keep: K×H×W or K×1×H×W)."""
    if keep.ndim == 3:
        keep = keep[:, None]
    return (baseline + keep * (inputs - baseline)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class RiseMasks:
    """The random part of RISE, drawn once per request so chunking never changes it."""

    grids: np.ndarray  # float32 M×s×s binary cells
    shifts: np.ndarray  # int64 M×2 (dy, dx) offsets into the upsampled grid
    cell: tuple[int, int]  # upsampled cell size (ch, cw)


def draw_rise_masks(rng: np.random.Generator, masks: int, cells: int,
                    keep_probability: float, height: int, width: int) -> RiseMasks:
    """Binary ``cells × cells`` grids kept with ``keep_probability`` and random shifts."""
    grids = (rng.random((masks, cells, cells)) < keep_probability).astype(np.float32)
    cell = (int(np.ceil(height / cells)), int(np.ceil(width / cells)))
    shifts = np.stack([rng.integers(0, cell[0], masks), rng.integers(0, cell[1], masks)], axis=1)
    return RiseMasks(grids, shifts.astype(np.int64), cell)


def render_rise_masks(drawn: RiseMasks, part: slice, height: int, width: int) -> np.ndarray:
    """Masks ``part`` as float32 K×H×W: each grid upsampled bilinearly to (s+1)·cell and
    cropped at its shift (Petsiuk et al., Sec. 3.2)."""
    cells = drawn.grids.shape[1]
    rows = bilinear_matrix(cells, (cells + 1) * drawn.cell[0])
    cols = bilinear_matrix(cells, (cells + 1) * drawn.cell[1])
    shifts = drawn.shifts[part]
    row_index = shifts[:, 0:1] + np.arange(height)[None]  # K×H
    col_index = shifts[:, 1:2] + np.arange(width)[None]  # K×W
    return np.einsum("khs,kst,kwt->khw", rows[row_index], drawn.grids[part], cols[col_index],
                     optimize=True).astype(np.float32)


@register
class Rise(Handler):
    """Petsiuk et al., RISE (arXiv 1806.07421): the saliency of a pixel is the expected target
    probability over random masks that keep it, ``S = Σ_i p(I ⊙ M_i) M_i / (N · p_keep)``.

    Masked-out pixels become 0 in model-input space (the normalization mean), as in the
    authors' code where masks multiply the normalized tensor. The masks are shared by every
    item of the batch; each chunk of masks × items is one ONNX Runtime call.
    """

    method = pb.METHOD_RISE
    name = "rise"
    params_field = "rise"
    defaults: ClassVar[dict[str, Any]] = {"masks": 1000, "cells": 7, "keep_probability": 0.5}
    description = "Expected target probability over random upsampled binary masks."
    paper = "https://arxiv.org/abs/1806.07421"

    def validate(self, params: dict, job: ExplainJob) -> None:
        height, width = job.inputs.shape[2:]
        self.require_positive(params, "masks", limit=job.limits.max_samples * 40)
        self.require_positive(params, "cells", limit=min(height, width))
        value = params["keep_probability"]
        if not (np.isfinite(value) and 0.0 < value < 1.0):
            raise InvalidInput(f"keep_probability must be in (0, 1), got {value}")

    def _compute(self, job: ExplainJob) -> np.ndarray:
        masks, cells = job.params["masks"], job.params["cells"]
        keep = float(job.params["keep_probability"])
        batch, _, height, width = job.inputs.shape
        drawn = draw_rise_masks(job.rng(), masks, cells, keep, height, width)
        saliency = np.zeros((batch, height, width), np.float64)
        per_chunk = max(1, job.items_per_chunk() // batch)
        for part in chunks(masks, per_chunk):
            rendered = render_rise_masks(drawn, part, height, width)  # K×H×W
            # K×N×C×H×W: every mask on every item; the zero baseline makes blending a product.
            perturbed = job.inputs[None] * rendered[:, None, None]
            flat = perturbed.reshape(-1, *job.inputs.shape[1:])
            probabilities = target_probabilities(
                job, flat, np.tile(job.targets, rendered.shape[0])
            ).reshape(rendered.shape[0], batch)
            saliency += np.einsum("kn,khw->nhw", probabilities, rendered)
        return (saliency / (masks * keep)).astype(np.float32)

    def to_maps(self, raw: np.ndarray, job: ExplainJob) -> np.ndarray:
        """The expectation is positive everywhere; min-max per image shows where it peaks."""
        return normalize_per_image(raw)
