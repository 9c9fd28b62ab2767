"""LOVI's picture: per-scale maps of one image as colours (hue = depth), with its legend."""

from __future__ import annotations

import numpy as np
from PIL import Image

from saliency_service.render.drawing import (
    colour_bar,
    labelled_picture,
    legend_width,
    text_band,
    text_width,
)

# Hue per depth: violet (270°) for the first scale down to red (0°) for the last.
_LOVI_FIRST_HUE = 0.75


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    hsv8 = (np.clip(hsv, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv8, mode="HSV").convert("RGB"))


def lovi_rgb(maps: np.ndarray) -> np.ndarray:
    """LOVI of one image's S×H×W per-scale maps → uint8 H×W×3.

    Hue is the map-weighted mean depth (first scale violet … last scale red), saturation
    1 − min/max over scales (grey where all scales agree), value the max over scales.
    """
    scales = maps.shape[0]
    depth = np.linspace(0.0, 1.0, scales, dtype=np.float32).reshape(-1, 1, 1)
    total = maps.sum(axis=0)
    mean_depth = np.where(total > 0, (maps * depth).sum(axis=0) / np.where(total > 0, total, 1),
                          0.0)
    high = maps.max(axis=0)
    low = maps.min(axis=0)
    saturation = np.where(high > 0, 1.0 - low / np.where(high > 0, high, 1.0), 0.0)
    return _hsv_to_rgb(np.stack([_LOVI_FIRST_HUE * (1.0 - mean_depth), saturation, high],
                                axis=-1))


def depth_colours(count: int = 256) -> np.ndarray:
    """The hues of ``lovi_rgb`` from the first scale's depth to the last's, K×3 uint8."""
    depth = np.linspace(0.0, 1.0, count, dtype=np.float32)
    ones = np.ones_like(depth)
    return _hsv_to_rgb(np.stack([_LOVI_FIRST_HUE * (1.0 - depth), ones, ones], axis=-1)[None])[0]


def lovi_picture(maps: np.ndarray) -> np.ndarray:
    """LOVI of one image at a legible size, under a legend: a bar of hue against scale
    (``scale_0`` … ``scale_k``, the package's scale outputs in order) and what grey and
    brightness mean."""
    scales = maps.shape[0]
    width = legend_width(maps.shape[1:])
    positions = np.linspace(0.0, 1.0, scales) if scales > 1 else np.array([0.5])
    names = [f"scale_{index}" for index in range(scales)]
    room = (width - 12) / max(scales, 1)
    labels = names if max(text_width(n) for n in names) + 4 < room else [
        str(index) for index in range(scales)]
    bar = colour_bar(depth_colours(), width, list(zip(positions.tolist(), labels, strict=True)))
    meaning = (f"hue: layer depth, {names[0]} (violet, early) to {names[-1]} (red, late); "
               "grey: the scales agree; brightness: strength")
    return labelled_picture(lovi_rgb(maps), [bar, text_band(meaning, width)])
