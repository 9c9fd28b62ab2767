"""Detections and segmentation regions as plain arrays: decoding, NMS, matching, target scores.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the model input, ends exclusive (a box covering
pixel columns 0…9 is ``x1 = 0, x2 = 10``). A raw YOLO-style grid head is N×(5 + K)×S×S per
image batch, channels ``objectness, tx, ty, tw, th, class logits…``; cell (row i, column j)
decodes to the centre ``((j + σ(tx))·stride, (i + σ(ty))·stride)``, the size
``(anchor·exp(tw), anchor·exp(th))``, the objectness ``σ(objectness)`` and the class
probabilities ``softmax(class logits)``. A detection's score is objectness × its class's
probability.

Target scores, the quantity a saliency method explains:
- a detection: D-RISE's similarity of a masked image's proposals to the target (Petsiuk et
  al., https://arxiv.org/abs/2006.03204): ``max_j IoU(L_t, L_j) · cos(P_t, P_j) · O_j``;
- a segmentation region: the class's logit summed over the region (Seg-Grad-CAM,
  Vinogradova et al., https://arxiv.org/abs/2002.11434).

Numpy only (no torch): the bottom layer the service and its clients share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saliency_service.core.errors import InvalidInput

MATCH_IOU = 0.5  # a client's box names the model's detection it overlaps at least this much


@dataclass(frozen=True)
class Detections:
    """One image's detections (or proposals), index-aligned."""

    boxes: np.ndarray  # float32 M×4
    scores: np.ndarray  # float32 M: objectness × the probability of ``classes``
    classes: np.ndarray  # int64 M
    objectness: np.ndarray  # float32 M
    class_probabilities: np.ndarray  # float32 M×K

    def __len__(self) -> int:
        return len(self.boxes)

    def take(self, indices: np.ndarray) -> Detections:
        """The detections at ``indices``, in that order."""
        return Detections(self.boxes[indices], self.scores[indices], self.classes[indices],
                          self.objectness[indices], self.class_probabilities[indices])


