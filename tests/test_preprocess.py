"""Pixel preprocessing: the table lookup gives exactly the per-pixel affine map."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.core.repository import InputSpec
from saliency_service.protocol.inputs import preprocess_pixels


def per_pixel(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The formula written out: scale to the value range, normalize, channels first."""
    low, high = spec.value_range
    scaled = pixels.astype(np.float32) / np.float32(255.0) * np.float32(high - low)
    scaled = scaled + np.float32(low)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return ((scaled - mean) / std).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(shape=(-1, 3, 17, 23), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        InputSpec(shape=(-1, 3, 17, 23), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1),
                  value_range=(-1.0, 1.0)),
        InputSpec(shape=(-1, 1, 17, 23), mean=(0.1,), std=(0.3,), value_range=(0.0, 255.0)),
    ],
)
def test_table_lookup_equals_the_per_pixel_formula_bit_for_bit(spec: InputSpec) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 17, 23, spec.channels), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255  # both ends of the table
    got = preprocess_pixels(pixels, spec)
    assert got.dtype == np.float32 and got.shape == (4, spec.channels, 17, 23)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, per_pixel(pixels, spec))
