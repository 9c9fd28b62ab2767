"""ROAD (remove and debias) against pytorch-grad-cam's ROAD metrics on identical maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saliency_service.evaluation import road
from saliency_service.evaluation.metrics import softmax
from tests.models import TinyCNN
from tests.peer_grad_cam import import_pytorch_grad_cam

MEAN = np.array([0.5, 0.4, 0.3], np.float32)
STD = np.array([0.25, 0.2, 0.3], np.float32)


@pytest.fixture(scope="module")
def peer() -> object:
    import_pytorch_grad_cam()  # installs the placeholders pytorch-grad-cam's package needs
    from pytorch_grad_cam.metrics import road as peer_road  # noqa: PLC0415
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # noqa: PLC0415

    return peer_road, ClassifierOutputSoftmaxTarget


def normalized(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_road_matches_pytorch_grad_cam(peer: tuple, fraction: float) -> None:
    peer_road, softmax_target = peer
    model = TinyCNN(4, seed=1)
    rng = np.random.default_rng(0)
    images = rng.random((3, 20, 24, 3)).astype(np.float32)
    maps = rng.random((3, 20, 24)).astype(np.float32)
    targets = np.array([0, 2, 3])

    def probabilities(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return softmax(model(normalized(batch)).numpy())

    ours = road.road(images, maps, targets, probabilities, fractions=(fraction,), noise=0.0)
    percentile = round(100 * (1 - fraction))
    theirs = {}
    for name, metric in (("morf", peer_road.ROADMostRelevantFirst(percentile)),
                         ("lerf", peer_road.ROADLeastRelevantFirst(percentile))):
        metric.perturbation.imputer.noise = 0.0  # the noise draws differ; the system does not
        theirs[name] = metric(normalized(images), maps, [softmax_target(int(t)) for t in targets],
                              model, return_diff=False)
    np.testing.assert_allclose(ours["road_morf"], theirs["morf"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["road_lerf"], theirs["lerf"], rtol=1e-4, atol=1e-5)
    # The two orders remove different pixels, so the test would notice them swapped.
    assert np.abs(ours["road_morf"] - ours["road_lerf"]).max() > 1e-4


def test_imputed_pixels_match_the_peer_imputer(peer: tuple) -> None:
    peer_road, _ = peer
    rng = np.random.default_rng(1)
    image = rng.random((9, 11, 3)).astype(np.float32)
    keep = rng.random((9, 11)) > 0.6
    ours = road.impute(image, keep, noise=0.0)
    imputer = peer_road.NoisyLinearImputer(noise=0.0)
    theirs = imputer(torch.from_numpy(image.transpose(2, 0, 1).copy()),
                     torch.from_numpy(keep.astype(np.float32))).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_array_equal(ours[keep], image[keep])  # known pixels stay as they were
    # An imputed pixel is the weighted mean of its neighbours (the system holds).
    row, col = np.argwhere(~keep[1:-1, 1:-1])[0] + 1
    mean = sum(w * ours[row + dr, col + dc] for dr, dc, w in road.NEIGHBOUR_WEIGHTS)
    np.testing.assert_allclose(ours[row, col], mean, atol=1e-5)


def test_noise_is_seeded_and_small() -> None:
    image = np.full((8, 8, 1), 0.5, np.float32)
    keep = np.zeros((8, 8), bool)
    keep[0, 0] = True
    first = road.impute(image, keep, noise=0.01, rng=np.random.default_rng(3))
    again = road.impute(image, keep, noise=0.01, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(first, again)
    assert 0 < np.abs(first - 0.5).max() < 0.06  # a constant image imputes to itself, plus noise


def test_a_flat_map_removes_the_share_asked_for() -> None:
    maps = np.zeros((2, 10, 10))
    for fraction in (0.1, 0.5, 0.9):
        for first in (True, False):
            keep = road.removal_masks(maps, fraction, first)
            assert np.all(np.abs((~keep).reshape(2, -1).mean(axis=1) - fraction) <= 0.011)


def test_morf_removes_the_most_relevant_pixels() -> None:
    maps = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    keep = road.removal_masks(maps, 0.3, most_relevant_first=True)[0].reshape(-1)
    assert not keep[70:].any() and keep[:70].all()
    keep = road.removal_masks(maps, 0.3, most_relevant_first=False)[0].reshape(-1)
    assert not keep[:30].any() and keep[30:].all()
