"""The evaluation metrics on hand-made cases with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from saliency_service.evaluation import metrics
from saliency_service.evaluation.cells import CellConfig, generate

SIZE = 48


@pytest.fixture(scope="module")
def cells():
    batch = generate(20, CellConfig(size=SIZE, seed=5))
    keep = batch.masks.reshape(20, -1).any(axis=1)  # drop blank images: no object to find
    return batch.heatmaps[keep], batch.masks[keep]


def test_stratify_puts_each_threshold_in_the_lower_band() -> None:
    values = np.array([-1.0, -0.7, -0.5, -0.3, 0.0, 0.3, 0.4, 0.7, 0.9])
    assert metrics.stratify(values, metrics.FIVE_BAND_THRESHOLDS).tolist() == [
        -2, -2, -1, -1, 0, 0, 1, 1, 2]


def test_ground_truth_scores_the_top_marks(cells) -> None:
    heatmaps, masks = cells
    scores = metrics.five_band(heatmaps, heatmaps)
    # Normalizing 0.4/0.9 by the max keeps 0.44 in band 1 and 1.0 in band 2.
    np.testing.assert_allclose(scores["pixel_accuracy"], 1.0)
    np.testing.assert_allclose(scores["precision"], 1.0, atol=1e-5)
    np.testing.assert_allclose(scores["recall"], 1.0, atol=1e-5)
    np.testing.assert_allclose(scores["fpr"], 0.0)
    soft = metrics.soft_five_band(heatmaps, heatmaps)
    np.testing.assert_allclose(soft["precision_best"], 1.0, atol=1e-5)
    np.testing.assert_allclose(soft["pixel_accuracy_best"], 1.0)
    np.testing.assert_allclose(metrics.relevance_mass(heatmaps, masks), 1.0)
    np.testing.assert_allclose(metrics.relevance_rank(heatmaps, masks), 1.0)
    np.testing.assert_allclose(metrics.pointing_game(heatmaps, masks), 1.0)


def test_constant_and_random_maps_score_low(cells) -> None:
    heatmaps, masks = cells
    object_share = masks.mean(axis=(1, 2))
    for maps in (np.full(heatmaps.shape, 0.5, np.float32),
                 np.random.default_rng(0).random(heatmaps.shape).astype(np.float32)):
        scores = metrics.five_band(maps, heatmaps)
        assert scores["precision"].mean() < 0.15
        assert scores["pixel_accuracy"].mean() < 0.5
        assert scores["fpr"].mean() > 0.3
        mass = metrics.relevance_mass(maps, masks)
        assert mass.mean() < 0.25
        np.testing.assert_allclose(mass, object_share, atol=0.05)  # chance level
        assert metrics.relevance_rank(maps, masks).mean() < 0.25
    # A flat map "points" everywhere: the expected hit is the object's share of the image.
    flat = np.full(heatmaps.shape, 0.5, np.float32)
    np.testing.assert_allclose(metrics.pointing_game(flat, masks), object_share)


def test_soft_five_band_rewards_a_faint_but_well_placed_map(cells) -> None:
    heatmaps, _ = cells
    # Object at 0.25 and evidence at 1: band 0 for the object at first, band 1 once the
    # threshold has moved below 0.25 — the soft score sees it, the hard score does not.
    faint = np.where(heatmaps > 0.5, 1.0, np.where(heatmaps > 0, 0.25, 0.0))
    hard = metrics.five_band(faint, heatmaps)
    soft = metrics.soft_five_band(faint, heatmaps)
    assert (soft["recall_best"] > hard["recall"] + 0.2).all()
    assert (soft["recall_mean"] > hard["recall"]).all()
    np.testing.assert_allclose(soft["recall_best"], 1.0, atol=1e-5)


def test_masks_metrics_are_undefined_without_an_object() -> None:
    maps = np.random.default_rng(1).random((2, 8, 8))
    masks = np.zeros((2, 8, 8), bool)
    masks[1, 2:4, 2:4] = True
    for score in (metrics.relevance_mass(maps, masks), metrics.relevance_rank(maps, masks),
                  metrics.pointing_game(maps, masks)):
        assert np.isnan(score[0]) and not np.isnan(score[1])


def texture_model(mask: np.ndarray, path: Path) -> metrics.OnnxClassifier:
    """A hand-made ONNX classifier that sees bright texture: relu(x - 0.5), then
    logit 0 = 40 × its mean on the object and logit 1 = 40 × its mean off the object.

    Black pixels and a blurred (grey) texture carry no evidence; the original texture on the
    object alone makes class 0 near certain, on the background alone class 1.
    """
    height, width = mask.shape
    inside = np.repeat(mask[None].astype(np.float32), 3, axis=0).reshape(-1)
    weights = np.stack([40 * inside / inside.sum(), 40 * (1 - inside) / (1 - inside).sum()], 1)
    graph = helper.make_graph(
        [helper.make_node("Sub", ["input", "half"], ["centred"]),
         helper.make_node("Relu", ["centred"], ["bright"]),
         helper.make_node("Flatten", ["bright"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weights.astype(np.float32), "weights"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return metrics.OnnxClassifier(session, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  batch_size=7)


@pytest.fixture
def scene(tmp_path: Path):
    mask = np.zeros((24, 24), bool)
    mask[6:14, 8:18] = True
    model = texture_model(mask, tmp_path / "texture.onnx")
    images = np.random.default_rng(3).integers(0, 2, (3, 24, 24, 3)).astype(np.float32)
    jitter = np.random.default_rng(2).random((3, 24, 24)) * 0.1
    on_object = np.where(mask, 0.9, 0.1)[None] + jitter  # graded, not flat
    on_background = 1.0 - on_object
    return model, images, on_object, on_background, np.zeros(3, np.int64)


def test_rcap_prefers_the_map_on_the_object(scene) -> None:
    model, images, on_object, on_background, targets = scene
    good = metrics.rcap(images, on_object, targets, model)
    bad = metrics.rcap(images, on_background, targets, model)
    # The top levels keep few pixels, so hit rates (and RCAP ≤ their mean) stay well below 1.
    assert (good > 0.3).all() and (bad < 0.05).all()
    # And the model ran once per level per image, in batches of 7.
    assert (good <= 1.0).all()
    assert model.forward_passes == 2 * 3 * len(metrics.RCAP_PERCENTILES)


def test_rcap_of_a_flat_map_is_zero(scene) -> None:
    model, images, on_object, _, targets = scene
    flat = np.full_like(on_object, 0.7)
    np.testing.assert_array_equal(metrics.rcap(images, flat, targets, model), 0.0)
    np.testing.assert_array_equal(metrics.rcap(images, np.zeros_like(flat), targets, model), 0.0)


def test_rcap_matches_a_one_image_reading_of_the_paper(scene) -> None:
    model, images, on_object, _, targets = scene
    s, image = on_object[0], images[0]
    expected = []
    for p in metrics.RCAP_PERCENTILES:
        keep = s > np.sort(s.ravel())[int(s.size * p) - 1]
        hit = s[keep].sum() / s.sum()
        probability = model((image * keep[..., None])[None])[0, 0]
        expected.append(hit * probability)
    np.testing.assert_allclose(metrics.rcap(images[:1], on_object[:1], targets[:1], model),
                               np.mean(expected), rtol=1e-5)


def test_deletion_and_insertion_rank_the_ideal_map_above_its_inverse(scene) -> None:
    model, images, on_object, on_background, targets = scene
    # Deleting the object first kills class 0 at once: a low area is good.
    ideal = metrics.deletion_auc(images, on_object, targets, model)
    inverse = metrics.deletion_auc(images, on_background, targets, model)
    assert (ideal + 0.2 < inverse).all()
    ideal_in = metrics.insertion_auc(images, on_object, targets, model)
    inverse_in = metrics.insertion_auc(images, on_background, targets, model)
    assert (ideal_in > inverse_in + 0.2).all()
    assert ((ideal >= 0) & (ideal <= 1) & (inverse_in >= 0) & (inverse_in <= 1)).all()


def test_resize_nearest_keeps_levels() -> None:
    heat = np.zeros((1, 10, 10), np.float32)
    heat[0, 2:6, 2:6] = 0.4
    heat[0, 3:5, 3:5] = 0.9
    small = metrics.resize_nearest(heat, 5, 5)
    assert small.shape == (1, 5, 5)
    np.testing.assert_allclose(np.unique(small), np.array([0.0, 0.4, 0.9], np.float32))
    assert metrics.resize_nearest(heat, 10, 10) is heat
