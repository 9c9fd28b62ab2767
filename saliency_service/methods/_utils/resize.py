"""Bilinear resizing of saliency maps, shared by every handler that upsamples a coarse map.

Half-pixel centres with clamped edges, i.e. torch's ``interpolate(mode="bilinear",
align_corners=False)`` and Grad-CAM's usual upsampling. OpenCV does the work, one SIMD pass
per map.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

# Requests already run in parallel on the worker threads; OpenCV's own pool on top of them
# only adds contention (and its small per-call tasks are not worth splitting).
cv2.setNumThreads(1)


@functools.lru_cache(maxsize=64)
def bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices (low, high; int64) and the weight of the high one (float64)
    of each of ``target`` output positions: output = (1 − w)·low + w·high. Read-only."""
    centres = (np.arange(target, dtype=np.float64) + 0.5) * source / target - 0.5
    centres = np.clip(centres, 0.0, source - 1)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    frac = centres - low
    for array in (low, high, frac):
        array.flags.writeable = False
    return low, high, frac


def upsample_bytes(source_height: int, source_width: int, height: int, width: int) -> int:
    """Bytes ``upsample`` holds per map at most: a float32 copy of the map and the result."""
    return 4 * (source_height * source_width + height * width)


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of N×h×w maps to float32 N×height×width (any N; h, w ≥ 1), one
    ``cv2.resize`` per map."""
    maps = np.asarray(maps, np.float32)
    out = np.empty((maps.shape[0], height, width), np.float32)
    for index, single in enumerate(maps):
        out[index] = cv2.resize(single, (width, height), interpolation=cv2.INTER_LINEAR)
    return out
