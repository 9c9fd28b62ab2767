"""Reference images ("what the model sees when evidence is removed"), in model-input space.

Shared by occlusion, RISE, DE-CAM and Integrated Gradients so that "black" means
the same thing everywhere: the bottom of the manifest's value range, normalized.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from saliency_service.core.repository import InputSpec
from saliency_service.core.request import RequestState
from saliency_service.methods.base import Job, run_onnx_batched

BASELINES = ("black", "blur", "uniform_noise", "mean", "zero")
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