# ---- geometry --------------------------------------------------------------------------------


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``first`` (M×4) with every box of ``second``
    (K×4): M×K, 0 where a union is empty."""
    first = np.asarray(first, np.float64).reshape(-1, 4)
    second = np.asarray(second, np.float64).reshape(-1, 4)
    low = np.maximum(first[:, None, :2], second[None, :, :2])
    high = np.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = np.clip(high - low, 0.0, None).prod(axis=2)
    area_first = np.clip(first[:, 2:] - first[:, :2], 0.0, None).prod(axis=1)
    area_second = np.clip(second[:, 2:] - second[:, :2], 0.0, None).prod(axis=1)
    union = area_first[:, None] + area_second[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(union), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, highest score first. A box is dropped
    when a kept box of a higher score overlaps it by more than ``iou_threshold``; with
    ``classes``, only a box of the same class suppresses it."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    overlaps = box_iou(boxes, boxes)
    same = (np.ones((len(order),) * 2, bool) if classes is None
            else classes[:, None] == classes[None, :])
    kept: list[int] = []
    for index in order:
        if not any(overlaps[index, other] > iou_threshold and same[index, other]
                   for other in kept):
            kept.append(int(index))
    return np.asarray(kept, np.int64)


# ---- decoding --------------------------------------------------------------------------------


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))  # no overflow warning for large |values|


def _softmax(values: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def decode_grid(raw: np.ndarray, stride: float, anchor: float) -> list[Detections]:
    """Every cell of a raw grid head (N×(5 + K)×S×S) as a proposal, per image (S² each,
    row-major cells), unfiltered: what D-RISE compares to its target."""
    raw = np.asarray(raw, np.float64)
    if raw.ndim != 4 or raw.shape[1] < 6:
        raise InvalidInput(f"a raw grid head is N×(5 + classes)×rows×columns, not "
                           f"{'×'.join(map(str, raw.shape))}")
    batch, channels, rows, columns = raw.shape
    cell_y, cell_x = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    centre_x = (cell_x[None] + _sigmoid(raw[:, 1])) * stride
    centre_y = (cell_y[None] + _sigmoid(raw[:, 2])) * stride
    half_w = 0.5 * anchor * np.exp(np.clip(raw[:, 3], -10, 10))
    half_h = 0.5 * anchor * np.exp(np.clip(raw[:, 4], -10, 10))
    boxes = np.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w,
                      centre_y + half_h], axis=-1).reshape(batch, -1, 4)
    objectness = _sigmoid(raw[:, 0]).reshape(batch, -1)
    probabilities = _softmax(raw[:, 5:], axis=1).reshape(batch, channels - 5, -1)
    probabilities = probabilities.transpose(0, 2, 1)
    classes = probabilities.argmax(axis=2)
    scores = objectness * probabilities.max(axis=2)
    return [Detections(boxes[item].astype(np.float32), scores[item].astype(np.float32),
                       classes[item].astype(np.int64), objectness[item].astype(np.float32),
                       probabilities[item].astype(np.float32)) for item in range(batch)]


def select_indices(proposals: Detections, score_threshold: float, iou_threshold: float,
                   max_detections: int) -> np.ndarray:
    """Indices of the proposals a model reports: those scoring at least ``score_threshold``,
    after class-aware NMS, at most ``max_detections``, highest score first."""
    above = np.flatnonzero(proposals.scores >= score_threshold)
    candidates = proposals.take(above)
    kept = nms(candidates.boxes, candidates.scores, iou_threshold, candidates.classes)
    return above[kept[:max_detections]]


def select(proposals: Detections, score_threshold: float, iou_threshold: float,
           max_detections: int) -> Detections:
    """The detections a model reports (``select_indices``)."""
    return proposals.take(select_indices(proposals, score_threshold, iou_threshold,
                                         max_detections))


def from_post_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                  class_count: int) -> list[Detections]:
    """Detections from a model with NMS inside (boxes N×M×4, scores N×M, classes N×M),
    dropping padding rows (score ≤ 0 or class < 0). Such a model reports no class
    distribution: each detection's is one-hot and its objectness is its score (the D-RISE
    paper's reading of a detector without class probabilities)."""
    boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
    classes = np.asarray(classes).astype(np.int64)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.shape != boxes.shape[:2] \
            or classes.shape != boxes.shape[:2]:
        raise InvalidInput(f"post-NMS outputs are boxes N×M×4, scores N×M and classes N×M, "
                           f"not {boxes.shape}, {scores.shape} and {classes.shape}")
    if classes.size and classes.max() >= class_count:
        raise InvalidInput(f"the model reported class {int(classes.max())} but declares "
                           f"{class_count} classes: fix the package's class labels")
    result = []
    for item in range(len(boxes)):
        real = (scores[item] > 0) & (classes[item] >= 0)
        labels = classes[item][real]
        result.append(Detections(boxes[item][real], scores[item][real], labels,
                                 scores[item][real], one_hot(labels, class_count)))
    return result


def one_hot(classes: np.ndarray, class_count: int) -> np.ndarray:
    """float32 M×K rows with a 1 at each class."""
    vectors = np.zeros((len(classes), class_count), np.float32)
    vectors[np.arange(len(classes)), classes] = 1.0
    return vectors


# ---- a client's targets ----------------------------------------------------------------------


def check_box(box: Sequence[float] | np.ndarray, height: int, width: int) -> np.ndarray:
    """The client's box as float32 (x1, y1, x2, y2), refused unless it lies inside the
    ``height``×``width`` input with x1 < x2 and y1 < y2."""
    values = np.asarray(box, np.float64).ravel()
    shown = "[" + ", ".join(f"{v:g}" for v in values) + "]"
    if values.size != 4 or not np.isfinite(values).all():
        raise InvalidInput(f"a box is 4 finite numbers x1, y1, x2, y2 in input pixels, "
                           f"not {shown}")
    x1, y1, x2, y2 = values
    if not (x1 < x2 and y1 < y2):
        raise InvalidInput(f"box {shown} is empty: give x1 < x2 and y1 < y2 "
                           "(x1, y1 the top-left corner)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise InvalidInput(f"box {shown} lies outside the {height}×{width} model input: x "
                           f"must be within 0…{width} and y within 0…{height} (pixels of the "
                           "resized input, not of the original image)")
    return values.astype(np.float32)


def check_class(label: int | str, labels: Sequence[str]) -> int:
    """The class index of ``label`` (an index or a name), refused if the model lacks it."""
    names = ", ".join(f"{index} {name}" for index, name in enumerate(labels))
    if isinstance(label, str):
        if label in labels:
            return list(labels).index(label)
        raise InvalidInput(f"the model has no class {label!r}; its classes are {names}")
    if not 0 <= int(label) < len(labels):
        raise InvalidInput(f"class {int(label)} is not one of the model's {len(labels)} "
                           f"classes ({names})")
    return int(label)


