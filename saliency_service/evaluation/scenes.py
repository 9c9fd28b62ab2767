"""Generated scenes with known objects, for detectors and segmenters.

Each image holds one to ``max_objects`` objects of ``CLASSES`` (a solid disc, a checkered
square, a striped square; colours drawn from one palette for every class, so the shape or
texture decides the class, not the colour) at random places and sizes over a cluttered grey
background. Objects do not overlap, so every object's mask is exact and the per-pixel class map
is unambiguous: each box has a ground-truth mask a saliency map can be scored against
(``evaluation.metrics``: relevance mass, pointing game).

Image ``i`` of a seed is the same on every machine: its random numbers come from
``numpy.random.default_rng([seed, SCENE_STREAM, i])``. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saliency_service.core.detections import box_iou
from saliency_service.evaluation.tasks import pixel_grid, smooth

CLASSES: tuple[str, ...] = ("disc", "checks", "stripes")
BACKGROUND = 0  # class-map value of background pixels; object class c is c + 1
PALETTE = np.array([[0.9, 0.2, 0.15], [0.15, 0.75, 0.25], [0.2, 0.35, 0.95],
                    [0.95, 0.85, 0.15], [0.85, 0.3, 0.85]], np.float32)
SCENE_STREAM = 37  # keeps these draws apart from other generators seeded with the same seed
_PLACEMENT_TRIES = 60


@dataclass(frozen=True)
class SceneConfig:
    """Image side, seed, object count and object side range (as fractions of the side)."""

    size: int = 64
    seed: int = 0
    max_objects: int = 4
    min_side: float = 0.16
    max_side: float = 0.34
    clutter: float = 0.25
    noise: float = 0.03


@dataclass(frozen=True)
class Scene:
    """One image's objects: boxes (x1, y1, x2, y2 in pixels, exclusive ends), classes (index
    into ``CLASSES``) and exact masks, index-aligned."""

    boxes: np.ndarray  # float32 M×4
    classes: np.ndarray  # int64 M
    masks: np.ndarray  # bool M×H×W


@dataclass(frozen=True)
class SceneBatch:
    """Images, their objects and the per-pixel class map (0 background, class + 1)."""

    images: np.ndarray  # uint8 N×H×W×3
    scenes: tuple[Scene, ...]
    class_maps: np.ndarray  # int64 N×H×W

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASSES


def generate(count: int, config: SceneConfig = SceneConfig(), start: int = 0) -> SceneBatch:
    """Scenes ``start … start + count − 1`` of ``config.seed``.

    Raises:
        ValueError: on a negative count or start, a side below 32, or object sizes that
            cannot fit.
    """
    if count < 0 or start < 0:
        raise ValueError(f"count ({count}) and start ({start}) must be >= 0")
    if config.size < 32:
        raise ValueError(f"size {config.size} is too small for the scenes; use >= 32")
    if not 0 < config.min_side <= config.max_side <= 0.5:
        raise ValueError(f"object sides {config.min_side}–{config.max_side} must satisfy "
                         "0 < min_side <= max_side <= 0.5")
    if config.max_objects < 1:
        raise ValueError(f"max_objects ({config.max_objects}) must be >= 1")
    size = config.size
    images = np.empty((count, size, size, 3), np.uint8)
    class_maps = np.zeros((count, size, size), np.int64)
    scenes = []
    for row in range(count):
        rng = np.random.default_rng([config.seed, SCENE_STREAM, start + row])
        canvas = _background(rng, size, config.clutter)
        scene = _place_objects(rng, canvas, config)
        for mask, label in zip(scene.masks, scene.classes, strict=True):
            class_maps[row][mask] = label + 1
        canvas += rng.normal(0.0, config.noise, canvas.shape).astype(np.float32)
        images[row] = np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
        scenes.append(scene)
    return SceneBatch(images, tuple(scenes), class_maps)


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """A grey level plus a smooth grey texture and a few faint grey blobs (clutter that is
    not an object: no colour, no edges as sharp as an object's)."""
    level = rng.uniform(0.35, 0.6)
    coarse = rng.uniform(-1.0, 1.0, (8, 8)).astype(np.float32)
    canvas = np.full((size, size, 3), level, np.float32)
    canvas += clutter * smooth(coarse, size)[..., None]
    yy, xx = pixel_grid(size)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(0.05, 0.15) * size
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
        canvas += rng.uniform(-clutter, clutter) * blob[..., None]
    return canvas


def _place_objects(rng: np.random.Generator, canvas: np.ndarray, config: SceneConfig) -> Scene:
    """Draws 1 … max_objects non-overlapping objects (boxes at least 2 px apart) onto
    ``canvas``; a box that finds no free place after some tries is left out (never the
    first)."""
    size = canvas.shape[0]
    wanted = int(rng.integers(1, config.max_objects + 1))
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    masks: list[np.ndarray] = []
    for _ in range(wanted):
        label = int(rng.integers(len(CLASSES)))
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        for _attempt in range(_PLACEMENT_TRIES):
            side = round(rng.uniform(config.min_side, config.max_side) * size)
            x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = np.array([x1, y1, x1 + side, y1 + side], np.float32)
            grown = box + np.array([-2, -2, 2, 2], np.float32)
            if not boxes or box_iou(grown[None], np.stack(boxes)).max() == 0.0:
                break
        else:
            continue
        mask = _draw(rng, canvas, label, box, colour)
        boxes.append(_tight_box(mask))
        classes.append(label)
        masks.append(mask)
    return Scene(np.stack(boxes).astype(np.float32), np.asarray(classes, np.int64),
                 np.stack(masks))


def _draw(rng: np.random.Generator, canvas: np.ndarray, label: int, box: np.ndarray,
          colour: np.ndarray) -> np.ndarray:
    """Paints object ``label`` inside ``box``; returns its mask."""
    size = canvas.shape[0]
    yy, xx = pixel_grid(size)
    x1, y1, x2, y2 = (float(v) for v in box)
    cy, cx, half = (y1 + y2) / 2, (x1 + x2) / 2, (x2 - x1) / 2
    inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
    if CLASSES[label] == "disc":
        mask = inside & ((yy - cy) ** 2 + (xx - cx) ** 2 <= half ** 2)
        canvas[mask] = colour
    elif CLASSES[label] == "checks":  # squares of 3 px in the colour and a dark shade
        mask = inside
        dark = (np.floor((yy - y1) / 3) + np.floor((xx - x1) / 3)) % 2 == 1
        canvas[mask & ~dark] = colour
        canvas[mask & dark] = colour * 0.25
    else:  # stripes: light and dark bands at a random angle, no single colour
        mask = inside
        angle = rng.uniform(0, np.pi)
        along = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        stripes = np.cos(2 * np.pi * along / 4.0 + rng.uniform(0, 2 * np.pi)) > 0
        canvas[mask & stripes] = np.clip(colour + 0.35, 0.0, 1.0)
        canvas[mask & ~stripes] = colour * 0.25
    return mask


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """The smallest box (x1, y1, x2, y2; exclusive ends) holding every pixel of ``mask``."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], np.float32)


# ---- scores ----------------------------------------------------------------------------------


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (all-point interpolation, as in PASCAL VOC 2010+)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(((recall[steps + 1] - recall[steps]) * precision[steps + 1]).sum())


def mean_average_precision(predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                           scenes: tuple[Scene, ...], classes: int = len(CLASSES),
                           iou_threshold: float = 0.5) -> float:
    """mAP@``iou_threshold`` over ``classes``: ``predictions[i]`` is scene i's (boxes M×4,
    scores M, classes M); a prediction is a hit when it overlaps an unclaimed ground-truth
    box of its class by at least the threshold, highest score first."""
    precisions = []
    for label in range(classes):
        entries: list[tuple[float, bool]] = []
        total = 0
        for (boxes, scores, predicted), scene in zip(predictions, scenes, strict=True):
            truth = scene.boxes[scene.classes == label]
            total += len(truth)
            chosen = predicted == label
            order = np.argsort(-scores[chosen], kind="stable")
            mine, my_scores = boxes[chosen][order], scores[chosen][order]
            claimed = np.zeros(len(truth), bool)
            overlaps = box_iou(mine, truth) if len(truth) else np.zeros((len(mine), 0))
            for index in range(len(mine)):
                candidates = np.where(claimed, -1.0, overlaps[index]) if len(truth) else []
                best = int(np.argmax(candidates)) if len(truth) else -1
                hit = best >= 0 and candidates[best] >= iou_threshold
                if hit:
                    claimed[best] = True
                entries.append((float(my_scores[index]), bool(hit)))
        if total == 0:
            continue
        entries.sort(key=lambda entry: -entry[0])
        hits = np.array([hit for _, hit in entries], bool)
        true_positives = np.cumsum(hits)
        recall = true_positives / total
        precision = true_positives / np.arange(1, len(hits) + 1)
        precisions.append(average_precision(recall, precision) if len(hits) else 0.0)
    return float(np.mean(precisions)) if precisions else float("nan")


def mean_iou(predicted: np.ndarray, truth: np.ndarray, classes: int = len(CLASSES) + 1) -> float:
    """Mean over classes (background included) of intersection over union of the predicted
    and true class maps (int N×H×W); a class absent from both is left out."""
    scores = []
    for label in range(classes):
        mine, theirs = predicted == label, truth == label
        union = (mine | theirs).sum()
        if union:
            scores.append((mine & theirs).sum() / union)
    return float(np.mean(scores))
