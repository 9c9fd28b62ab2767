"""The synthetic cell dataset: determinism, slicing, ground truth and per-class appearance.

Speed, measured on a 2-core CPU: ``generate(10_000)`` at 128×128 takes 5.3–5.8 s (one core),
so the whole evaluation set can be regenerated on demand instead of being stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from saliency_service.evaluation import cells
from saliency_service.evaluation.cells import (
    BACKGROUNDS,
    CLASS_NAMES,
    HELD_OUT_CONFIG,
    TEST_CONFIG,
    TRAIN_CONFIG,
    CellBatch,
    CellConfig,
    generate,
)

FIELDS = ("images", "labels", "heatmaps", "masks", "backgrounds")
BLANK = CLASS_NAMES.index("blank")


@pytest.fixture(scope="module")
def batch() -> CellBatch:
    """Sixty images at 96 px: every class six times, every background several times."""
    return generate(60, CellConfig(size=96))


def assert_same(first: CellBatch, second: CellBatch) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)


def test_class_names_follow_the_paper_order() -> None:
    assert CLASS_NAMES == (
        "round_cell",
        "cell_with_bar",
        "bar_and_pole",
        "red_rectangle",
        "green_rectangle",
        "blue_rectangle",
        "one_tail",
        "three_tails",
        "eight_tails",
        "blank",
    )


def test_same_seed_gives_identical_arrays_and_another_seed_does_not() -> None:
    config = CellConfig(size=64, seed=7)
    assert_same(generate(20, config), generate(20, config))
    other = generate(20, dataclasses.replace(config, seed=8))
    assert not np.array_equal(generate(20, config).images, other.images)


def test_a_slice_equals_the_same_images_of_a_longer_run() -> None:
    whole = generate(15)
    part = generate(10, start=5)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[5:])


def test_output_does_not_depend_on_internal_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    config = CellConfig(size=48, seed=3)
    reference = generate(23, config, start=11)
    monkeypatch.setattr(cells, "_PIXELS_PER_CHUNK", 48 * 48 * 4)  # four images per chunk
    assert_same(generate(23, config, start=11), reference)


def test_shapes_dtypes_and_value_sets(batch: CellBatch) -> None:
    assert batch.images.shape == (60, 96, 96, 3) and batch.images.dtype == np.uint8
    assert batch.labels.shape == (60,) and batch.labels.dtype == np.int64
    assert batch.heatmaps.shape == (60, 96, 96) and batch.heatmaps.dtype == np.float32
    assert batch.masks.shape == (60, 96, 96) and batch.masks.dtype == np.bool_
    assert batch.backgrounds is not None and batch.backgrounds.dtype == np.int64
    assert set(np.unique(batch.heatmaps).tolist()) == {0.0, np.float32(0.4), np.float32(0.9)}
    assert set(np.unique(batch.labels).tolist()) == set(range(10))


def test_labels_are_balanced_in_every_aligned_block_of_ten() -> None:
    labels = generate(100, CellConfig(size=16)).labels
    for block in labels.reshape(10, 10):
        assert sorted(block.tolist()) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:20]), "blocks should be shuffled"


def test_blank_images_have_no_ground_truth(batch: CellBatch) -> None:
    blank = batch.labels == BLANK
    assert blank.sum() == 6
    assert not batch.heatmaps[blank].any()
    assert not batch.masks[blank].any()


def test_objects_have_a_discriminative_part_inside_their_mask(batch: CellBatch) -> None:
    for image in np.flatnonzero(batch.labels != BLANK):
        heatmap, mask = batch.heatmaps[image], batch.masks[image]
        assert (heatmap == np.float32(0.9)).sum() >= 10, CLASS_NAMES[batch.labels[image]]
        assert (heatmap == np.float32(0.4)).sum() >= 10, CLASS_NAMES[batch.labels[image]]
        np.testing.assert_array_equal(heatmap > 0, mask)


@pytest.mark.parametrize(
    ("name", "channel"), [("red_rectangle", 0), ("green_rectangle", 1), ("blue_rectangle", 2)]
)
def test_rectangle_border_colour_fills_its_channel(
    batch: CellBatch, name: str, channel: int
) -> None:
    for image in np.flatnonzero(batch.labels == CLASS_NAMES.index(name)):
        border = batch.images[image][batch.heatmaps[image] == np.float32(0.9)].astype(float)
        means = border.mean(axis=0)
        others = np.delete(means, channel)
        assert means[channel] >= 150 and (others <= 55).all(), (name, means)


@pytest.mark.parametrize(("name", "tails"), [("one_tail", 1), ("three_tails", 3)])
def test_tails_are_separate_strokes(batch: CellBatch, name: str, tails: int) -> None:
    for image in np.flatnonzero(batch.labels == CLASS_NAMES.index(name)):
        feature = batch.heatmaps[image] == np.float32(0.9)
        _, components = ndimage.label(feature, structure=np.ones((3, 3)))
        assert components == tails


def test_bar_cells_carry_the_bar_across_the_body(batch: CellBatch) -> None:
    for name in ("cell_with_bar", "bar_and_pole"):
        for image in np.flatnonzero(batch.labels == CLASS_NAMES.index(name)):
            feature = batch.heatmaps[image] == np.float32(0.9)
            _, components = ndimage.label(feature, structure=np.ones((3, 3)))
            assert components == 1  # one stroke (or cross), not the outline
            assert feature.sum() < 0.5 * batch.masks[image].sum()


@pytest.mark.parametrize("size", [64, 200])
def test_any_image_size_works(size: int) -> None:
    batch = generate(10, CellConfig(size=size, seed=5))
    assert batch.images.shape == (10, size, size, 3)
    assert batch.heatmaps.shape == batch.masks.shape == (10, size, size)
    for image in np.flatnonzero(batch.labels != BLANK):
        assert (batch.heatmaps[image] == np.float32(0.9)).any()
        # Objects stay inside the frame: nothing touches the outermost pixels.
        mask = batch.masks[image]
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_each_background_type_is_drawn_as_described(batch: CellBatch) -> None:
    assert batch.backgrounds is not None
    assert set(batch.backgrounds.tolist()) == {0, 1, 2}
    for image in range(len(batch.labels)):
        pixels = batch.images[image][~batch.masks[image]].astype(int)
        kind = BACKGROUNDS[batch.backgrounds[image]]
        if kind == "black":
            assert pixels.max() == 0
        elif kind == "smooth":
            assert pixels.min() >= 30 and pixels.max() <= 200
            steps = np.abs(np.diff(batch.images[image].astype(int), axis=1))
            assert np.median(steps) <= 3  # a smooth field, not noise
        else:
            assert pixels.max() <= 128 and pixels.min() <= 10  # rings span 0..0.5


def test_configs_differ_where_they_should() -> None:
    assert TRAIN_CONFIG.seed != TEST_CONFIG.seed != HELD_OUT_CONFIG.seed
    assert HELD_OUT_CONFIG.size != TRAIN_CONFIG.size
    assert set(HELD_OUT_CONFIG.backgrounds) != set(TRAIN_CONFIG.backgrounds)
    held_out = generate(12, HELD_OUT_CONFIG)
    assert held_out.images.shape[1:3] == (HELD_OUT_CONFIG.size, HELD_OUT_CONFIG.size)
    assert held_out.backgrounds is not None
    assert BACKGROUNDS.index("black") not in held_out.backgrounds


def test_zero_images_is_an_empty_batch() -> None:
    empty = generate(0, CellConfig(size=32))
    assert empty.images.shape == (0, 32, 32, 3) and empty.labels.shape == (0,)


@pytest.mark.parametrize(
    ("count", "config", "start"),
    [
        (-1, CellConfig(), 0),
        (1, CellConfig(), -1),
        (1, CellConfig(size=8), 0),
        (1, CellConfig(backgrounds=()), 0),
        (1, CellConfig(backgrounds=("plaid",)), 0),
    ],
)
def test_bad_arguments_are_refused(count: int, config: CellConfig, start: int) -> None:
    with pytest.raises(ValueError):
        generate(count, config, start)