def match_detection(detections: Detections, box: np.ndarray, label: int,
                    labels: Sequence[str], iou_threshold: float = MATCH_IOU) -> int:
    """Index of the detection of class ``label`` that overlaps ``box`` most, refused when
    none overlaps it by at least ``iou_threshold``."""
    overlaps = box_iou(box[None], detections.boxes)[0] if len(detections) else np.zeros(0)
    same = detections.classes == label
    if same.any() and overlaps[same].max() >= iou_threshold:
        return int(np.flatnonzero(same)[np.argmax(overlaps[same])])
    shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
    if not len(detections):
        found = "the model detects nothing in this image"
    else:
        best = int(np.argmax(overlaps))
        nearest = "[" + ", ".join(f"{v:.0f}" for v in detections.boxes[best]) + "]"
        found = (f"the nearest detection is {labels[int(detections.classes[best])]!r} at "
                 f"{nearest} (IoU {overlaps[best]:.2f})")
        if same.any():
            own = np.flatnonzero(same)[np.argmax(overlaps[same])]
            found += f"; the best {labels[label]!r} has IoU {overlaps[own]:.2f}"
    raise InvalidInput(f"no {labels[label]!r} detection overlaps box {shown} with IoU >= "
                       f"{iou_threshold:g}: {found}. Use a box and class from Predict's "
                       "detections")


def detections_above(detections: Detections, min_score: float) -> np.ndarray:
    """Indices of the detections scoring at least ``min_score`` (the target "every detection
    above a score"), refused when there are none."""
    chosen = np.flatnonzero(detections.scores >= min_score)
    if not len(chosen):
        best = (f"the best scores {detections.scores.max():.2f}" if len(detections)
                else "the model detects nothing in this image")
        raise InvalidInput(f"no detection scores at least {min_score:g} ({best}): lower the "
                           "minimum score")
    return chosen


def drise_similarity(target_box: np.ndarray, target_vector: np.ndarray,
                     proposals: Sequence[Detections]) -> np.ndarray:
    """D-RISE's weight of each masked image: the best similarity of its proposals to the
    target, ``max_j IoU(L_t, L_j) · cos(P_t, P_j) · O_j`` (0 with no proposals)."""
    target_vector = np.asarray(target_vector, np.float64)
    target_norm = np.linalg.norm(target_vector)
    weights = np.zeros(len(proposals), np.float64)
    for index, found in enumerate(proposals):
        if not len(found):
            continue
        overlaps = box_iou(target_box[None], found.boxes)[0]
        vectors = found.class_probabilities.astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1) * target_norm
        cosine = np.divide(vectors @ target_vector, norms, out=np.zeros(len(found)),
                           where=norms > 0)
        weights[index] = float((overlaps * cosine * found.objectness).max())
    return weights


# ---- segmentation regions --------------------------------------------------------------------


def region_from_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool H×W: the pixels whose centres lie inside ``box``."""
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    inside_y = (ys >= box[1]) & (ys < box[3])
    inside_x = (xs >= box[0]) & (xs < box[2])
    return inside_y[:, None] & inside_x[None, :]


def check_region(region: np.ndarray, height: int, width: int) -> np.ndarray:
    """The client's region mask as bool H×W, refused if its shape differs or it is empty."""
    region = np.asarray(region)
    if region.shape != (height, width):
        raise InvalidInput(f"a region mask is {height}×{width} (the model input), not "
                           f"{'×'.join(map(str, region.shape))}")
    region = region.astype(bool)
    if not region.any():
        raise InvalidInput("the region mask selects no pixel: mark the region with non-zero "
                           "values")
    return region


def predicted_region(logits: np.ndarray, label: int, labels: Sequence[str]) -> np.ndarray:
    """bool H×W: the pixels the model assigns to ``label`` (the default region), refused
    when there are none. ``logits`` is one image's K×H×W class scores."""
    region = np.asarray(logits).argmax(axis=0) == label
    if not region.any():
        raise InvalidInput(f"no pixel is predicted as {labels[label]!r} in this image: give a "
                           "region (a mask or a box) or choose a class the model predicts")
    return region


def segmentation_score(logits: np.ndarray, label: int, region: np.ndarray) -> np.ndarray:
    """Seg-Grad-CAM's target score per image: class ``label``'s logit summed over
    ``region`` (logits N×K×H×W, region bool H×W) → N."""
    logits = np.asarray(logits, np.float64)
    return (logits[:, label] * region[None]).sum(axis=(1, 2))
