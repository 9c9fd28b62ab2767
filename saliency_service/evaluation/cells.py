"""Synthetic "ten classes" cell images with ground-truth heatmaps.

After Tjoa & Guan, "Quantifying Explainability of Saliency Methods in Deep Neural Networks with
a Synthetic Dataset" (https://arxiv.org/abs/2009.02899). Each image holds one object whose class
is decided by a small part of it (a border colour, a bar, tails), so a saliency map can be scored
against where the evidence really is: 0.9 on that discriminative part, 0.4 on the rest of the
object, 0 on the background (and 0 everywhere for a blank image).

Everything is drawn with numpy on whole batches, and image ``i`` depends only on
``(config.seed, i)``: any slice of a dataset can be regenerated on its own, in any chunking.
Sizes are fractions of the image side, so one seed gives the same scene at every resolution
(up to pixelation). Generating 10,000 images at 128×128 takes 5–6 s on one CPU core.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "round_cell",
    "cell_with_bar",
    "bar_and_pole",
    "red_rectangle",
    "green_rectangle",
    "blue_rectangle",
    "one_tail",
    "three_tails",
    "eight_tails",
    "blank",
)
BACKGROUNDS: tuple[str, ...] = ("black", "smooth", "rings")
DISCRIMINATIVE_VALUE = 0.9
OBJECT_VALUE = 0.4

_BLANK = CLASS_NAMES.index("blank")
# Class index → the channel its border colour fills.
_RECTANGLE_CHANNEL = {
    CLASS_NAMES.index(f"{colour}_rectangle"): channel
    for channel, colour in enumerate(("red", "green", "blue"))
}
# Class index → tail directions in degrees; 0 points down the cell's long (stretched) axis.
_TAIL_ANGLES = {
    CLASS_NAMES.index("one_tail"): (0.0,),
    CLASS_NAMES.index("three_tails"): (0.0, 120.0, 240.0),
    CLASS_NAMES.index("eight_tails"): tuple(45.0 * k for k in range(8)),
}
_TAIL_COLOUR_FACTOR = 0.75  # tails are a darker shade of the cell border, as in the paper

# One row of uniform numbers per image, always drawn in full and in this order, so a parameter
# never shifts the random stream of another (and a class never changes another's nuisances).
_SCALARS = (
    "background",
    "radius",
    "stretch",
    "thickness",
    "angle",
    "offset_x",
    "offset_y",
    "border_r",
    "border_g",
    "border_b",
    "inner_r",
    "inner_g",
    "inner_b",
    "bar",
    "pole",
    "rect_w",
    "rect_h",
    "rect_main",
    "rect_other_1",
    "rect_other_2",
    "tail",
    "wobble",
    "ring_x",
    "ring_y",
    "ring_f_r",
    "ring_f_g",
    "ring_f_b",
)
_COLUMN = {name: column for column, name in enumerate(_SCALARS)}
_WOBBLE_GRID = 8  # control points per side of the smooth field that makes outlines wobbly
_SMOOTH_GRID = 6  # control points per side of the smooth colour background
_RINGS_GRID = 8  # control points per side of the noise that warps the rings
_WOBBLE_AT = len(_SCALARS)
_SMOOTH_AT = _WOBBLE_AT + 2 * _WOBBLE_GRID**2
_RINGS_AT = _SMOOTH_AT + 3 * _SMOOTH_GRID**2
_UNIFORMS_PER_IMAGE = _RINGS_AT + 3 * _RINGS_GRID**2
_IMAGE_STREAM, _LABEL_STREAM = 0, 1  # keeps per-image and per-block seeds apart
_PIXELS_PER_CHUNK = 1 << 22  # bounds the float32 temporaries to a few tens of MB


@dataclass(frozen=True)
class CellConfig:
    """Which dataset to draw: image side in pixels, background mix and seed.

    ``backgrounds`` is sampled uniformly per image; repeat a name to weight it.
    """

    size: int = 128
    backgrounds: tuple[str, ...] = BACKGROUNDS
    seed: int = 0


TRAIN_CONFIG = CellConfig(seed=0)
TEST_CONFIG = CellConfig(seed=1)
# A shifted distribution: another resolution, no black backgrounds, unseen seed.
HELD_OUT_CONFIG = CellConfig(size=160, backgrounds=("smooth", "rings"), seed=2)


@dataclass(frozen=True)
class CellBatch:
    """Images with their labels and ground truth, index-aligned.

    ``backgrounds`` (int64 N) indexes ``BACKGROUNDS`` so results can be split by background.
    """

    images: np.ndarray  # uint8 N×H×W×3 (RGB)
    labels: np.ndarray  # int64 N
    heatmaps: np.ndarray  # float32 N×H×W in {0, 0.4, 0.9}
    masks: np.ndarray  # bool N×H×W object mask
    backgrounds: np.ndarray | None = None  # int64 N, index into BACKGROUNDS


def generate(count: int, config: CellConfig = CellConfig(), start: int = 0) -> CellBatch:
    """Draws images ``start .. start+count-1`` of the dataset named by ``config``.

    Raises:
        ValueError: on a negative count or start, a size below 16, or an unknown background.
    """
    if count < 0 or start < 0:
        raise ValueError(f"count ({count}) and start ({start}) must be >= 0")
    if config.size < 16:
        raise ValueError(f"size {config.size} is too small to draw cells; use >= 16")
    unknown = [name for name in config.backgrounds if name not in BACKGROUNDS]
    if not config.backgrounds or unknown:
        raise ValueError(
            f"backgrounds {config.backgrounds!r} must be a non-empty tuple of {BACKGROUNDS}"
        )
    size = config.size
    images = np.empty((count, size, size, 3), np.uint8)
    heatmaps = np.empty((count, size, size), np.float32)
    masks = np.empty((count, size, size), bool)
    labels = np.empty(count, np.int64)
    backgrounds = np.empty(count, np.int64)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for begin in range(0, count, chunk):
        stop = min(count, begin + chunk)
        indices = np.arange(start + begin, start + stop, dtype=np.int64)
        part = _render(config, indices)
        images[begin:stop] = part.images
        heatmaps[begin:stop] = part.heatmaps
        masks[begin:stop] = part.masks
        labels[begin:stop] = part.labels
        backgrounds[begin:stop] = part.backgrounds
    return CellBatch(images, labels, heatmaps, masks, backgrounds)


def _labels(seed: int, indices: np.ndarray) -> np.ndarray:
    """Balanced labels: each aligned block of ten indices holds every class once, shuffled."""
    classes = len(CLASS_NAMES)
    blocks = indices // classes
    first = int(blocks.min())
    table = np.stack(
        [
            np.random.default_rng([seed, _LABEL_STREAM, block]).permutation(classes)
            for block in range(first, int(blocks.max()) + 1)
        ]
    )
    return table[blocks - first, indices % classes].astype(np.int64)


def _uniforms(seed: int, indices: np.ndarray) -> np.ndarray:
    """One independent stream per image index: the root of chunking-independent output."""
    out = np.empty((len(indices), _UNIFORMS_PER_IMAGE), np.float32)
    for row, index in enumerate(indices):
        np.random.default_rng([seed, _IMAGE_STREAM, int(index)]).random(
            dtype=np.float32, out=out[row]
        )
    return out


@functools.lru_cache(maxsize=32)
def _upsampler(points: int, size: int) -> np.ndarray:
    """Catmull-Rom interpolation matrix (size × points): smooth, without creases or plateaus."""
    position = np.clip((np.arange(size) + 0.5) / size * points - 0.5, 0.0, points - 1.0)
    base = np.floor(position).astype(int)
    t = position - base
    weights = 0.5 * np.stack(
        [
            -(t**3) + 2 * t**2 - t,
            3 * t**3 - 5 * t**2 + 2,
            -3 * t**3 + 4 * t**2 + t,
            t**3 - t**2,
        ],
        axis=1,
    )
    matrix = np.zeros((size, points), np.float32)
    for offset in range(4):
        np.add.at(
            matrix,
            (np.arange(size), np.clip(base + offset - 1, 0, points - 1)),
            weights[:, offset],
        )
    return matrix


def _smooth_field(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsamples (..., k, k) control points to (..., size, size)."""
    matrix = _upsampler(grid.shape[-1], size)
    return matrix @ grid @ matrix.T


