"""Captioned PNG overlays of saliency maps on the pictures they explain, and panels of
several side by side."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from saliency_service.core.repository import InputSpec
from saliency_service.core.request import CostCounter
from saliency_service.render.drawing import clipped, column, heat_picture, png, row, text_band

# Longest class label a caption shows; a longer one ends in an ellipsis.
MAX_LABEL_CHARS = 80


def caption_label(label: object) -> str:
    """A class label as a caption shows it: at most ``MAX_LABEL_CHARS`` characters."""
    return clipped(str(label), MAX_LABEL_CHARS)


def captioned_overlays(inputs: np.ndarray, spec: InputSpec, maps: np.ndarray,
                       targets: np.ndarray, labels: tuple[str, ...], method: str,
                       cost: CostCounter, wall_seconds: float,
                       rendered: tuple[bytes, ...] = (),
                       check: Callable[[], None] | None = None,
                       boxes: np.ndarray | None = None) -> list[bytes]:
    """One PNG per item: the input picture under its map, at a legible size, with a ticked
    colour bar and a caption (method, explained class, the request's cost) that wraps.

    ``rendered`` are a method's own pictures (LOVI's), one per item: they get the caption
    band below instead. ``check`` runs before each item (the request's deadline and
    cancellation). ``boxes`` (one per map) outline what a detector's or segmenter's map
    explains."""
    pictures = to_uint8_rgb(inputs, list(spec.mean), list(spec.std), spec.value_range)
    overlays = []
    for index, picture in enumerate(pictures):
        if check is not None:
            check()
        label = caption_label(labels[targets[index]] if labels else targets[index])
        caption = (f"{method} · {label} · fwd {cost.forward_passes} "
                   f"bwd {cost.backward_passes} · {wall_seconds * 1000:.0f} ms")
        if rendered:
            own = _decoded(rendered[index])
            overlays.append(png(column([own, text_band(caption, own.shape[1])])))
        else:
            box = None if boxes is None else boxes[index]
            overlays.append(png(heat_picture(picture, maps[index], caption, box=box)))
    return overlays


def _decoded(data: bytes) -> np.ndarray:
    """A PNG the service rendered → uint8 H×W×3."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def panel_png(overlays: list[bytes], title: str = "") -> bytes:
    """Overlays (PNG, as the service returns them) side by side in one PNG, under a title."""
    return png(row([_decoded(data) for data in overlays], title))


def to_uint8_rgb(model_input: np.ndarray, mean: list[float], std: list[float],
                 value_range: tuple[float, float]) -> np.ndarray:
    """Inverts normalization: N×C×H×W model input → uint8 N×H×W×3 for display."""
    mean_a = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    raw = model_input * std_a + mean_a
    low, high = value_range
    unit = np.clip((raw - low) / max(high - low, 1e-12), 0.0, 1.0)
    if unit.shape[1] == 1:
        unit = np.repeat(unit, 3, axis=1)
    return (unit[:, :3].transpose(0, 2, 3, 1) * 255.0 + 0.5).astype(np.uint8)
