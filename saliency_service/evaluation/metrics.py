"""Scores for saliency maps: agreement with ground truth, and faithfulness to the model.

Every function takes a batch: maps are float N×H×W (any sign, any scale), ground truth is the
cell dataset's N×H×W heatmap in {0, 0.4, 0.9} or its boolean object mask, images are float
N×H×W×3 in [0, 1] at the maps' resolution. Each returns one value per image (NaN where a
metric is undefined, e.g. mask metrics on a blank image), so callers choose how to average.

Ground-truth metrics:
- five-band score, Tjoa & Guan, "Quantifying Explainability of Saliency Methods in Deep Neural
  Networks with a Synthetic Dataset" (https://arxiv.org/abs/2009.02899), with TP/FP/TN/FN as
  in the authors' ``FiveBandXAIMetric`` (ericotjo001/explainable_ai, xai_basic);
- pointing game (Zhang et al., https://arxiv.org/abs/1608.00507), relevance mass and relevance
  rank accuracy (Arras et al., https://arxiv.org/abs/2003.07258).

Faithfulness metrics (they run the model through ``OnnxClassifier``, in batches):
- RCAP, Huang & Liu, "Guided AbsoluteGrad" (https://arxiv.org/abs/2404.15564), as in the
  authors' ``rcap_eval.py`` (youyinnn/Guided-AbsoluteGrad) with the "hit rate × probability"
  score;
- deletion and insertion AUC (Petsiuk et al., RISE, https://arxiv.org/abs/1806.07421).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.ndimage import gaussian_filter

from saliency_service.core import devices
from saliency_service.core.outputs import LOGITS, probabilities
from saliency_service.core.outputs import (
    softmax as softmax,  # the metrics module has always offered it
)

FIVE_BAND_THRESHOLDS = (-0.7, -0.3, 0.3, 0.7)
SOFT_DELTA = 0.02
SOFT_STEPS = 11
RCAP_PERCENTILES = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
AUC_LEVELS = 10
INSERTION_BLUR_SIGMA = 5.0
_EPS = 1e-6  # the authors' epsilon in precision/recall/FPR denominators
_TIE_SEED = 20090289  # fixed: tie-breaking among equal saliency values is random but repeatable

Probabilities = Callable[[np.ndarray], np.ndarray]
"""float N×H×W×3 images in [0, 1] → N×classes softmax probabilities."""


# ---- ground truth -------------------------------------------------------------------------


def normalize_by_absmax(maps: np.ndarray) -> np.ndarray:
    """Divides each map by its max |h| (zero maps stay zero), giving values in [-1, 1]."""
    maps = np.asarray(maps, np.float64)
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(maps, scale, out=np.zeros_like(maps), where=scale > 0)


def stratify(values: np.ndarray, thresholds: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Five bands {-2, -1, 0, 1, 2}: x ≤ t0, t0 < x ≤ t1, t1 < x ≤ t2, t2 < x ≤ t3, x > t3."""
    edges = np.asarray(thresholds, np.float64)
    # searchsorted(side="left") counts thresholds strictly below x: x == t stays in the lower band.
    return np.searchsorted(edges, values, side="left").astype(np.int8) - 2


def five_band(maps: np.ndarray, heatmaps: np.ndarray,
              thresholds: tuple[float, ...] | np.ndarray = FIVE_BAND_THRESHOLDS,
              ) -> dict[str, np.ndarray]:
    """Five-band pixel accuracy, precision, recall and false-positive rate per image.

    The map is normalized by max |h| and banded with ``thresholds``; the ground truth always
    with the default thresholds (so 0.4 → band 1, 0.9 → band 2). A pixel is a true positive
    when both bands are non-zero and equal; a non-zero map band is a false positive when the
    truth is zero *or* a different non-zero band (the authors' "FP2").
    """
    h = stratify(normalize_by_absmax(maps), thresholds)
    h0 = stratify(np.asarray(heatmaps, np.float64), FIVE_BAND_THRESHOLDS)
    if h.shape != h0.shape:
        raise ValueError(f"maps {h.shape} and ground truth {h0.shape} differ in shape")
    axes = (1, 2)
    equal = h == h0
    predicted, actual = h != 0, h0 != 0
    tp = (predicted & actual & equal).sum(axes).astype(np.float64)
    fp = (predicted & ~(actual & equal)).sum(axes).astype(np.float64)
    tn = (~predicted & ~actual).sum(axes).astype(np.float64)
    fn = (~predicted & actual).sum(axes).astype(np.float64)
    return {
        "pixel_accuracy": equal.mean(axes),
        "precision": tp / (tp + fp + _EPS),
        "recall": tp / (tp + fn + _EPS),
        "fpr": fp / (fp + tn + _EPS),
    }


