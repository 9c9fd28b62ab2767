"""DE-CAM on a model whose class is the colour of one uniform object.

Blurring a large uniform object keeps its colour, so the blur baseline cannot remove what
decides such a class: DE-CAM at ``baseline: blur`` used to return all-zero maps here. The
model is linear in the image's total redness (blur keeps it), built with ``onnx.helper``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from saliency_service.core.repository import InputSpec, ModelHandle
from saliency_service.core.request import Job
from saliency_service.evaluation.metrics import pointing_game, relevance_mass
from saliency_service.methods import registry
from saliency_service.methods._utils.baselines import (
    LEAST_SCORE_CANDIDATES,
    least_score_baseline,
    make_baseline,
)
from saliency_service.protocol.inputs import preprocess_pixels
from tests.onnx_models import IR_VERSION, OPSET, write_package

SIZE = 32
GAIN = 0.05


def redness_model(size: int = SIZE, gain: float = GAIN) -> onnx.ModelProto:
    """Class 0's logit is ``gain`` × Σ (R − (G + B) / 2) over the whole image, class 1's 0:
    a grey pixel adds nothing, a red one adds, wherever it is."""
    weights = np.zeros((2, 3, size, size), np.float32)
    weights[0, 0], weights[0, 1], weights[0, 2] = gain, -gain / 2, -gain / 2
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1)],
        "redness",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weights.reshape(2, -1), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def red_squares(count: int = 3, side: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grey images with one red square each (at a different place), and its mask."""
    rng = np.random.default_rng(0)
    images = np.full((count, SIZE, SIZE, 3), 128, np.uint8)
    masks = np.zeros((count, SIZE, SIZE), bool)
    for index in range(count):
        y, x = rng.integers(1, SIZE - side - 1, 2)
        images[index, y:y + side, x:x + side] = (217, 38, 38)
        masks[index, y:y + side, x:x + side] = True
    return images, masks


@pytest.fixture(scope="module")
def handle(tmp_path_factory: pytest.TempPathFactory) -> ModelHandle:
    root = tmp_path_factory.mktemp("redness")
    write_package(redness_model(), root, "redness")
    loaded = ModelHandle("redness", 1, root / "redness" / "1")
    loaded.load()
    return loaded


def decam_maps(handle: ModelHandle, images: np.ndarray, **params: object,
               ) -> tuple[np.ndarray, Job, dict[str, float]]:
    x = preprocess_pixels(images, handle.spec().input)
    (logits,) = handle.run(x)
    handler = registry.get("decam")
    job = Job(model=handle, inputs=x, targets=np.zeros(len(x), np.int64),
              params=handler.params(None, **params), base_logits=logits, seed=0)
    result = handler.explain(job)
    return result.maps, job, result.diagnostics


def test_blur_keeps_the_colour_that_decides_and_the_desaturated_blur_removes_it(
        handle: ModelHandle) -> None:
    images, _ = red_squares(1)
    x = preprocess_pixels(images, handle.spec().input)
    spec = handle.spec().input
    logit = {kind: float(handle.run(make_baseline(kind, x, spec))[0][0, 0])
             for kind in ("blur", "desaturated_blur", "mean", "zero")}
    original = float(handle.run(x)[0][0, 0])
    assert logit["blur"] == pytest.approx(original, rel=0.05)
    assert abs(logit["desaturated_blur"]) < 1e-3 * original
    assert abs(logit["zero"]) < 1e-3 * original


def test_desaturated_blur_is_grey_in_pixel_space() -> None:
    spec = InputSpec(shape=(-1, 3, 8, 8), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))
    inputs = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    grey = make_baseline("desaturated_blur", inputs, spec)
    pixels = grey * np.asarray(spec.std).reshape(1, -1, 1, 1) + np.asarray(
        spec.mean).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    np.testing.assert_allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)


def test_least_score_baseline_picks_the_candidate_that_lowers_the_target_most(
        handle: ModelHandle) -> None:
    images, _ = red_squares(2)
    x = preprocess_pixels(images, handle.spec().input)
    job = Job(model=handle, inputs=x, targets=np.zeros(2, np.int64),
              params=None, base_logits=None, seed=0)
    baseline, choice = least_score_baseline(job)
    assert job.cost.forward_passes == 2 * len(LEAST_SCORE_CANDIDATES)
    assert all(LEAST_SCORE_CANDIDATES[c] != "blur" for c in choice)
    assert (handle.run(baseline)[0][:, 0] < 0.01 * handle.run(x)[0][:, 0]).all()


def test_default_decam_finds_a_uniform_colour_object(handle: ModelHandle) -> None:
    images, masks = red_squares(3)
    maps, job, _ = decam_maps(handle, images)
    assert (maps.reshape(3, -1).max(axis=1) > 0).all()
    assert relevance_mass(maps, masks).mean() > 3 * masks.mean()
    assert pointing_game(maps, masks).mean() == 1.0
    assert job.cost.forward_passes <= 3 * (2048 + len(LEAST_SCORE_CANDIDATES))


