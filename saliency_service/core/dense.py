"""Detectors and segmenters as the engine sees them: their outputs, their targets, and a view
that scores targets the way a classifier scores classes.

A manifest's ``outputs.kind`` says what the outputs are (``docs/detection.md``):
``detection_raw`` (one YOLO-style grid head, decoded and NMS'd here), ``detection`` (boxes,
scores and classes after NMS inside the graph) or ``segmentation`` (N×K×H×W class scores).
``TargetedModel`` wraps such a model so that, for every input, it returns each target's
score as a probability (a detection's D-RISE similarity, a region's mean class
probability): every black-box method (RISE, occlusion, DE-CAM) then explains a target as it
explains a class, one map per target, with no code of its own for detectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from saliency_service.core.detections import (
    Detections,
    box_iou,
    check_box,
    check_class,
    check_region,
    decode_grid,
    from_post_nms,
    match_detection,
    region_from_box,
    select,
)
from saliency_service.core.errors import InvalidInput
from saliency_service.core.outputs import LOGITS, OUTPUT_KINDS, PROBABILITIES, SIGMOID, softmax

DETECTION_RAW = "detection_raw"
DETECTION = "detection"
SEGMENTATION = "segmentation"
DENSE_KINDS = (DETECTION_RAW, DETECTION, SEGMENTATION)
DETECTORS = (DETECTION_RAW, DETECTION)
# ``derived`` keys that depend on a request's targets (the rest are the package's).
TARGET_KEYS = ("baseline_logits", "target_head")
MAX_TARGETS = 64  # maps one request may ask for (each is a full explanation's passes)


class InvalidDenseSpec(ValueError):
    """A manifest's detector or segmenter fields that cannot be served."""


@dataclass(frozen=True)
class DenseSpec:
    """What a detector's or segmenter's outputs are and how to read them."""

    kind: str
    outputs: tuple[str, ...]  # raw: (head,); detection: (boxes, scores, classes); seg: (scores,)
    # A segmenter's scores: ``logits`` (softmax over the classes), ``probabilities`` (a
    # softmax already applied) or ``sigmoid`` (each class's own probability, e.g. a text
    # detector's one-channel map: a pixel belongs to a class at probability >= 0.5).
    scores: str = LOGITS
    stride: float = 0.0
    anchor: float = 0.0
    score_threshold: float = 0.3
    nms_iou: float = 0.45
    max_detections: int = 100

    @classmethod
    def from_outputs(cls, kind: str, outputs: dict[str, Any]) -> DenseSpec:
        """The spec from a manifest's ``outputs`` object (``kind`` already checked)."""
        if kind == DETECTION:
            names = tuple(_name(outputs, key, key) for key in ("boxes", "scores", "classes"))
            return cls(kind, names)
        name = _name(outputs, "logits", "logits")
        if kind == SEGMENTATION:
            scores = outputs.get("scores", LOGITS)
            if scores not in OUTPUT_KINDS:
                raise InvalidDenseSpec(f"manifest outputs.scores must be one of "
                                       f"{', '.join(OUTPUT_KINDS)}, got {scores!r}")
            return cls(kind, (name,), scores=scores)
        grid = outputs.get("detection")
        if not isinstance(grid, dict):
            raise InvalidDenseSpec("manifest outputs.detection must be an object with the grid "
                                   "head's stride and anchor (pixels)")
        stride, anchor = _positive(grid, "stride"), _positive(grid, "anchor")
        threshold = _fraction(grid, "score_threshold", 0.3)
        nms_iou = _fraction(grid, "nms_iou", 0.45)
        most = grid.get("max_detections", 100)
        if not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= 10_000:
            raise InvalidDenseSpec(f"manifest outputs.detection.max_detections must be an "
                                   f"integer in 1…10000, got {most!r}")
        return cls(kind, (name,), stride=stride, anchor=anchor, score_threshold=threshold,
                   nms_iou=nms_iou, max_detections=most)


def _name(outputs: dict[str, Any], key: str, default: str) -> str:
    value = outputs.get(key, default)
    if not isinstance(value, str) or not value:
        raise InvalidDenseSpec(f"manifest outputs.{key} must name an ONNX output, got {value!r}")
    return value


def _positive(grid: dict[str, Any], key: str) -> float:
    value = grid.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not (
            math.isfinite(value) and value > 0):
        raise InvalidDenseSpec(f"manifest outputs.detection.{key} must be a number > 0 "
                               f"(pixels of the model input), got {value!r}")
    return float(value)


