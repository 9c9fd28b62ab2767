"""The top-k predictions of a response, ranked from the model's class scores.

Probabilities come from ``core.outputs`` by the manifest's output kind (the plain-Python
ranking is its softmax written out for few logits); ``ClassScore.logit`` is the logit, the
log-probability or the log-odds accordingly."""

from __future__ import annotations

import math

import numpy as np

from saliency_service.core.outputs import LOGITS, logits_of, probabilities
from saliency_service.proto import explainer_pb2 as pb

DEFAULT_TOP_K = 5

# Up to this many classes plain Python ranks a row faster than numpy, whose per-call cost
# dominates small rows (``benchmarks.micro`` measures it on Predict).
PYTHON_RANKING_CLASSES = 64

Ranked = list[tuple[list[int], list[float], list[float]]]


def ranked_python(logits: np.ndarray, k: int) -> Ranked:
    """(class indices, probabilities, logits) of each row's top ``k`` by logit, stable."""
    ranked = []
    for row in logits.tolist():
        peak = max(row)
        exps = [math.exp(z - peak) for z in row]
        total = sum(exps)
        order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
        ranked.append((order, [exps[i] / total for i in order], [row[i] for i in order]))
    return ranked


def ranked_numpy(scores: np.ndarray, k: int, kind: str = LOGITS) -> Ranked:
    """``ranked_python`` for many classes, and for every output kind."""
    chances = probabilities(scores.astype(np.float64), kind)
    values = logits_of(scores, kind)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = np.arange(scores.shape[0])[:, None]
    # Plain Python numbers (tolist) build the messages far faster than numpy scalars.
    return list(zip(order.tolist(), chances[rows, order].tolist(),
                    values[rows, order].tolist(), strict=True))


def predictions(scores: np.ndarray, labels: tuple[str, ...], top_k: int,
                kind: str = LOGITS) -> list[pb.Prediction]:
    """Top-k classes with probabilities for every batch item; ``kind`` is the manifest's
    output kind of ``scores``."""
    k = min(top_k if top_k > 0 else DEFAULT_TOP_K, scores.shape[1])
    if kind == LOGITS and scores.shape[1] <= PYTHON_RANKING_CLASSES:
        ranked = ranked_python(scores, k)
    else:
        ranked = ranked_numpy(scores, k, kind)
    return [
        pb.Prediction(top=[
            pb.ClassScore(index=i, label=labels[i] if i < len(labels) else str(i),
                          probability=p, logit=z)
            for i, p, z in zip(indices, chances, values, strict=True)
        ])
        for indices, chances, values in ranked
    ]
