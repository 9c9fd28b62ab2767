"""SMOE Scale maths on numpy arrays: per-scale maps, their normalization and combination.

Mundhenk, Chen & Friedland, "Efficient Saliency Maps for Explainable AI"
(https://arxiv.org/abs/1911.11293). Each scale's post-ReLU activation x (C channels, plus
1e-7 so the log is finite) gives the SMOE Scale map μ · (log₂ μ − mean_c log₂ x) with
μ = mean_c x: high where few channels fire strongly. Each map is squashed into [0, 1] by a
Gaussian CDF of its z-score (or a Gamma CDF with maximum-likelihood shape/scale), upsampled
bilinearly to the input and averaged with per-scale weights.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import special

from saliency_service.methods._utils.resize import upsample

EPSILON = 1e-7
NORMALIZATIONS = ("gaussian_cdf", "gamma_cdf")
# The paper's per-layer weights for ResNet-50's five scales (stem ReLU, layer1..layer4),
# an example of the ``weights`` parameter; the default is equal weights.
PAPER_RESNET50_WEIGHTS = (0.18, 0.15, 0.37, 0.40, 0.72)
_NEWTON_STEPS = 10
_TORCH_NDTR_FROM = 4096  # values; see standard_normal_cdf


def smoe_scale(activations: np.ndarray) -> np.ndarray:
    """SMOE Scale of N×C×h×w activations over channels → float32 N×h×w (ReLU applied first).

    Written as few passes over the activations as possible (sums, in-place operations): on
    small networks this loop, not the forward pass, bounds the fast path. The ReLU copy is
    OpenCV's threshold, one SIMD pass, rather than ``np.maximum`` with a scalar.
    """
    n, c, h, w = activations.shape
    flat = np.ascontiguousarray(activations, np.float32).reshape(n * c, h * w)
    x = cv2.threshold(flat, 0.0, 0.0, cv2.THRESH_TOZERO)[1].reshape(n, c, h, w)
    x += np.float32(EPSILON)
    inverse_channels = np.float32(1.0 / x.shape[1])
    mean = x.sum(axis=1)
    mean *= inverse_channels
    mean_log = np.log2(x, out=x).sum(axis=1)  # x is a private copy: reuse it
    mean_log *= inverse_channels
    out = np.log2(mean)
    out -= mean_log
    out *= mean
    return out


def gaussian_cdf_normalize(maps: np.ndarray) -> np.ndarray:
    """Φ of each N×h×w map's z-score (mean and unbiased std per map); a flat map → 0.5.

    OpenCV's ``meanStdDev`` takes both moments in one float64-accumulating pass, half the
    time of numpy's mean and sum of squares on the fast path's small maps.
    """
    maps = np.ascontiguousarray(maps, np.float32)  # read only; OpenCV wants contiguous rows
    z = np.empty(maps.shape, np.float32)
    count = maps[0].size
    unbiased = math.sqrt(count / max(count - 1, 1))
    for index, single in enumerate(maps):
        mean, std = cv2.meanStdDev(single)
        spread = float(std[0, 0]) * unbiased
        np.subtract(single, np.float32(mean[0, 0]), out=z[index])
        z[index] *= np.float32(1.0 / spread if spread > 0 else 0.0)  # z = 0 for a flat map
    return standard_normal_cdf(z)


def standard_normal_cdf(z: np.ndarray) -> np.ndarray:
    """Φ(z) for float32 z. From a few thousand values on, torch's vectorized ``ndtr`` beats
    scipy's (below that its call overhead loses); scipy serves where torch is not
    installed."""
    if z.size < _TORCH_NDTR_FROM:
        return special.ndtr(z)
    try:
        import torch  # noqa: PLC0415 - optional here: the handler itself runs on ONNX Runtime
    except ImportError:
        return special.ndtr(z)
    return torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(z))).numpy()


def gamma_fit(values: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood Gamma shape k and scale θ of positive values (Choi & Wette 1969).

    Solves log k − ψ(k) = s with s = log mean − mean log by Newton's method from the
    closed-form start (3 − s + √((s − 3)² + 24 s)) / 12 s; θ = mean / k.
    """
    mean = float(values.mean())
    s = math.log(mean) - float(np.log(values).mean())
    if not (s > 1e-12 and math.isfinite(s)):
        return math.inf, 0.0
    k = (3.0 - s + math.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
    for _ in range(_NEWTON_STEPS):
        step = (math.log(k) - float(special.digamma(k)) - s) / (1.0 / k - float(
            special.polygamma(1, k)))
        k = max(k - step, k / 10.0)  # stay positive
    return k, mean / k


def gamma_cdf_normalize(maps: np.ndarray) -> np.ndarray:
    """Gamma CDF of each N×h×w map shifted to start just above 0, with fitted shape/scale.

    A flat map (no spread to fit) → 0.5, as the Gaussian normalization gives.
    """
    out = np.empty(maps.shape, np.float32)
    for index, single in enumerate(maps.astype(np.float64)):
        shifted = single - single.min() + EPSILON
        shape, scale = gamma_fit(shifted.ravel())
        if not math.isfinite(shape) or scale <= 0:
            out[index] = 0.5
        else:
            out[index] = special.gammainc(shape, shifted / scale)
    return out


def normalize(maps: np.ndarray, method: str) -> np.ndarray:
    if method == "gamma_cdf":
        return gamma_cdf_normalize(maps)
    return gaussian_cdf_normalize(maps)


def combine(layer_maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average Σ wᵢ Mᵢ / Σ wᵢ of N×S×H×W maps → N×H×W."""
    weights = np.asarray(weights, np.float64)
    total = np.zeros(layer_maps.shape[:1] + layer_maps.shape[2:], np.float32)
    for index, weight in enumerate(weights):
        if weight:
            total += np.float32(weight) * layer_maps[:, index]
    return total / np.float32(weights.sum())


def layer_maps(smoe_maps: list[np.ndarray], normalization: str, height: int,
               width: int) -> np.ndarray:
    """Per-scale SMOE maps (N×hᵢ×wᵢ) → normalized and upsampled N×S×H×W in [0, 1]."""
    return np.stack([upsample(normalize(m, normalization), height, width)
                     for m in smoe_maps], axis=1)


def combined_map(smoe_maps: list[np.ndarray], normalization: str, weights: np.ndarray,
                 height: int, width: int) -> np.ndarray:
    """``combine(layer_maps(...), weights)`` without the N×S×H×W stack: each scale is
    normalized at its own resolution, upsampled and accumulated in place."""
    weights = np.asarray(weights, np.float64)
    total: np.ndarray | None = None
    for smoe, weight in zip(smoe_maps, weights, strict=True):
        if weight:
            layer = upsample(normalize(smoe, normalization), height, width)
            if weight != 1.0:  # equal weights (the default) skip the multiplications
                layer *= np.float32(weight)
            if total is None:
                total = layer
            else:
                total += layer
    if total is None:
        raise ValueError(f"weights must not all be zero, got {weights.tolist()}")
    total *= np.float32(1.0 / weights.sum())
    return total