def soft_five_band(maps: np.ndarray, heatmaps: np.ndarray, delta: float = SOFT_DELTA,
                   steps: int = SOFT_STEPS) -> dict[str, np.ndarray]:
    """The soft five-band score: the map thresholds move ``delta`` toward 0 per step.

    Step 0 uses [-0.7, -0.3, 0.3, 0.7]; the default 11 steps end at [-0.5, -0.1, 0.1, 0.5].
    Returns ``<metric>_mean`` (μ, the mean over steps) and ``<metric>_best`` (u, every metric
    read at the step with the highest pixel accuracy, so the four values belong together).
    """
    thresholds = np.asarray(FIVE_BAND_THRESHOLDS, np.float64)
    per_step: list[dict[str, np.ndarray]] = []
    for step in range(steps):
        if step:
            thresholds = thresholds - np.sign(thresholds) * delta
        per_step.append(five_band(maps, heatmaps, thresholds))
    names = list(per_step[0])
    stacked = {name: np.stack([s[name] for s in per_step]) for name in names}  # steps × N
    best = np.argmax(stacked["pixel_accuracy"], axis=0)
    columns = np.arange(stacked["pixel_accuracy"].shape[1])
    out: dict[str, np.ndarray] = {}
    for name in names:
        out[f"{name}_mean"] = stacked[name].mean(axis=0)
        out[f"{name}_best"] = stacked[name][best, columns]
    return out


def _order(maps: np.ndarray) -> np.ndarray:
    """Pixel indices per image, most salient first; ties broken by a fixed random permutation.

    Sorting equal values by pixel index would favour the top-left corner (a constant map would
    "point" there); a seeded permutation treats tied pixels alike and stays reproducible.
    """
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    tie = np.random.default_rng(_TIE_SEED).permutation(flat.shape[1])
    return np.stack([np.lexsort((tie, -row)) for row in flat])


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """1 when the map's maximum lies on the object, else 0; NaN for an empty mask.

    When several pixels share the maximum (a flat map), the score is the fraction of them on the
    object: the expected hit of picking one at random.
    """
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    inside = np.asarray(masks, bool).reshape(len(masks), -1)
    top = flat >= flat.max(axis=1, keepdims=True)
    score = (top & inside).sum(axis=1) / top.sum(axis=1)
    return np.where(inside.any(axis=1), score, np.nan)


def relevance_mass(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of the (non-negative) relevance on the object.

    NaN for an empty mask (nothing to find), 0 for an all-zero map.
    """
    relevance = np.clip(np.asarray(maps, np.float64), 0.0, None).reshape(len(maps), -1)
    inside = np.asarray(masks, bool).reshape(len(masks), -1)
    total = relevance.sum(axis=1)
    mass = np.divide((relevance * inside).sum(axis=1), total, out=np.zeros_like(total),
                     where=total > 0)
    return np.where(inside.any(axis=1), mass, np.nan)


def relevance_rank(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Of the K most relevant pixels (K = object size), the share on the object; NaN if K = 0."""
    inside = np.asarray(masks, bool).reshape(len(masks), -1)
    order = _order(maps)
    sizes = inside.sum(axis=1)
    ranked_inside = np.take_along_axis(inside, order, axis=1)
    hits = np.cumsum(ranked_inside, axis=1)
    rows = np.arange(len(order))
    score = hits[rows, np.maximum(sizes - 1, 0)] / np.maximum(sizes, 1)
    return np.where(sizes > 0, score, np.nan)


# ---- the model ----------------------------------------------------------------------------


@dataclass
class OnnxClassifier:
    """A model package's ONNX Runtime session as ``images in [0, 1] → probabilities``.

    Preprocesses exactly as the server does (value range, then mean/std) and runs in batches of
    ``batch_size`` images so the metrics' many perturbed copies never sit in memory at once.
    """

    session: ort.InferenceSession
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = (0.0, 1.0)
    input_name: str = "input"
    logits_output: str = "logits"
    output_kind: str = LOGITS  # saliency_service.core.outputs: what the class-score output holds
    batch_size: int = 32
    forward_passes: int = 0

    @classmethod
    def from_package(cls, path: Path, batch_size: int = 32,
                     intra_op_threads: int = 0) -> OnnxClassifier:
        """Loads ``path/model.onnx`` with the preprocessing named in ``path/manifest.json``."""
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        session = ort.InferenceSession(str(Path(path) / "model.onnx"), options,
                                       providers=devices.session_providers())
        spec = manifest["input"]
        return cls(session=session, mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                   value_range=tuple(spec.get("value_range", (0.0, 1.0))),
                   input_name=spec.get("name", "input"),
                   logits_output=manifest.get("outputs", {}).get("logits", "logits"),
                   output_kind=manifest.get("outputs", {}).get("kind", LOGITS),
                   batch_size=batch_size)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        shape = self.session.get_inputs()[0].shape
        return int(shape[2]), int(shape[3])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        low, high = self.value_range
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        out = []
        for begin in range(0, len(images), self.batch_size):
            part = np.asarray(images[begin:begin + self.batch_size], np.float32)
            x = (part.transpose(0, 3, 1, 2) * (high - low) + low - mean) / std
            (scores,) = self.session.run([self.logits_output],
                                         {self.input_name: np.ascontiguousarray(x, np.float32)})
            self.forward_passes += len(part)
            out.append(probabilities(scores, self.output_kind))
        return np.concatenate(out)


def _target_probability(model: Probabilities, images: np.ndarray, targets: np.ndarray,
                        copies: int) -> np.ndarray:
    """Runs ``images`` (N·copies, grouped per image) and reads each image's target class."""
    probabilities = model(images).reshape(len(targets), copies, -1)
    return np.take_along_axis(probabilities, targets.reshape(-1, 1, 1), axis=2)[..., 0]


# ---- faithfulness -------------------------------------------------------------------------


def rcap(images: np.ndarray, maps: np.ndarray, targets: np.ndarray, model: Probabilities,
         percentiles: tuple[float, ...] = RCAP_PERCENTILES) -> np.ndarray:
    """RCAP per image: mean over levels k of hit_k · softmax(f(I_k))_target.

    Level k keeps the pixels with S > q_k and blacks out the rest, where q_k is the map's
    ``percentiles[k]`` order statistic (the sorted value at index ⌊n·p⌋ − 1, as the authors'
    ``get_quantiles`` takes it), so the levels keep the top 30 %, 25 %, …, 5 % of the pixels;
    hit_k = Σ_{S > q_k} S / Σ S.

    Ties: the comparison is strict, as in the authors' code, so pixels equal to q_k are not
    recovered. A map that is flat (or flat over its top 30 %) therefore recovers fewer pixels
    than the nominal share, down to none at all, and a constant or all-zero map scores exactly
    0: it ranks no pixel above another, so it explains nothing. (The authors' code instead
    lowers q_k to 0 whenever it equals 1, the maximum of their normalized maps; that would give
    a constant map of ones the whole image and a hit rate of 1, so it is not copied.) Negative
    values are clipped to 0 first (the service's maps are already in [0, 1]).
    """
    saliency = np.clip(np.asarray(maps, np.float64), 0.0, None)
    count = len(saliency)
    flat = saliency.reshape(count, -1)
    positions = [max(int(flat.shape[1] * p) - 1, 0) for p in percentiles]
    quantiles = np.sort(flat, axis=1)[:, positions]  # N × K
    keep = flat[:, None, :] > quantiles[:, :, None]  # N × K × pixels
    total = flat.sum(axis=1, keepdims=True)
    kept = (keep * flat[:, None, :]).sum(axis=2)
    hit = np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)
    levels = len(percentiles)
    recovered = (images[:, None] * keep.reshape(count, levels, *saliency.shape[1:], 1))
    probability = _target_probability(model, recovered.reshape(-1, *images.shape[1:]),
                                      np.asarray(targets), levels)
    return (hit * probability).mean(axis=1)


