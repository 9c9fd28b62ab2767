"""Top-k predictions: the plain-Python ranking (few classes) and the numpy one (many) give
the same classes, order and probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.protocol.predictions import (
    PYTHON_RANKING_CLASSES,
    predictions,
    ranked_numpy,
    ranked_python,
)


def reference(logits: np.ndarray, k: int) -> list[tuple[list[int], np.ndarray]]:
    """Softmax in float64 and a stable descending sort by logit, row by row."""
    rows = []
    for row in logits.astype(np.float64):
        exps = np.exp(row - row.max())
        order = sorted(range(row.size), key=lambda i, r=row: (-r[i], i))[:k]
        rows.append((order, exps[order] / exps.sum()))
    return rows


@pytest.mark.parametrize("classes", [2, 10, PYTHON_RANKING_CLASSES, 100, 1000])
def test_both_rankings_match_the_reference(classes: int) -> None:
    rng = np.random.default_rng(classes)
    logits = (rng.normal(size=(4, classes)) * 8).astype(np.float32)
    logits[1, : classes // 2] = logits[1, 0]  # ties keep index order
    logits[2] -= 500.0  # shifting all logits changes nothing
    k = min(5, classes)
    expected = reference(logits, k)
    for rank in (ranked_python, ranked_numpy):
        for row, ((indices, chances, values), (want, want_chances)) in enumerate(
                zip(rank(logits, k), expected, strict=True)):
            assert indices == want
            np.testing.assert_allclose(chances, want_chances, rtol=1e-12, atol=1e-300)
            assert values == logits[row, want].tolist()


def test_predictions_carry_labels_and_probabilities_that_sum_to_one() -> None:
    logits = np.array([[0.0, 2.0, 1.0]], np.float32)
    (prediction,) = predictions(logits, ("cat", "dog"), top_k=10)
    assert [score.index for score in prediction.top] == [1, 2, 0]
    assert [score.label for score in prediction.top] == ["dog", "2", "cat"]
    total = sum(score.probability for score in prediction.top)
    assert total == pytest.approx(1.0, abs=1e-6)  # the message's fields are float32
    assert prediction.top[0].logit == 2.0
