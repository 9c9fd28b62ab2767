"""A family of generated classification tasks where one localized object decides the class.

Every image comes with the ground-truth mask of what decides its class, so a saliency map can
be scored against it (``evaluation.metrics``: relevance mass, pointing game). The tasks differ
in *what* about the object decides, so that a method that only finds edges, or only finds
colour, fails somewhere:

- ``colour``: a solid square or disc whose colour (red, green, blue) is the class; large and
  uniform, so blurring it keeps the colour that decides.
- ``shape``: a circle, a square or a triangle, all of one colour.
- ``texture``: a square patch of stripes at 0°, 45°, 90° or 135°.
- ``count``: one, two or three small discs; the mask is all of them.
- ``distractors``: the colour of the one ring decides; solid discs and squares in every class
  colour are drawn around it, so colour alone does not.

Backgrounds are a grey level with clutter (a smooth random texture) and pixel noise, each at a
level drawn per image from ``TaskConfig``'s levels. Image ``i`` of a (task, seed) is the same
on every machine: its random numbers come from ``numpy.random.default_rng([seed, i])``.
Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue"),
    "shape": ("circle", "square", "triangle"),
    "texture": ("0°", "45°", "90°", "135°"),
    "count": ("one", "two", "three"),
    "distractors": ("red ring", "green ring", "blue ring"),
}
PALETTE = np.array([[0.85, 0.15, 0.15], [0.15, 0.75, 0.2], [0.2, 0.3, 0.9]], np.float32)
CLUTTER_LEVELS = (0.0, 0.15, 0.3)
NOISE_LEVELS = (0.0, 0.04, 0.08)


@dataclass(frozen=True)
class TaskConfig:
    """Image side in pixels, the seed naming the dataset, and the clutter and noise levels
    drawn from (uniformly, per image)."""

    size: int = 48
    seed: int = 0
    clutter_levels: tuple[float, ...] = CLUTTER_LEVELS
    noise_levels: tuple[float, ...] = NOISE_LEVELS


@dataclass(frozen=True)
class TaskBatch:
    """Images, labels and the deciding object's mask, index-aligned."""

    task: str
    images: np.ndarray  # uint8 N×H×W×3
    labels: np.ndarray  # int64 N
    masks: np.ndarray  # bool N×H×W
    clutter: np.ndarray  # float32 N: the clutter level of each image
    noise: np.ndarray  # float32 N: the pixel-noise level of each image

    @property
    def class_names(self) -> tuple[str, ...]:
        return TASKS[self.task]


def generate(task: str, count: int, config: TaskConfig = TaskConfig(), start: int = 0,
             ) -> TaskBatch:
    """Images ``start … start + count − 1`` of ``task`` (a key of ``TASKS``).

    Raises:
        ValueError: on an unknown task, a negative count or start, or a size below 32.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if count < 0 or start < 0:
        raise ValueError(f"count ({count}) and start ({start}) must be >= 0")
    if config.size < 32:
        raise ValueError(f"size {config.size} is too small for the tasks; use >= 32")
    size = config.size
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.empty((count, size, size), bool)
    labels = np.empty(count, np.int64)
    clutter = np.empty(count, np.float32)
    noise = np.empty(count, np.float32)
    draw = _DRAW[task]
    classes = len(TASKS[task])
    for row in range(count):
        rng = np.random.default_rng([config.seed, list(TASKS).index(task), start + row])
        label = int(rng.integers(classes))
        clutter[row] = rng.choice(config.clutter_levels)
        noise[row] = rng.choice(config.noise_levels)
        canvas = _background(rng, size, float(clutter[row]))
        masks[row] = draw(rng, canvas, label)
        canvas += rng.normal(0.0, float(noise[row]), canvas.shape).astype(np.float32)
        images[row] = np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
        labels[row] = label
    return TaskBatch(task, images, labels, masks, clutter, noise)


# ---- drawing ---------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """A grey level plus a smooth random texture of amplitude ``clutter``, grey (the same in
    every channel) so that colour stays the objects' alone."""
    level = rng.uniform(0.35, 0.65)
    coarse = rng.uniform(-1.0, 1.0, (6, 6)).astype(np.float32)
    field = smooth(coarse, size)
    canvas = np.full((size, size, 3), level, np.float32)
    canvas += clutter * field[..., None]
    return canvas


