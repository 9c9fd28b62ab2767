"""Quality on the synthetic cells for side-by-side suites: the cells, our service's maps for
them (in this process, through ``saliency_service.protocol.codec.Core``), and the cell metrics of
``evaluation.metrics`` (RCAP, relevance mass, pointing game, relevance rank), so every
system's maps are scored by the same code.

Not a suite of its own (``run_all`` skips modules whose name starts with ``_``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from saliency_service.evaluation import metrics
from saliency_service.evaluation.cells import TEST_CONFIG, CellBatch, generate

QUALITY = ("rcap", "relevance_mass", "pointing_game", "relevance_rank")


def cells(count: int, size: int) -> CellBatch:
    """The first ``count`` images of the test configuration at ``size``² pixels."""
    return generate(count, dataclasses.replace(TEST_CONFIG, size=size))


def quality(maps: np.ndarray, batch: Any, targets: np.ndarray,
            classifier: metrics.Probabilities) -> dict[str, np.ndarray]:
    """Per-image scores of N×H×W ``maps`` of ``batch`` (ground-truth ones NaN on blanks); a
    batch without object masks (real photographs) gets RCAP alone."""
    images = batch.images.astype(np.float32) / 255.0
    if getattr(batch, "masks", None) is None:
        return {"rcap": metrics.rcap(images, maps, targets, classifier)}
    has_object = batch.masks.reshape(len(batch.masks), -1).any(axis=1)
    scores = {
        "rcap": metrics.rcap(images, maps, targets, classifier),
        "relevance_mass": metrics.relevance_mass(maps, batch.masks),
        "pointing_game": metrics.pointing_game(maps, batch.masks),
        "relevance_rank": metrics.relevance_rank(maps, batch.masks),
    }
    return {k: np.where(has_object | (k == "rcap"), v, np.nan) for k, v in scores.items()}


def means(scores: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def paired(first: np.ndarray, second: np.ndarray, draws: int = 2000,
           seed: int = 0) -> dict[str, float]:
    """Mean of ``first − second`` over images where both are defined, with a 95 % paired
    bootstrap interval."""
    keep = np.isfinite(first) & np.isfinite(second)
    difference = (first - second)[keep]
    if len(difference) == 0:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    resampled = difference[rng.integers(0, len(difference), (draws, len(difference)))]
    low, high = np.percentile(resampled.mean(axis=1), [2.5, 97.5])
    return {"difference": float(difference.mean()), "low": float(low), "high": float(high),
            "n": len(difference)}


def classifier(package: Path, threads: int = 1) -> metrics.OnnxClassifier:
    return metrics.OnnxClassifier.from_package(package, intra_op_threads=threads)


def explain(core: Any, model: str, method: int, inputs: np.ndarray, targets: np.ndarray,
            params: tuple[str, Any] | None = None, batch: int = 8,
            seed: int = 0, precision: str = "") -> dict[str, Any]:
    """Our maps of float32 N×C×H×W ``inputs`` (already preprocessed), ``batch`` images a
    request with the request's ``precision`` ("" = the server's), through the in-process
    core: maps, forward passes and wall seconds per image (the core's own Cost), the
    precisions the replies report, and whether any reply was truncated."""
    from saliency_service.core.request import CostCounter, RequestState  # noqa: PLC0415
    from saliency_service.proto import explainer_pb2 as pb  # noqa: PLC0415
    from saliency_service.protocol.images import array_to_tensor, tensor_to_array  # noqa: PLC0415

    maps, passes, seconds, truncated, used = [], 0, 0.0, False, set()
    diagnostics: list[dict[str, float]] = []
    for start in range(0, len(inputs), batch):
        part = slice(start, start + batch)
        request = pb.ExplainRequest(
            model=model, method=method, seed=seed, precision=precision,
            input=pb.Input(tensor=array_to_tensor(np.ascontiguousarray(inputs[part]))),
            target=pb.Target(per_item=pb.ClassIndices(indices=targets[part].tolist())))
        if params is not None:
            getattr(request, params[0]).CopyFrom(params[1])
        started = time.perf_counter()
        reply = core.explain(request, RequestState(), CostCounter())
        seconds += time.perf_counter() - started
        maps.append(tensor_to_array(reply.saliency))
        passes += reply.cost.forward_passes
        truncated |= reply.cost.truncated
        used.add(reply.cost.precision)
        diagnostics.append(dict(reply.diagnostics))
    count = len(inputs)
    return {"maps": np.concatenate(maps), "forward_passes_per_image": passes / count,
            "seconds_per_image": seconds / count, "truncated": truncated,
            "precision": "/".join(sorted(used)),
            "diagnostics": diagnostics}
