"""RISE and occlusion against straightforward one-input-per-call references on small inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from scipy.ndimage import gaussian_filter, zoom

from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Job
from saliency_service.methods import registry
from saliency_service.methods._utils.resize import upsample
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import method_name
from tests.onnx_models import small_cnn, write_package

SIZE = 20
MEAN, STD = 0.5, 0.25


@pytest.fixture(scope="module")
def handle(tmp_path_factory: pytest.TempPathFactory) -> ModelHandle:
    folder = write_package(small_cnn(classes=4, size=SIZE, seed=3),
                           tmp_path_factory.mktemp("perturbation"), "plain")
    model = ModelHandle("plain", 1, folder)
    model.load()
    assert model.ready, model.error
    return model


def probability(session: ort.InferenceSession, image: np.ndarray, target: int) -> float:
    """One ONNX Runtime call for one image: the softmax probability of ``target``."""
    (logits,) = session.run(["logits"], {"input": image[None].astype(np.float32)})
    exp = np.exp(logits[0].astype(np.float64) - logits[0].max())
    return float(exp[target] / exp.sum())


def run_handler(handle: ModelHandle, method: int, params: dict, inputs: np.ndarray,
                targets: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Job]:
    handler = registry.get(method_name(method))
    job = Job(model=handle, inputs=inputs, targets=targets, seed=seed,
                     params=handler.params(**params))
    return handler.explain(job).raw, job


def test_upsample_matches_scipy_zoom() -> None:
    grids = np.random.default_rng(0).random((40, 5, 7))
    ours = upsample(grids, 33, 21)
    for grid, map_ in zip(grids, ours, strict=True):
        expected = zoom(grid, (33 / 5, 21 / 7), order=1, grid_mode=True, mode="nearest")
        np.testing.assert_allclose(map_, expected, atol=1e-6)


def reference_rise(session: ort.InferenceSession, inputs: np.ndarray, targets: np.ndarray,
                   masks: int, cells: int, keep: float, seed: int) -> np.ndarray:
    """RISE as the paper writes it: one mask, one image, one call at a time."""
    rng = np.random.default_rng(seed)
    height, width = inputs.shape[2:]
    grids = (rng.random((masks, cells, cells)) < keep).astype(np.float64)
    cell_h, cell_w = int(np.ceil(height / cells)), int(np.ceil(width / cells))
    shift_y = rng.integers(0, cell_h, masks)
    shift_x = rng.integers(0, cell_w, masks)
    saliency = np.zeros((inputs.shape[0], height, width))
    for index in range(masks):
        big = zoom(grids[index], ((cells + 1) * cell_h / cells, (cells + 1) * cell_w / cells),
                   order=1, grid_mode=True, mode="nearest")
        mask = big[shift_y[index]:shift_y[index] + height, shift_x[index]:shift_x[index] + width]
        for item, (image, target) in enumerate(zip(inputs, targets, strict=True)):
            saliency[item] += probability(session, image * mask, int(target)) * mask
    return saliency / (masks * keep)


@pytest.mark.parametrize("cells, keep", [(3, 0.5), (4, 0.3)])
def test_rise_equals_the_reference(handle: ModelHandle, cells: int, keep: float) -> None:
    inputs = np.random.default_rng(1).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    targets = np.array([0, 2])
    ours, job = run_handler(handle, pb.METHOD_RISE,
                            {"masks": 40, "cells": cells, "keep_probability": keep},
                            inputs, targets, seed=5)
    expected = reference_rise(handle.session, inputs, targets, 40, cells, keep, seed=5)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    assert job.cost.forward_passes == 40 * 2


def test_rise_is_chunking_invariant_and_seeded(handle: ModelHandle) -> None:
    inputs = np.random.default_rng(2).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    targets = np.array([1, 1, 3])
    params = {"masks": 30, "cells": 5}
    whole, _ = run_handler(handle, pb.METHOD_RISE, params, inputs, targets, seed=9)
    handler = registry.get("rise")
    # A budget of a few images per chunk forces many ONNX Runtime calls.
    job = Job(model=handle, inputs=inputs, targets=targets, seed=9,
              params=handler.params(**params),
              limits={"chunk_memory_bytes": 48 * 3 * SIZE * SIZE * 4 * 7})
    assert job.items_per_chunk() == 7
    np.testing.assert_allclose(handler.explain(job).raw, whole, rtol=1e-5, atol=1e-7)
    other, _ = run_handler(handle, pb.METHOD_RISE, params, inputs, targets, seed=10)
    assert np.abs(other - whole).max() > 1e-4


def reference_occlusion(session: ort.InferenceSession, inputs: np.ndarray,
                        targets: np.ndarray, window: int, stride: int,
                        baseline: np.ndarray) -> np.ndarray:
    """One window, one image, one call at a time; windows flush with the far edge."""
    height, width = inputs.shape[2:]

    def starts(length: int) -> list[int]:
        values = list(range(0, length - window + 1, stride))
        return values if values[-1] + window == length else [*values, length - window]

    result = np.zeros((inputs.shape[0], height, width))
    for item, (image, target) in enumerate(zip(inputs, targets, strict=True)):
        base = probability(session, image, int(target))
        total, count = np.zeros((height, width)), np.zeros((height, width))
        for y in starts(height):
            for x in starts(width):
                occluded = image.copy()
                occluded[:, y:y + window, x:x + window] = baseline[item, :, y:y + window,
                                                                   x:x + window]
                total[y:y + window, x:x + window] += base - probability(session, occluded,
                                                                        int(target))
                count[y:y + window, x:x + window] += 1
        result[item] = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return result


@pytest.mark.parametrize("baseline", ["black", "blur", "mean"])
@pytest.mark.parametrize("window, stride", [(6, 4), (5, 5), (4, 7)])
def test_occlusion_equals_the_reference(handle: ModelHandle, baseline: str, window: int,
                                        stride: int) -> None:
    inputs = np.random.default_rng(4).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    targets = np.array([3, 1])
    if baseline == "black":
        reference_baseline = np.full_like(inputs, (0.0 - MEAN) / STD)
    elif baseline == "blur":
        reference_baseline = gaussian_filter(inputs, sigma=(0, 0, SIZE / 16, SIZE / 16),
                                             mode="nearest")
    else:
        reference_baseline = np.broadcast_to(inputs.mean(axis=(2, 3), keepdims=True),
                                             inputs.shape)
    ours, _ = run_handler(handle, pb.METHOD_OCCLUSION,
                          {"window": window, "stride": stride, "baseline": baseline},
                          inputs, targets)
    expected = reference_occlusion(handle.session, inputs, targets, window, stride,
                                   reference_baseline)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    if stride > window:  # pixels no window covers carry no evidence: 0, not 0/0
        assert np.isfinite(ours).all()
        assert (ours[:, window:stride, :] == 0).all()


def test_rise_rejects_bad_params(handle: ModelHandle) -> None:
    from saliency_service.core.errors import InvalidInput  # noqa: PLC0415

    inputs = np.zeros((1, 3, SIZE, SIZE), np.float32)
    for params, named in [({"masks": 0}, "masks"), ({"cells": 0}, "cells"),
                          ({"keep_probability": 1.0}, "keep_probability"),
                          ({"keep_probability": 0.0}, "keep_probability")]:
        with pytest.raises(InvalidInput, match=named):
            run_handler(handle, pb.METHOD_RISE, params, inputs, np.array([0]))