def _between(u: np.ndarray, name: str, low: float, high: float) -> np.ndarray:
    """Maps the named uniform column to [low, high), shaped (N, 1, 1) to broadcast over pixels."""
    return (low + (high - low) * u[:, _COLUMN[name]]).reshape(-1, 1, 1)


@dataclass(frozen=True)
class _Rendered:
    images: np.ndarray
    heatmaps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    backgrounds: np.ndarray


# Layers of an object, painted over the background; each has its own colour in the palette.
_BACKGROUND, _FILL, _EDGE, _FEATURE = 0, 1, 2, 3
_LAYER_HEAT = np.array([0.0, OBJECT_VALUE, OBJECT_VALUE, DISCRIMINATIVE_VALUE], np.float32)


def _render(config: CellConfig, indices: np.ndarray) -> _Rendered:
    """Draws one chunk: backgrounds first, then each class's objects on its own subset."""
    size = config.size
    count = len(indices)
    labels = _labels(config.seed, indices)
    u = _uniforms(config.seed, indices)
    choice = np.minimum(
        (u[:, _COLUMN["background"]] * len(config.backgrounds)).astype(int),
        len(config.backgrounds) - 1,
    )
    backgrounds = np.array([BACKGROUNDS.index(config.backgrounds[c]) for c in choice], np.int64)
    canvas = _backgrounds(u, backgrounds, size)  # N×3×H×W
    layers = np.zeros((count, size, size), np.uint8)
    for label in range(len(CLASS_NAMES)):
        rows = np.flatnonzero(labels == label)
        if label == _BLANK or rows.size == 0:
            continue
        layer, palette = _draw_objects(label, u[rows], size)
        layers[rows] = layer
        # Paint only the object's pixels: a gather from the per-image palette.
        item, y, x = np.nonzero(layer)
        canvas[rows[item], :, y, x] = palette[item, layer[item, y, x]]
    images = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    return _Rendered(images, _LAYER_HEAT[layers], layers > 0, labels, backgrounds)


