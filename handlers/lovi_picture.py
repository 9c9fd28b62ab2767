"""LOVI's picture: per-scale maps of one image as colours (hue = depth), encoded as PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Hue per depth: violet (270°) for the first scale down to red (0°) for the last.
_LOVI_FIRST_HUE = 0.75


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
    hsv = np.stack([_LOVI_FIRST_HUE * (1.0 - mean_depth), saturation, high], axis=-1)
    hsv8 = (np.clip(hsv, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv8, mode="HSV").convert("RGB"))


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()
