"""D-RISE: black-box saliency for one detection of any detector (Petsiuk et al., "Black-box
Explanation of Object Detectors via Saliency Maps", https://arxiv.org/abs/2006.03204).

RISE's random masks (``methods.perturbation.RiseMasks``) are applied to the input; each
masked image's weight for a target is the similarity of the detector's proposals on it to the
target detection (``core.detections.drise_similarity``), and a target's map is
``S = Σ_i w_i M_i / (N · p_keep)``. All targets share the masks and the forward passes, so a
map per box costs one pass per mask however many boxes are explained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from saliency_service.core.detections import (
    Detections,
    decode_grid,
    drise_similarity,
    from_post_nms,
    one_hot,
)
from saliency_service.methods.perturbation import RiseMasks

DetectorForward = Callable[[np.ndarray], list[Detections]]
"""float32 K×C×H×W model inputs → each input's proposals."""


@dataclass(frozen=True)
class DetectionTarget:
    """What a map explains: a box (x1, y1, x2, y2 in input pixels) and a class vector (one-hot
    for a class, or a detection's class probabilities)."""

    box: np.ndarray
    vector: np.ndarray

    @classmethod
    def of(cls, box: np.ndarray, label: int, class_count: int) -> DetectionTarget:
        """The target of class ``label`` at ``box``."""
        return cls(np.asarray(box, np.float32), one_hot(np.array([label]), class_count)[0])


def drise(inputs: np.ndarray, targets: Sequence[DetectionTarget], forward: DetectorForward,
          rng: np.random.Generator, *, masks: int = 1000, cells: int = 8,
          keep_probability: float = 0.5, batch_size: int = 64) -> np.ndarray:
    """D-RISE maps of one input (float32 C×H×W, model-input space) for each of ``targets``:
    float32 T×H×W.

    Masked-out pixels become 0 in model-input space (the normalization mean), as in RISE.
    ``forward`` is called on chunks of at most ``batch_size`` masked inputs.
    """
    if not targets:
        raise ValueError("D-RISE needs at least one target")
    _, height, width = inputs.shape
    drawn = RiseMasks(rng, masks, cells, keep_probability, height, width)
    saliency = np.zeros((len(targets), height, width), np.float64)
    for start in range(0, masks, batch_size):
        rendered = drawn.render(slice(start, min(start + batch_size, masks)))  # K×H×W
        proposals = forward(inputs[None] * rendered[:, None])
        for index, target in enumerate(targets):
            weights = drise_similarity(target.box, target.vector, proposals)
            saliency[index] += np.tensordot(weights, rendered.astype(np.float64), axes=1)
    return (saliency / (masks * keep_probability)).astype(np.float32)


def to_maps(saliency: np.ndarray) -> np.ndarray:
    """Each map min-max scaled to [0, 1], as RISE's are served: every mask weighs a little,
    so the raw expectation sits on a positive floor that says nothing about the target."""
    flat = saliency.reshape(len(saliency), -1)
    low = flat.min(axis=1)[:, None, None]
    span = flat.max(axis=1)[:, None, None] - low
    return np.divide(saliency - low, span, out=np.zeros_like(saliency),
                     where=span > 0).astype(np.float32)


def grid_forward(run: Callable[[np.ndarray], np.ndarray], stride: float,
                 anchor: float) -> DetectorForward:
    """The proposals of a raw grid head: every cell, decoded (``core.detections``).
    ``run`` maps a batch of inputs to the head's N×(5 + K)×S×S output."""
    def forward(batch: np.ndarray) -> list[Detections]:
        return decode_grid(run(batch), stride, anchor)
    return forward


def post_nms_forward(run: Callable[[np.ndarray], Sequence[np.ndarray]],
                     class_count: int) -> DetectorForward:
    """The detections of a model with NMS inside: ``run`` maps a batch of inputs to
    (boxes N×M×4, scores N×M, classes N×M)."""
    def forward(batch: np.ndarray) -> list[Detections]:
        boxes, scores, classes = run(batch)
        return from_post_nms(boxes, scores, classes, class_count)
    return forward
