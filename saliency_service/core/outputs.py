"""What a model's class-score output means, and the one transform from it to probabilities.

A package's manifest says which kind of scores its class output holds:

* ``logits``: unnormalized scores; probabilities are their softmax (what our exporter writes).
* ``probabilities``: a distribution over the classes (the graph ends in Softmax); used as they
  are. The "logit" reported beside them is the log-probability, whose softmax gives them back.
* ``sigmoid``: each class's own probability, independent of the others (multi-label; the
  graph ends in Sigmoid). The "logit" reported is the log-odds ``log(p / (1 − p))``, the
  score before the sigmoid.

Every method that scores a class (prediction ranking, occlusion, RISE, DE-CAM) goes through
``probabilities``; nothing applies a softmax to probabilities.
"""

from __future__ import annotations

import numpy as np

LOGITS = "logits"
PROBABILITIES = "probabilities"
SIGMOID = "sigmoid"
OUTPUT_KINDS = (LOGITS, PROBABILITIES, SIGMOID)

# Probabilities are clipped into [_TINY, 1 − _EDGE] before taking logs, so a model that
# reports exactly 0 or 1 gets a large finite score rather than an infinity.
_TINY = 1e-45
_EDGE = 1e-16


def check_kind(kind: str) -> str:
    """``kind`` if it is one of ``OUTPUT_KINDS``, else ValueError naming them."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind {kind!r} must be one of {', '.join(OUTPUT_KINDS)}")
    return kind


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the maximum for stability."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """N×classes model scores of ``kind`` → each class's probability (same shape)."""
    if kind == LOGITS:
        return softmax(scores)
    if kind in (PROBABILITIES, SIGMOID):
        return scores
    raise ValueError(check_kind(kind))


def target_probabilities(scores: np.ndarray, kind: str, targets: np.ndarray) -> np.ndarray:
    """The probability of each row's target class (N)."""
    return probabilities(scores, kind)[np.arange(scores.shape[0]), targets]


def logits_of(scores: np.ndarray, kind: str) -> np.ndarray:
    """The score reported as a class's logit: the logit itself, the log-probability
    (``probabilities``) or the log-odds (``sigmoid``), in float64."""
    scores = scores.astype(np.float64)
    if kind == LOGITS:
        return scores
    if kind == PROBABILITIES:
        return np.log(np.clip(scores, _TINY, 1.0))
    if kind == SIGMOID:
        p = np.clip(scores, _TINY, 1.0 - _EDGE)
        return np.log(p) - np.log1p(-p)
    raise ValueError(check_kind(kind))
