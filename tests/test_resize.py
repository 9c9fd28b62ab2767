"""methods._utils.resize.upsample against torch's bilinear interpolation (align_corners=False)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional

from saliency_service.methods._utils.resize import upsample


def torch_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return functional.interpolate(torch.from_numpy(maps).unsqueeze(1), size=size,
                                  mode="bilinear", align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize(
    "count, size_in, size_out",
    [(2, (7, 7), (224, 224)), (2, (3, 5), (32, 40)), (2, (8, 8), (8, 8)),
     (3, (16, 16), (32, 32)), (1, (14, 14), (224, 224)), (2, (1, 1), (5, 5)),
     (2, (1, 7), (5, 9)), (2, (64, 64), (20, 30)), (200, (4, 4), (16, 16))])
def test_upsample_equals_torch_bilinear(count: int, size_in: tuple[int, int],
                                        size_out: tuple[int, int]) -> None:
    maps = np.random.default_rng(0).random((count, *size_in)).astype(np.float32)
    out = upsample(maps, *size_out)
    assert out.dtype == np.float32 and out.shape == (count, *size_out)
    np.testing.assert_allclose(out, torch_bilinear(maps, size_out), rtol=1e-5, atol=1e-5)


def test_upsample_accepts_float64_and_leaves_its_input_alone() -> None:
    maps = np.random.default_rng(1).random((2, 4, 6))
    before = maps.copy()
    out = upsample(maps, 8, 12)
    np.testing.assert_array_equal(maps, before)
    np.testing.assert_allclose(out, torch_bilinear(maps.astype(np.float32), (8, 12)),
                               rtol=1e-5, atol=1e-6)