def test_blur_baseline_map_is_never_all_zero(handle: ModelHandle) -> None:
    """Blur cannot remove the evidence here, so the search's fitness is the sparsity penalty
    and its covariance with every pixel is negative; the map falls back to the best mask
    instead of clipping to zeros."""
    images, _ = red_squares(3)
    maps, _, _ = decam_maps(handle, images, baseline="blur")
    assert (maps.reshape(3, -1).max(axis=1) > 0).all()
    assert ((maps > 0).reshape(3, -1).mean(axis=1) > 1 / 64).all()


def test_least_score_baseline_counts_in_the_pass_budget(handle: ModelHandle) -> None:
    images, _ = red_squares(2)
    _, job, _ = decam_maps(handle, images, baseline="least_score", max_forward_passes=120,
                           population=8)
    # The prediction (1 of the 120) ran before the job; a pass left over from a generation
    # of two-pass candidates stays unspent.
    assert 2 * (120 - 2) <= job.cost.forward_passes <= 2 * (120 - 1)


def small_red_squares(count: int = 4, side: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Grey images with one red square smaller than a grid-8 cell (4 px at 32²), each
    straddling a cell border, so the cells it touches are mostly grey."""
    rng = np.random.default_rng(1)
    images = np.full((count, SIZE, SIZE, 3), 128, np.uint8)
    masks = np.zeros((count, SIZE, SIZE), bool)
    for index in range(count):
        y, x = 4 * rng.integers(1, SIZE // 4 - 1, 2) - 1  # a cell border runs through it
        images[index, y:y + side, x:x + side] = (217, 38, 38)
        masks[index, y:y + side, x:x + side] = True
    return images, masks


def test_changed_pixels_put_a_cells_evidence_on_the_object_inside_it(
        handle: ModelHandle) -> None:
    """The search resolves cells; within a cell only the pixels the baseline changes can
    carry its effect, so the map peaks on an object smaller than a cell rather than on the
    grey around it, and puts more of its mass there than the even spread."""
    images, masks = small_red_squares()
    changed, _, _ = decam_maps(handle, images)
    even, _, _ = decam_maps(handle, images, spread="bilinear")
    assert pointing_game(changed, masks).mean() == 1.0
    assert relevance_mass(changed, masks).mean() > 2 * relevance_mass(even, masks).mean()


def test_spread_keeps_each_cells_total_and_equals_bilinear_for_an_even_change() -> None:
    from saliency_service.methods._utils.resize import upsample  # noqa: PLC0415
    from saliency_service.methods.decam import spread_over_changed  # noqa: PLC0415

    rng = np.random.default_rng(0)
    grids = rng.normal(size=(2, 8, 6)).astype(np.float32)
    even = spread_over_changed(grids, np.full((2, 40, 30), 0.7, np.float32))
    np.testing.assert_allclose(even, upsample(grids, 40, 30), atol=1e-5)
    change = rng.random((2, 40, 30)).astype(np.float32)
    change[:, :5] = 0.0  # pixels the baseline equals
    spread = spread_over_changed(grids, change, floor=0.0)
    assert (spread[:, :5] == 0).all()
    np.testing.assert_allclose(spread.sum(axis=(1, 2)),
                               grids.sum(axis=(1, 2)) * 40 * 30 / (8 * 6), rtol=1e-4)
    # A cell the baseline barely touches, but for one pixel, spreads its value nearly
    # evenly: that pixel does not take the cell (the floor is a tenth of the mean change).
    lone = np.ones((1, 40, 40), np.float32)
    lone[0, 20:, 20:] = 0.0
    lone[0, 30, 30] = 0.05
    cells = np.zeros((1, 4, 4), np.float32)
    cells[0, 3, 3] = 1.0
    spread = spread_over_changed(cells, lone)
    assert spread[0, 30, 30] < 3 * np.median(spread[0, 32:, 32:])


def test_an_object_smaller_than_a_cell_on_an_untouched_background_is_not_a_failed_search(
        handle: ModelHandle) -> None:
    """With the ``zero`` baseline and a background exactly at the dataset mean, only the
    object's 4 pixels change; the map is on those pixels, not the best-mask fallback that a
    map covering less than one cell (16 pixels here) gets when the search found nothing."""
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    masks = np.zeros((2, SIZE, SIZE), bool)
    for index, (y, col) in enumerate(((5, 9), (20, 14))):
        x[index, :, y:y + 2, col:col + 2] = np.array([1.5, -1.5, -1.5])[:, None, None]
        masks[index, y:y + 2, col:col + 2] = True
    (logits,) = handle.run(x)
    handler = registry.get("decam")
    job = Job(model=handle, inputs=x, targets=np.zeros(2, np.int64), base_logits=logits,
              params=handler.params(None, baseline="zero"), seed=0)
    result = handler.explain(job)
    assert "best_mask_fallbacks" not in result.diagnostics
    assert relevance_mass(result.maps, masks).min() > 0.9
    assert pointing_game(result.maps, masks).min() == 1.0