def _fraction(grid: dict[str, Any], key: str, default: float) -> float:
    value = grid.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise InvalidDenseSpec(f"manifest outputs.detection.{key} must be in [0, 1], "
                               f"got {value!r}")
    return float(value)


# ---- reading outputs -------------------------------------------------------------------------


def proposals(dense: DenseSpec, outputs: Sequence[np.ndarray],
              class_count: int) -> list[Detections]:
    """Every proposal of each input: a raw head's cells (before thresholds and NMS, as
    D-RISE reads them) or a post-NMS model's detections."""
    if dense.kind == DETECTION_RAW:
        head = np.asarray(outputs[0])
        if head.ndim != 4 or head.shape[1] != 5 + class_count:
            raise InvalidInput(f"the detector's head gives {list(head.shape)}; a grid head is "
                               f"N×(5 + {class_count} classes)×S×S: fix the package's class "
                               "labels or outputs")
        return decode_grid(head, dense.stride, dense.anchor)
    return from_post_nms(outputs[0], outputs[1], outputs[2], class_count)


def detections(dense: DenseSpec, outputs: Sequence[np.ndarray],
               class_count: int) -> list[Detections]:
    """The detections the model reports for each input, highest score first."""
    found = proposals(dense, outputs, class_count)
    if dense.kind == DETECTION_RAW:
        return [select(p, dense.score_threshold, dense.nms_iou, dense.max_detections)
                for p in found]
    return [p.take(np.argsort(-p.scores, kind="stable")) for p in found]


NO_CLASS = 255  # a sigmoid segmenter's pixel where no class reaches probability 0.5


def pixel_probabilities(dense: DenseSpec, scores: np.ndarray) -> np.ndarray:
    """A segmenter's N×K×H×W scores → each class's probability per pixel (float64, same
    shape): a softmax over the classes of logits; probabilities as they are."""
    scores = np.asarray(scores, np.float64)
    if dense.scores == LOGITS:
        return np.moveaxis(softmax(np.moveaxis(scores, 1, -1)), -1, 1)
    return scores


def class_map(dense: DenseSpec, scores: np.ndarray) -> np.ndarray:
    """A segmenter's N×K×H×W scores → uint8 N×H×W predicted classes (``NO_CLASS`` where a
    sigmoid segmenter's pixel belongs to no class)."""
    scores = np.asarray(scores)
    classes = scores.argmax(axis=1).astype(np.uint8)
    if dense.scores == SIGMOID:
        classes[scores.max(axis=1) < 0.5] = NO_CLASS
    return classes


def check_segmentation(scores: np.ndarray, class_count: int, height: int, width: int) -> None:
    """Refuses a segmenter's output that is not N×classes×H×W at the input's size."""
    if scores.ndim != 4 or scores.shape[1] != class_count or scores.shape[2:] != (height,
                                                                                 width):
        raise InvalidInput(f"the segmenter gives {list(scores.shape)}; a segmentation output "
                           f"is N×{class_count} classes×{height}×{width} (the input's size)")


# ---- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRequest:
    """What the client asked to explain on a detector or segmenter (plain values)."""

    kind: str = "predicted"  # predicted | detection | min_score | region | whole (warm-up)
    box: tuple[float, ...] | None = None
    label: int | str | None = None
    mask: np.ndarray | None = None
    min_score: float = 0.0


@dataclass(frozen=True)
class DenseTarget:
    """One map's target: the batch item, the class, the box (a detection's, or the region's
    bounding box), a detection's class vector or a region's mask, and its score on the
    unperturbed input."""

    item: int
    label: int
    box: np.ndarray
    score: float
    vector: np.ndarray | None = None
    region: np.ndarray | None = None


def resolve_targets(dense: DenseSpec, request: TargetRequest, outputs: Sequence[np.ndarray],
                    labels: Sequence[str], height: int, width: int) -> list[DenseTarget]:
    """The targets of every item, checked against what the model predicts on it."""
    if dense.kind == SEGMENTATION:
        scores = np.asarray(outputs[0])
        check_segmentation(scores, len(labels), height, width)
        targets = [t for item in range(len(scores))
                   for t in _region_targets(dense, request, scores[item], item, labels)]
    else:
        found = detections(dense, outputs, len(labels))
        targets = [t for item, each in enumerate(found)
                   for t in _detection_targets(request, each, item, labels, height, width)]
    if len(targets) > MAX_TARGETS:
        raise InvalidInput(f"the request names {len(targets)} targets; at most {MAX_TARGETS} "
                           "maps are computed per request: raise target.min_score or name "
                           "one detection")
    return targets


