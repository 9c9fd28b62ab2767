"""Reference images ("what the model sees when evidence is removed"), in model-input space.

Shared by occlusion, RISE, DE-CAM and Integrated Gradients so that "black" means
the same thing everywhere: the bottom of the manifest's value range, normalized.

A blur keeps the colour of a large uniform object, so it cannot remove what decides a colour
class; ``desaturated_blur`` also drops the colour, and ``least_score_baseline`` picks, per
image, the candidate that lowers the target class's score most.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from saliency_service.core.outputs import target_probabilities
from saliency_service.core.repository import InputSpec
from saliency_service.core.request import RequestState
from saliency_service.methods.base import Job, run_onnx_batched

BASELINES = ("black", "blur", "uniform_noise", "mean", "zero", "desaturated_blur")
# What ``least_score_baseline`` chooses from: each removes a different kind of evidence
# (fine detail; detail and colour; everything but the image's average colour; everything).
LEAST_SCORE_CANDIDATES = ("blur", "desaturated_blur", "mean", "zero")
# The same image for every request to a model (of one input shape).
CONSTANT_BASELINES = ("black", "zero")

def make_baseline(
    kind: str, inputs: np.ndarray, spec: InputSpec, rng: np.random.Generator | None = None,
    state: RequestState | None = None,
) -> np.ndarray:
    """A baseline with the shape of ``inputs`` (N×C×H×W, normalized like the model input);
    ``state``, when given, is checked between the planes of a blur."""
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    low, high = spec.value_range
    if kind == "black":
        return np.broadcast_to((low - mean) / std, inputs.shape).astype(np.float32)
    if kind == "zero":
        # Zero in model-input space: Captum's default, the dataset mean for normalized inputs.
        return np.zeros_like(inputs, dtype=np.float32)
    if kind == "mean":
        return np.broadcast_to(inputs.mean(axis=(2, 3), keepdims=True), inputs.shape).astype(
            np.float32
        )
    if kind == "blur":
        return blurred(inputs, state)
    if kind == "desaturated_blur":
        return desaturated(blurred(inputs, state), mean, std)
    if kind == "uniform_noise":
        generator = rng if rng is not None else np.random.default_rng(0)
        raw = generator.uniform(low, high, size=inputs.shape).astype(np.float32)
        return ((raw - mean) / std).astype(np.float32)
    raise ValueError(f"unknown baseline {kind!r}; expected one of {list(BASELINES)}")


def blurred(inputs: np.ndarray, state: RequestState | None = None) -> np.ndarray:
    """Each H×W plane smoothed by a Gaussian of σ = max(H, W) / 16, edges extended.

    One plane at a time, checking ``state`` before each: the filter's cost grows with σ as
    well as with the pixels, so a batch of large images takes far longer than a chunk.
    """
    sigma = max(inputs.shape[2], inputs.shape[3]) / 16.0
    out = np.empty(inputs.shape, np.float32)
    for item, channel in np.ndindex(*inputs.shape[:2]):
        if state is not None:
            state.check()
        out[item, channel] = gaussian_filter(inputs[item, channel], sigma=sigma,
                                             mode="nearest")
    return out


def desaturated(inputs: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Each pixel's channels replaced by their average, in pixel space (before mean/std)."""
    pixels = inputs * std + mean
    gray = pixels.mean(axis=1, keepdims=True)
    return ((gray - mean) / std).astype(np.float32)


def least_score_baseline(
    job: Job, candidates: tuple[str, ...] = LEAST_SCORE_CANDIDATES,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the candidate baseline whose target-class probability is lowest: the one
    that removes most of what decides the class. Costs one forward pass per candidate and
    image. Returns the N×C×H×W baseline and each image's choice (an index of
    ``candidates``)."""
    spec = job.model.spec()
    made = np.stack([make_baseline(kind, job.inputs, spec.input, rng, job.state)
                     for kind in candidates])  # K×N×C×H×W
    count, batch = made.shape[:2]
    (scores,) = run_onnx_batched(job, made.reshape(count * batch, *made.shape[2:]))
    probabilities = target_probabilities(scores, spec.output_kind,
                                         np.tile(job.targets, count)).reshape(count, batch)
    choice = probabilities.argmin(axis=0)
    return made[choice, np.arange(batch)], choice


def baseline_logits(job: Job, kind: str, baseline: np.ndarray) -> np.ndarray:
    """f(baseline) on ONNX Runtime (N×classes). A constant baseline's logits are computed once
    per loaded session and input shape and then reused, costing no forward pass: Integrated
    Gradients needs them for every request only to report its completeness error."""
    if kind not in CONSTANT_BASELINES:
        return run_onnx_batched(job, baseline)[0]
    known: dict[tuple[Any, ...], np.ndarray] = job.model.derived("baseline_logits",
                                                                   lambda _: {})
    key = (kind, tuple(baseline.shape[1:]))
    row = known.get(key)
    if row is None:
        (logits,) = run_onnx_batched(job, baseline[:1])
        row = logits[0].copy()
        row.flags.writeable = False
        known[key] = row
    return np.broadcast_to(row, (baseline.shape[0], row.shape[0]))
