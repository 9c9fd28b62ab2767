"""Captioned PNG overlays of saliency maps on the pictures they explain."""

from __future__ import annotations

import numpy as np

from kernel.repository import InputSpec
from kernel.request import CostCounter
from service.images import overlay_png, to_uint8_rgb


def captioned_overlays(inputs: np.ndarray, spec: InputSpec, maps: np.ndarray,
                       targets: np.ndarray, labels: tuple[str, ...], method: str,
                       cost: CostCounter, wall_seconds: float) -> list[bytes]:
    """One PNG per item: the input picture under its map, captioned with the method, the
    explained class and the request's cost."""
    pictures = to_uint8_rgb(inputs, list(spec.mean), list(spec.std), spec.value_range)
    overlays = []
    for index, picture in enumerate(pictures):
        label = labels[targets[index]] if labels else targets[index]
        caption = (f"{method} · {label} · fwd {cost.forward_passes} "
                   f"bwd {cost.backward_passes} · {wall_seconds * 1000:.0f} ms")
        overlays.append(overlay_png(picture, maps[index], caption))
    return overlays
