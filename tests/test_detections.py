"""Detections and regions as arrays (``core.detections``) and the generated scenes
(``evaluation.scenes``): decoding, NMS, matching a client's target, target scores, and the
errors a client gets for a bad target."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from saliency_service.core import detections as det
from saliency_service.core.errors import InvalidInput
from saliency_service.evaluation import scenes

LABELS = ("disc", "checks", "stripes")


def detections(boxes: list[list[float]], scores: list[float], classes: list[int],
               class_count: int = 3) -> det.Detections:
    labels = np.asarray(classes, np.int64)
    return det.Detections(np.asarray(boxes, np.float32), np.asarray(scores, np.float32),
                          labels, np.asarray(scores, np.float32),
                          det.one_hot(labels, class_count))


def test_box_iou_of_known_boxes() -> None:
    first = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    second = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(det.box_iou(first, second),
                               [[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float,
                    classes: np.ndarray) -> list[int]:
    """Greedy NMS written out: walk by score, keep what no kept box of its class covers."""
    kept: list[int] = []
    for index in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if all(classes[index] != classes[other]
               or det.box_iou(boxes[index], boxes[other])[0, 0] <= threshold for other in kept):
            kept.append(index)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_the_greedy_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 40, (30, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 20, (30, 2))], axis=1)
    scores = rng.random(30)
    classes = rng.integers(0, 2, 30)
    assert det.nms(boxes, scores, 0.4, classes).tolist() == brute_force_nms(
        boxes, scores, 0.4, classes)
    agnostic = det.nms(boxes, scores, 0.4)
    assert agnostic.tolist() == brute_force_nms(boxes, scores, 0.4, np.zeros(30, int))


def test_decode_grid_places_boxes_in_their_cells() -> None:
    raw = np.zeros((1, 5 + 3, 2, 2), np.float32)
    raw[0, 0] = [[4.0, -4.0], [-4.0, -4.0]]  # objectness: only cell (0, 0) is sure
    raw[0, 3, 1, 1] = np.log(2.0)  # cell (1, 1) twice the anchor wide
    raw[0, 5 + 2, 0, 0] = 3.0  # cell (0, 0) says "stripes"
    (found,) = det.decode_grid(raw, stride=8, anchor=10)
    # σ(0) = 0.5: centres at the cells' middles.
    np.testing.assert_allclose(found.boxes, [[-1, -1, 9, 9], [7, -1, 17, 9], [-1, 7, 9, 17],
                                             [2, 7, 22, 17]], atol=1e-5)
    probability = np.exp(3.0) / (np.exp(3.0) + 2)
    assert found.classes[0] == 2
    np.testing.assert_allclose(found.scores[0], probability / (1 + np.exp(-4.0)), rtol=1e-6)
    np.testing.assert_allclose(found.class_probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_select_thresholds_then_suppresses_per_class() -> None:
    found = detections([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [30, 30, 40, 40]],
                       [0.9, 0.8, 0.7, 0.2], [0, 0, 1, 0])
    assert det.select_indices(found, 0.3, 0.5, 10).tolist() == [0, 2]
    assert det.select_indices(found, 0.1, 0.5, 2).tolist() == [0, 2]
    assert len(det.select(found, 0.95, 0.5, 10)) == 0


def test_post_nms_outputs_drop_padding_rows() -> None:
    boxes = np.array([[[0, 0, 5, 5], [1, 1, 4, 4], [0, 0, 0, 0]]], np.float32)
    (found,) = det.from_post_nms(boxes, np.array([[0.9, 0.4, 0.0]]), np.array([[2, 0, -1]]), 3)
    assert found.classes.tolist() == [2, 0]
    np.testing.assert_array_equal(found.class_probabilities, [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(InvalidInput, match="class 5 but declares 3 classes"):
        det.from_post_nms(boxes, np.array([[0.9, 0.4, 0.0]]), np.array([[5, 0, -1]]), 3)
    with pytest.raises(InvalidInput, match="boxes N×M×4"):
        det.from_post_nms(boxes[0], np.array([0.9]), np.array([2]), 3)


@pytest.mark.parametrize(("box", "message"), [
    ([10, 10, 70, 20], r"box \[10, 10, 70, 20\] lies outside the 64×64 model input"),
    ([-1, 0, 5, 5], "lies outside"),
    ([10, 10, 10, 20], r"box \[10, 10, 10, 20\] is empty: give x1 < x2 and y1 < y2"),
    ([1, 2, 3], "a box is 4 finite numbers"),
    ([0, 0, float("nan"), 4], "a box is 4 finite numbers"),
])
def test_a_bad_box_names_what_to_change(box: list[float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        det.check_box(box, 64, 64)


def test_a_box_on_the_border_is_inside() -> None:
    np.testing.assert_array_equal(det.check_box([0, 0, 64, 48], 48, 64), [0, 0, 64, 48])


def test_a_class_the_model_lacks_lists_its_classes() -> None:
    assert det.check_class("checks", LABELS) == 1
    assert det.check_class(2, LABELS) == 2
    with pytest.raises(InvalidInput, match=r"no class 'car'; its classes are 0 disc, 1 checks"):
        det.check_class("car", LABELS)
    with pytest.raises(InvalidInput, match=r"class 3 is not one of the model's 3 classes"):
        det.check_class(3, LABELS)


def test_a_target_box_matches_its_detection_by_iou_and_class() -> None:
    found = detections([[0, 0, 10, 10], [20, 20, 30, 30], [22, 20, 32, 30]], [0.9, 0.8, 0.6],
                       [0, 1, 2])
    assert det.match_detection(found, np.array([1, 0, 11, 10], np.float32), 0, LABELS) == 0
    assert det.match_detection(found, np.array([21, 20, 31, 30], np.float32), 2, LABELS) == 2


def test_no_matching_detection_names_the_nearest() -> None:
    found = detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 1])
    with pytest.raises(InvalidInput, match=(
            r"no 'disc' detection overlaps box \[20, 20, 30, 30\] with IoU >= 0.5: the "
            r"nearest detection is 'checks' at \[20, 20, 30, 30\] \(IoU 1.00\); the best "
            r"'disc' has IoU 0.00. Use a box and class from Predict's detections")):
        det.match_detection(found, np.array([20, 20, 30, 30], np.float32), 0, LABELS)
    with pytest.raises(InvalidInput, match="the model detects nothing in this image"):
        det.match_detection(found.take(np.array([], int)), np.array([0, 0, 4, 4]), 0, LABELS)


def test_every_detection_above_a_score() -> None:
    found = detections([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.5, 0.7],
                       [0, 1, 2])
    assert det.detections_above(found, 0.6).tolist() == [0, 2]
    with pytest.raises(InvalidInput, match=r"no detection scores at least 0.95 \(the best "
                                           r"scores 0.90\): lower the minimum score"):
        det.detections_above(found, 0.95)
    with pytest.raises(InvalidInput, match="detects nothing"):
        det.detections_above(found.take(np.array([], int)), 0.5)


def test_drise_similarity_is_iou_times_cosine_times_objectness() -> None:
    vectors = np.array([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]], np.float32)
    proposals = det.Detections(np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32),
                               np.array([0.5, 0.5], np.float32), np.array([1, 0]),
                               np.array([0.5, 0.9], np.float32), vectors)
    target = np.array([0, 0, 10, 10], np.float32)
    weights = det.drise_similarity(target, np.array([1.0, 0.0, 0.0]),
                                   [proposals, proposals.take(np.array([], int))])
    # Proposal 0: IoU 1 × cos 0.6 × 0.5 = 0.30; proposal 1: IoU 0.5 × cos 1 × 0.9 = 0.45.
    np.testing.assert_allclose(weights, [0.45, 0.0])


def test_segmentation_score_and_regions() -> None:
    logits = np.zeros((2, 3, 4, 4), np.float32)
    logits[:, 1, :2, :2] = 2.0
    logits[1, 1, 3, 3] = 5.0
    region = det.region_from_box(np.array([0, 0, 2, 2], np.float32), 4, 4)
    assert region.sum() == 4 and region[:2, :2].all()
    np.testing.assert_allclose(det.segmentation_score(logits, 1, region), [8.0, 8.0])
    predicted = det.predicted_region(logits[1], 1, LABELS)
    assert predicted.sum() == 5
    with pytest.raises(InvalidInput, match="no pixel is predicted as 'stripes'"):
        det.predicted_region(logits[0], 2, LABELS)
    with pytest.raises(InvalidInput, match="a region mask is 4×4"):
        det.check_region(np.ones((3, 4)), 4, 4)
    with pytest.raises(InvalidInput, match="selects no pixel"):
        det.check_region(np.zeros((4, 4)), 4, 4)


# ---- scenes ----------------------------------------------------------------------------------


def test_scenes_are_reproducible_and_addressable() -> None:
    whole = scenes.generate(6, scenes.SceneConfig(seed=3))
    tail = scenes.generate(2, scenes.SceneConfig(seed=3), start=4)
    np.testing.assert_array_equal(whole.images[4:], tail.images)
    np.testing.assert_array_equal(whole.scenes[5].boxes, tail.scenes[1].boxes)
    other = scenes.generate(6, scenes.SceneConfig(seed=4))
    assert not np.array_equal(whole.images, other.images)


def test_scene_objects_have_exact_masks_tight_boxes_and_a_class_map() -> None:
    config = scenes.SceneConfig(size=64, seed=0)
    batch = scenes.generate(40, config)
    counts = [len(scene.classes) for scene in batch.scenes]
    assert min(counts) >= 1 and max(counts) <= config.max_objects and len(set(counts)) > 2
    assert set(np.concatenate([s.classes for s in batch.scenes]).tolist()) == {0, 1, 2}
    for scene, class_map in zip(batch.scenes, batch.class_maps, strict=True):
        assert scene.masks.sum(axis=0).max() == 1  # objects never overlap
        for box, label, mask in zip(scene.boxes, scene.classes, scene.masks, strict=True):
            x1, y1, x2, y2 = box.astype(int)
            assert mask[y1:y2, x1:x2].sum() == mask.sum()  # the mask lies in its box
            assert mask[y1].any() and mask[y2 - 1].any() and mask[:, x1].any() \
                and mask[:, x2 - 1].any()  # and the box is tight
            assert (class_map[mask] == label + 1).all()
            assert 0.15 * 64 <= x2 - x1 <= 0.35 * 64
        assert (class_map[~scene.masks.any(axis=0)] == scenes.BACKGROUND).all()
    assert pairwise_iou_max(batch) == 0.0


def pairwise_iou_max(batch: scenes.SceneBatch) -> float:
    best = 0.0
    for scene in batch.scenes:
        for first, second in itertools.combinations(range(len(scene.boxes)), 2):
            best = max(best, float(det.box_iou(scene.boxes[first], scene.boxes[second])[0, 0]))
    return best


def test_scene_config_is_checked() -> None:
    with pytest.raises(ValueError, match="too small"):
        scenes.generate(1, scenes.SceneConfig(size=16))
    with pytest.raises(ValueError, match="object sides"):
        scenes.generate(1, scenes.SceneConfig(min_side=0.4, max_side=0.3))


def test_map_and_miou_of_perfect_and_imperfect_predictions() -> None:
    batch = scenes.generate(10, scenes.SceneConfig(seed=1))
    perfect = [(s.boxes, np.ones(len(s.boxes), np.float32), s.classes) for s in batch.scenes]
    assert scenes.mean_average_precision(perfect, batch.scenes) == pytest.approx(1.0)
    # A confident false positive in front of every true box halves precision at each recall.
    shifted = [(np.concatenate([s.boxes + 40, s.boxes]),
                np.concatenate([np.full(len(s.boxes), 2.0), np.ones(len(s.boxes))]),
                np.concatenate([s.classes, s.classes])) for s in batch.scenes]
    degraded = scenes.mean_average_precision(shifted, batch.scenes)
    assert 0.3 < degraded < 0.9
    assert scenes.mean_iou(batch.class_maps, batch.class_maps) == 1.0
    empty = np.zeros_like(batch.class_maps)
    assert scenes.mean_iou(empty, batch.class_maps) < 0.3