def _curve(images: np.ndarray, start: np.ndarray, finish: np.ndarray, maps: np.ndarray,
           targets: np.ndarray, model: Probabilities, levels: int) -> np.ndarray:
    """Target probability as pixels switch from ``start`` to ``finish``, most salient first.

    Returns N × (levels + 1): after 0, 1/levels, …, all of the pixels have switched.
    """
    count, height, width = maps.shape
    pixels = height * width
    order = _order(maps)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(pixels)[None].repeat(count, 0), axis=1)
    switched_counts = np.round(np.linspace(0, pixels, levels + 1)).astype(int)
    switched = rank[:, None, :] < switched_counts[None, :, None]  # N × (levels+1) × pixels
    mask = switched.reshape(count, levels + 1, height, width, 1)
    steps = np.where(mask, finish[:, None], start[:, None])
    return _target_probability(model, steps.reshape(-1, *images.shape[1:]),
                               np.asarray(targets), levels + 1)


def _auc(curve: np.ndarray) -> np.ndarray:
    """Trapezoid area under N curves sampled evenly on [0, 1]."""
    return (curve[:, 1:] + curve[:, :-1]).sum(axis=1) / (2 * (curve.shape[1] - 1))


def deletion_auc(images: np.ndarray, maps: np.ndarray, targets: np.ndarray,
                 model: Probabilities, levels: int = AUC_LEVELS) -> np.ndarray:
    """Area under the target probability as the most salient pixels turn black (lower = better)."""
    images = np.asarray(images, np.float32)
    return _auc(_curve(images, images, np.zeros_like(images), maps, targets, model, levels))


def insertion_auc(images: np.ndarray, maps: np.ndarray, targets: np.ndarray,
                  model: Probabilities, levels: int = AUC_LEVELS,
                  sigma: float = INSERTION_BLUR_SIGMA) -> np.ndarray:
    """Area under the target probability as the most salient pixels of the original replace a
    Gaussian-blurred copy (higher = better)."""
    images = np.asarray(images, np.float32)
    blurred = gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="nearest")
    return _auc(_curve(images, blurred, images, maps, targets, model, levels))


# ---- resolution ---------------------------------------------------------------------------


def resize_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of N×H×W ground truth (keeps heat levels and mask booleans)."""
    values = np.asarray(values)
    source_h, source_w = values.shape[1:3]
    if (source_h, source_w) == (height, width):
        return values
    rows = np.minimum(((np.arange(height) + 0.5) * source_h / height).astype(int), source_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * source_w / width).astype(int), source_w - 1)
    return values[:, rows][:, :, cols]