def _detection_targets(request: TargetRequest, found: Detections, item: int,
                       labels: Sequence[str], height: int, width: int) -> list[DenseTarget]:
    count = len(labels)
    if request.kind == "whole":
        label = check_class(request.label or 0, labels)
        vector = np.eye(count, dtype=np.float32)[label]
        return [DenseTarget(item, label, np.array([0, 0, width, height], np.float32), 0.0,
                            vector)]
    if request.kind == "detection":
        if request.box is None or request.label is None:
            raise InvalidInput("target.detection needs a box and a class (class_index or "
                               "label) from Predict's detections")
        box = check_box(request.box, height, width)
        label = check_class(request.label, labels)
        chosen = [match_detection(found, box, label, labels)]
    elif request.kind in ("predicted", "min_score"):
        chosen = [int(i) for i in np.flatnonzero(found.scores >= request.min_score)]
        if not chosen:
            best = f"; its best scores {found.scores.max():.2f}" if len(found) else ""
            raise InvalidInput(f"item {item}: the model reports no detection"
                               + (f" scoring at least {request.min_score:g}"
                                  if request.min_score else "")
                               + f"{best}. Lower target.min_score or give target.detection")
    else:
        raise InvalidInput(f"a detector's target is a detection, min_score or the default "
                           f"(every detection); {request.kind} is for classifiers or "
                           "segmenters")
    return [DenseTarget(item, int(found.classes[i]), found.boxes[i].astype(np.float32),
                        float(found.scores[i]), found.class_probabilities[i])
            for i in chosen]


def _region_targets(dense: DenseSpec, request: TargetRequest, scores: np.ndarray, item: int,
                    labels: Sequence[str]) -> list[DenseTarget]:
    height, width = scores.shape[1:]
    probabilities = np.moveaxis(pixel_probabilities(dense, scores[None])[0], 0, -1)  # H×W×K
    predicted = class_map(dense, scores[None])[0]
    if request.kind == "whole":
        labels_wanted = [check_class(request.label or 0, labels)]
        regions = [np.ones((height, width), bool)]
    elif request.kind == "region":
        if request.label is None:
            raise InvalidInput("target.region needs a class (class_index or label)")
        label = check_class(request.label, labels)
        labels_wanted = [label]
        if request.mask is not None:
            regions = [check_region(request.mask, height, width)]
        elif request.box is not None:
            regions = [region_from_box(check_box(request.box, height, width), height, width)]
        else:
            regions = [predicted == label]
            if not regions[0].any():
                raise InvalidInput(f"no pixel is predicted as {labels[label]!r} in this image: "
                                   "give a region (a mask or a box) or choose a class the "
                                   "model predicts")
    elif request.kind == "predicted":
        present = [int(c) for c in np.unique(predicted)
                   if c != NO_CLASS and labels[int(c)].lower() != "background"]
        if not present:
            raise InvalidInput(f"item {item}: the model predicts only background; give "
                               "target.region with a class")
        labels_wanted = present
        regions = [predicted == c for c in present]
    else:
        raise InvalidInput(f"a segmenter's target is a region or the default (every "
                           f"predicted class); {request.kind} is for classifiers or detectors")
    return [DenseTarget(item, label, _bounds(region),
                        float(probabilities[..., label][region].mean()), region=region)
            for label, region in zip(labels_wanted, regions, strict=True)]


def _bounds(region: np.ndarray) -> np.ndarray:
    rows, columns = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    return np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], np.float32)


def target_scores(dense: DenseSpec, outputs: Sequence[np.ndarray],
                  targets: Sequence[DenseTarget], class_count: int) -> np.ndarray:
    """N×T: each input's score for every target, in [0, 1]. A detection's is D-RISE's
    similarity of the input's proposals to it (IoU × class-vector cosine × objectness); a
    region's is its class's mean probability over the region."""
    if dense.kind == SEGMENTATION:
        probabilities = pixel_probabilities(dense, outputs[0])  # N×K×H×W
        columns = [probabilities[:, t.label][:, t.region].mean(axis=1) for t in targets]
    else:
        return similarities(proposals(dense, outputs, class_count), targets)
    return np.stack(columns, axis=1).astype(np.float32)