def _backgrounds(u: np.ndarray, kinds: np.ndarray, size: int) -> np.ndarray:
    """Float32 N×3×H×W backgrounds in [0, 1]: black, a smooth colour field, or warped rings."""
    canvas = np.zeros((len(u), 3, size, size), np.float32)
    smooth = np.flatnonzero(kinds == BACKGROUNDS.index("smooth"))
    if smooth.size:
        grid = u[smooth, _SMOOTH_AT:_RINGS_AT].reshape(-1, 3, _SMOOTH_GRID, _SMOOTH_GRID)
        canvas[smooth] = _smooth_field(0.2 + 0.5 * grid, size)  # 0.2..0.7, as in the paper
    rings = np.flatnonzero(kinds == BACKGROUNDS.index("rings"))
    if rings.size:
        v = u[rings]
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        centre_x = _between(v, "ring_x", 0.25, 0.75)
        centre_y = _between(v, "ring_y", 0.25, 0.75)
        radius = np.sqrt(
            (axis[None, None, :] - centre_x) ** 2 + (axis[None, :, None] - centre_y) ** 2
        )
        grid = v[:, _RINGS_AT:].reshape(-1, 3, _RINGS_GRID, _RINGS_GRID)
        warp = _smooth_field(0.2 * grid - 0.1, size)  # ±10 % radial noise per channel
        periods = 2.0 + 4.0 * v[:, [_COLUMN[f"ring_f_{c}"] for c in "rgb"]]
        phase = (2.0 * np.pi) * periods[:, :, None, None] * radius[:, None] * (1.0 + warp)
        canvas[rings] = 0.25 * np.sin(phase) + 0.25
    return canvas


