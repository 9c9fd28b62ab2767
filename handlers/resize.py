"""Bilinear resizing of saliency maps, shared by every handler that upsamples a coarse map.

Half-pixel centres with clamped edges, i.e. torch's ``interpolate(mode="bilinear",
align_corners=False)`` and Grad-CAM's usual upsampling. OpenCV does the work for a few maps:
one SIMD pass per map, about five times faster than the best numpy gather-and-blend, which
matters on the fast path where upsampling four scales used to cost more than half the
forward pass. Many small maps go through two matrix products instead.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

# Requests already run in parallel on the worker threads; OpenCV's own pool on top of them
# only adds contention (and its small per-call tasks are not worth splitting).
cv2.setNumThreads(1)


# From this many maps on, two batched matrix products beat one cv2.resize per map (measured:
# 128 8×8 grids to 32², 0.08 vs 0.27 ms; 32 to 128², 0.14 vs 0.21 ms; 8 28×28 maps to 224²,
# 0.23 vs 0.09 ms).
_MATRIX_FROM = 16


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


@functools.lru_cache(maxsize=64)
def bilinear_matrix(source: int, target: int) -> np.ndarray:
    """``target × source`` weights of the same interpolation, so that a map ``g`` upsamples
    as ``A @ g @ B.T``. Read-only."""
    low, high, frac = bilinear_taps(source, target)
    weights = np.zeros((target, source), np.float64)
    rows = np.arange(target)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    matrix = weights.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def upsample_bytes(source_height: int, source_width: int, height: int, width: int) -> int:
    """Bytes ``upsample`` holds per map at most: a float32 copy of the map, the product with
    the row weights and the result."""
    return 4 * (source_height * source_width + height * source_width + height * width)


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of N×h×w maps to float32 N×height×width (any N; h, w ≥ 1).

    One ``cv2.resize`` per map for a few maps; for many (DE-CAM's population, RISE's masks)
    ``A @ maps @ B.T`` as batched matrix products, which avoids a Python call per map.
    """
    maps = np.asarray(maps, np.float32)
    if maps.shape[0] >= _MATRIX_FROM:
        rows = bilinear_matrix(maps.shape[1], height)
        columns = bilinear_matrix(maps.shape[2], width)
        return np.ascontiguousarray(rows @ maps @ columns.T, dtype=np.float32)
    out = np.empty((maps.shape[0], height, width), np.float32)
    for index, single in enumerate(maps):
        out[index] = cv2.resize(single, (width, height), interpolation=cv2.INTER_LINEAR)
    return out