def similarities(found: Sequence[Detections], targets: Sequence[DenseTarget]) -> np.ndarray:
    """N×T: D-RISE's similarity of each input's proposals to every target at once (what
    ``core.detections.drise_similarity`` gives one target at a time)."""
    boxes = np.stack([t.box for t in targets]).astype(np.float64)  # T×4
    vectors = np.stack([t.vector for t in targets]).astype(np.float64)  # T×K
    norms = np.linalg.norm(vectors, axis=1)
    weights = np.zeros((len(found), len(targets)), np.float32)
    for row, each in enumerate(found):
        if not len(each):
            continue
        overlaps = box_iou(boxes, each.boxes)  # T×M
        theirs = each.class_probabilities.astype(np.float64)  # M×K
        scale = norms[:, None] * np.linalg.norm(theirs, axis=1)[None]
        cosine = np.divide(vectors @ theirs.T, scale, out=np.zeros_like(overlaps),
                           where=scale > 0)
        weights[row] = (overlaps * cosine * each.objectness[None]).max(axis=1)
    return weights


# ---- a detector or segmenter seen as a classifier of its targets ----------------------------


class TargetedModel:
    """A model handle whose ``run`` returns, for every input, each target's score (N×T
    probabilities): what the black-box methods read as class probabilities. One per request
    (its ``derived`` cache, e.g. a baseline's scores, holds this request's targets)."""

    def __init__(self, handle: Any, dense: DenseSpec, targets: Sequence[DenseTarget],
                 labels: Sequence[str],
                 on_shared: Callable[[int], None] | None = None) -> None:
        self.handle = handle
        # Several targets on one image: their perturbed copies repeat each other, so each
        # distinct input runs once (D-RISE's masks cost one pass however many boxes share
        # them); ``on_shared(rows)`` is told how many rows were not run.
        items = [t.item for t in targets]
        self.shares = len(set(items)) < len(items)
        self.on_shared = on_shared
        self.dense = dense
        self.targets = list(targets)
        self.class_count = len(labels)
        self._spec = dataclasses.replace(
            handle.spec(), output_kind=PROBABILITIES, logits_output="target_scores",
            class_labels=tuple(f"{labels[t.label]}@{t.item}" for t in targets))
        self._derived: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def spec(self) -> Any:
        return self._spec

    def run(self, inputs: np.ndarray, outputs: list[str] | None = None, state: Any = None,
            count_remote: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Every target's score for each input (N×T); other named outputs (a package's scale
        outputs) as the model gives them."""
        distinct, inverse = _distinct_rows(inputs) if self.shares else (inputs, None)
        own = outputs is not None and outputs != [self._spec.logits_output]
        names = list(outputs) if own else list(self.dense.outputs)  # e.g. scale outputs
        raw = self.handle.run(distinct, names, state, count_remote)
        found = raw if own else [target_scores(self.dense, raw, self.targets,
                                               self.class_count)]
        if inverse is None:
            return found
        if self.on_shared is not None and len(distinct) < len(inputs):
            self.on_shared(len(inputs) - len(distinct))
        return [values[inverse] for values in found]

    def derived(self, key: str, build: Callable[[Any], Any]) -> Any:
        """What depends on the targets (scores of baselines, the gradient methods' target
        head: ``TARGET_KEYS``) is built here, once per request; the rest (translated
        programs, stems) is the package's, built once per load from the package itself."""
        if not key.startswith(TARGET_KEYS):
            return self.handle.derived(key, build)
        with self._lock:
            if key not in self._derived:
                self._derived[key] = build(self)
            return self._derived[key]

    def derived_items(self, prefix: str) -> list[tuple[str, Any]]:
        if not prefix.startswith(TARGET_KEYS):
            return self.handle.derived_items(prefix)
        with self._lock:
            return [(k, v) for k, v in self._derived.items() if k.startswith(prefix)]


def _distinct_rows(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``inputs`` (first occurrences, in order) and each row's index
    among them, found by a digest of each row's bytes."""
    first: dict[bytes, int] = {}
    inverse = np.empty(len(inputs), np.int64)
    keep = []
    for index, row in enumerate(inputs):
        key = hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()
        if key not in first:
            first[key] = len(keep)
            keep.append(index)
        inverse[index] = first[key]
    return inputs[keep], inverse