def _draw_objects(label: int, u: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws the objects of one class.

    Returns a uint8 N×H×W layer map (0 background, 1 fill, 2 plain edge, 3 discriminative part)
    and a float32 N×4×3 palette giving each layer's RGB colour.
    """
    radius = _between(u, "radius", 0.12, 0.19) * size
    stretch = _between(u, "stretch", 0.6, 1.4)  # the vertical axis, making ellipses
    thickness = _between(u, "thickness", 0.02, 0.05) * size
    wobble = _between(u, "wobble", 0.008, 0.02) * size
    rect_w = _between(u, "rect_w", 0.22, 0.42) * size
    rect_h = _between(u, "rect_h", 0.22, 0.42) * size
    tail = _between(u, "tail", 0.02, 0.05) * size
    if label in _RECTANGLE_CHANNEL:
        extent = np.hypot(rect_w, rect_h) / 2
    elif label in _TAIL_ANGLES:
        extent = 1.5 * radius * np.maximum(stretch, 1.0) + thickness
    else:
        extent = radius * np.maximum(stretch, 1.0)
    # Offsets keep the whole object, wobble included, inside the frame.
    room = np.maximum(size / 2 - extent - 3.0 * wobble - 1.0, 0.0)
    centre_x = size / 2 + _between(u, "offset_x", -1.0, 1.0) * room
    centre_y = size / 2 + _between(u, "offset_y", -1.0, 1.0) * room
    angle = np.deg2rad(_between(u, "angle", -60.0, 60.0))
    axis = np.arange(size, dtype=np.float32) + 0.5
    dx = axis[None, None, :] - centre_x
    dy = axis[None, :, None] - centre_y
    control = u[:, _WOBBLE_AT:_SMOOTH_AT].reshape(-1, 2, _WOBBLE_GRID, _WOBBLE_GRID)
    noise = _smooth_field(np.sqrt(12.0) * (control - 0.5), size)  # unit variance
    x = (dx * np.cos(angle) + dy * np.sin(angle) + wobble * noise[:, 0]).astype(np.float32)
    y = (dy * np.cos(angle) - dx * np.sin(angle) + wobble * noise[:, 1]).astype(np.float32)

    palette = np.zeros((len(u), 4, 3), np.float32)
    palette[:, _FILL] = (
        np.array([0.1, 0.1, 0.3]) + 0.2 * u[:, [_COLUMN[f"inner_{c}"] for c in "rgb"]]
    )
    palette[:, _EDGE] = 0.5 + 0.4 * u[:, [_COLUMN[f"border_{c}"] for c in "rgb"]]
    layer = np.zeros(x.shape, np.uint8)

    if label in _RECTANGLE_CHANNEL:
        outer = (np.abs(x) <= rect_w / 2) & (np.abs(y) <= rect_h / 2)
        fill = (np.abs(x) <= rect_w / 2 - thickness) & (np.abs(y) <= rect_h / 2 - thickness)
        channel = _RECTANGLE_CHANNEL[label]
        others = [c for c in range(3) if c != channel]
        palette[:, _FEATURE, others] = (
            0.2 * u[:, [_COLUMN["rect_other_1"], _COLUMN["rect_other_2"]]]
        )
        palette[:, _FEATURE, channel] = 0.6 + 0.3 * u[:, _COLUMN["rect_main"]]
        layer[outer] = _FEATURE
        layer[fill] = _FILL
        return layer, palette

    distance = x**2 + (y / stretch) ** 2
    layer[distance <= radius**2] = _EDGE
    layer[distance < (radius - thickness) ** 2] = _FILL
    if label == CLASS_NAMES.index("round_cell"):
        layer[layer == _EDGE] = _FEATURE
        palette[:, _FEATURE] = palette[:, _EDGE]
        return layer, palette
    if label in _TAIL_ANGLES:
        feature = np.zeros(x.shape, bool)
        for degrees in _TAIL_ANGLES[label]:
            theta = np.deg2rad(degrees)
            # Where the outline crosses this tail's axis, so tails start at the cell wall.
            reach = radius / np.hypot(np.sin(theta), np.cos(theta) / stretch)
            along = y * np.cos(theta) - x * np.sin(theta)
            across = x * np.cos(theta) + y * np.sin(theta)
            feature |= (
                (np.abs(across) <= tail / 2)
                & (along >= 0.8 * reach)
                & (along <= 1.5 * reach + thickness)
            )
        palette[:, _FEATURE] = _TAIL_COLOUR_FACTOR * palette[:, _EDGE]
    else:
        bar = _between(u, "bar", 0.02, 0.05) * size
        feature = (np.abs(y) <= bar / 2) & (np.abs(x) <= radius)
        if label == CLASS_NAMES.index("bar_and_pole"):
            pole = _between(u, "pole", 0.02, 0.06) * size
            feature |= (np.abs(x) <= pole / 2) & (np.abs(y) <= radius * stretch)
        palette[:, _FEATURE] = palette[:, _EDGE]
    layer[feature] = _FEATURE
    return layer, palette