def smooth(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a coarse grid to size × size."""
    points = np.linspace(0, grid.shape[0] - 1, size)
    low = np.floor(points).astype(int)
    high = np.minimum(low + 1, grid.shape[0] - 1)
    weight = (points - low).astype(np.float32)
    rows = grid[low] * (1 - weight)[:, None] + grid[high] * weight[:, None]
    return rows[:, low] * (1 - weight)[None] + rows[:, high] * weight[None]


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size × size image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _centre(rng: np.random.Generator, size: int, radius: float) -> tuple[float, float]:
    margin = radius + 2
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _disc(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = pixel_grid(size)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def _square(size: int, cy: float, cx: float, half: float) -> np.ndarray:
    yy, xx = pixel_grid(size)
    return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)


def _triangle(size: int, cy: float, cx: float, half: float) -> np.ndarray:
    """An upright isosceles triangle in the square of side 2·half around the centre."""
    yy, xx = pixel_grid(size)
    depth = (yy - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(xx - cx) <= depth * half)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def _draw_colour(rng: np.random.Generator, canvas: np.ndarray, label: int) -> np.ndarray:
    size = canvas.shape[0]
    half = rng.uniform(0.1, 0.15) * size
    cy, cx = _centre(rng, size, half * 1.1)
    mask = (_disc(size, cy, cx, half * 1.1) if rng.random() < 0.5
            else _square(size, cy, cx, half))
    _paint(canvas, mask, PALETTE[label])
    return mask


def _draw_shape(rng: np.random.Generator, canvas: np.ndarray, label: int) -> np.ndarray:
    size = canvas.shape[0]
    half = rng.uniform(0.09, 0.13) * size
    cy, cx = _centre(rng, size, half * 1.1)
    draw = (lambda: _disc(size, cy, cx, half * 1.1), lambda: _square(size, cy, cx, half),
            lambda: _triangle(size, cy, cx, half * 1.2))[label]
    mask = draw()
    _paint(canvas, mask, np.array([0.95, 0.85, 0.2], np.float32))
    return mask


def _draw_texture(rng: np.random.Generator, canvas: np.ndarray, label: int) -> np.ndarray:
    size = canvas.shape[0]
    half = rng.uniform(0.12, 0.16) * size
    cy, cx = _centre(rng, size, half)
    mask = _square(size, cy, cx, half)
    yy, xx = pixel_grid(size)
    angle = np.deg2rad(45.0 * label)
    along = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
    period = 4.0
    stripes = np.cos(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi)) > 0
    light = np.array([0.95, 0.95, 0.95], np.float32)
    dark = np.array([0.05, 0.05, 0.05], np.float32)
    canvas[mask & stripes] = light
    canvas[mask & ~stripes] = dark
    return mask


def _draw_count(rng: np.random.Generator, canvas: np.ndarray, label: int) -> np.ndarray:
    size = canvas.shape[0]
    radius = 0.07 * size
    mask = np.zeros((size, size), bool)
    placed: list[tuple[float, float]] = []
    while len(placed) < label + 1:
        cy, cx = _centre(rng, size, radius)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (3 * radius) ** 2 for y, x in placed):
            placed.append((cy, cx))
            mask |= _disc(size, cy, cx, radius)
    _paint(canvas, mask, np.array([0.95, 0.95, 0.95], np.float32))
    return mask


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, label: int) -> np.ndarray:
    size = canvas.shape[0]
    radius = 0.11 * size
    cy, cx = _centre(rng, size, radius)
    placed = [(cy, cx, radius)]
    for _ in range(int(rng.integers(2, 4))):
        half = rng.uniform(0.05, 0.07) * size
        for _attempt in range(50):
            y, x = _centre(rng, size, half * 1.5)
            if all((y - py) ** 2 + (x - px) ** 2 > (pr + half * 1.5 + 2) ** 2
                   for py, px, pr in placed):
                placed.append((y, x, half * 1.5))
                shape = (_disc(size, y, x, half * 1.2) if rng.random() < 0.5
                         else _square(size, y, x, half))
                _paint(canvas, shape, PALETTE[int(rng.integers(len(PALETTE)))])
                break
    outer = _disc(size, cy, cx, radius)
    ring = outer & ~_disc(size, cy, cx, radius * 0.55)
    _paint(canvas, ring, PALETTE[label])
    return outer


_DRAW = {"colour": _draw_colour, "shape": _draw_shape, "texture": _draw_texture,
         "count": _draw_count, "distractors": _draw_distractors}
