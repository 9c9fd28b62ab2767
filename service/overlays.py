"""Captioned PNG overlays of saliency maps on the pictures they explain, and panels of
several side by side."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kernel.drawing import column, heat_picture, png, row, text_band
from kernel.repository import InputSpec
from kernel.request import CostCounter
from service.images import to_uint8_rgb


def captioned_overlays(inputs: np.ndarray, spec: InputSpec, maps: np.ndarray,
                       targets: np.ndarray, labels: tuple[str, ...], method: str,
                       cost: CostCounter, wall_seconds: float,
                       rendered: tuple[bytes, ...] = ()) -> list[bytes]:
    """One PNG per item: the input picture under its map, at a legible size, with a ticked
    colour bar and a caption (method, explained class, the request's cost) that wraps.

    ``rendered`` are a method's own pictures (LOVI's), one per item: they get the caption
    band below instead."""
    pictures = to_uint8_rgb(inputs, list(spec.mean), list(spec.std), spec.value_range)
    overlays = []
    for index, picture in enumerate(pictures):
        label = labels[targets[index]] if labels else targets[index]
        caption = (f"{method} · {label} · fwd {cost.forward_passes} "
                   f"bwd {cost.backward_passes} · {wall_seconds * 1000:.0f} ms")
        if rendered:
            own = _decoded(rendered[index])
            overlays.append(png(column([own, text_band(caption, own.shape[1])])))
        else:
            overlays.append(png(heat_picture(picture, maps[index], caption)))
    return overlays


def _decoded(data: bytes) -> np.ndarray:
    """A PNG the service rendered → uint8 H×W×3."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def panel_png(overlays: list[bytes], title: str = "") -> bytes:
    """Overlays (PNG, as the service returns them) side by side in one PNG, under a title."""
    return png(row([_decoded(data) for data in overlays], title))
