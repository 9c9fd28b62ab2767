"""Perturbation baselines on ONNX Runtime only: occlusion (and RISE).

These call nothing but the session's outputs, so they explain any ONNX model.
This module must not import torch.
"""

from __future__ import annotations

import numpy as np

from handlers.base import ExplainJob, Handler, run_onnx_batched, scale_by_max, softmax
from handlers.baselines import BASELINES, make_baseline
from handlers.registry import register
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
    defaults = {"window": 16, "stride": 8, "baseline": "black"}
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
        return attribution / coverage[None]

    def to_maps(self, raw: np.ndarray, job: ExplainJob) -> np.ndarray:
        """Only evidence for the class counts: negative drops clip to 0, then scale by max."""
        return scale_by_max(np.maximum(raw, 0.0))
