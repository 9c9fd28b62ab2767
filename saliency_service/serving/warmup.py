"""Warm-up of a loaded model before it reports ready."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from saliency_service.core.chunking import chunk_shapes
from saliency_service.core.errors import InvalidInput, OverLimit
from saliency_service.core.params import limits_of
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import CostCounter, Job, RequestState
from saliency_service.methods import registry
from saliency_service.methods._utils.torch_program import warm_up_variants
from saliency_service.methods.base import Handler
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.serving.engine import Engine, ExplainOrder

log = logging.getLogger(__name__)


def warm_up_params(handler: Handler, limits: Mapping[str, float]
                   ) -> tuple[dict[str, Any], bool]:
    """The fields to set for a method's warm-up run (its ``warm_up_overrides``, each field
    that a server limit caps lowered to that limit, so a server started with tight
    ``--max-…`` flags still warms every method it will serve), and whether any was lowered."""
    defaults = handler.defaults
    values = {**defaults, **handler.warm_up_overrides}
    lowered = False
    for field, limit in limits_of(handler.Params).items():
        if limit in limits and values[field] > limits[limit]:
            cap = limits[limit]
            values[field] = math.floor(cap) if isinstance(values[field], int) else cap
            lowered = True
    return {key: value for key, value in values.items() if value != defaults[key]}, lowered


def warm_up(engine: Engine, handle: ModelHandle) -> list[str]:
    """Runs a prediction and every method the model offers once, on a batch of the
    expected shape, so that the first client request pays for no session start-up,
    program preparation or first-shape planning, and a package that cannot serve its own
    manifest is caught. Methods whose defaults cost many passes run with their handler's
    ``warm_up_overrides``, within the server limits; a method that no request could use
    under those limits is skipped with a warning, not counted as a failure.

    Returns what failed; the caller marks the package not ready with it.
    """
    started = time.perf_counter()
    spec = handle.spec().input
    batch = max(getattr(spec, "batch", 0), 1)
    shape = (batch, spec.channels, spec.height, spec.width)
    sample = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    try:
        engine.predict(handle.name, handle.version, lambda _: sample.copy(), CostCounter())
    except Exception as exc:  # noqa: BLE001 - reported as the package's error
        return [f"predict: {type(exc).__name__}: {exc}"]
    available = {h.method for h in engine.methods_for(handle)}
    failed = []
    warmed = []
    for handler in registry.handlers():
        if not handler.warm_up or handler.method not in available:
            continue
        params = None
        overrides, lowered = warm_up_params(handler, engine.limits)
        if overrides:
            request = pb.ExplainRequest(**{handler.params_field: overrides})
            params = getattr(request, handler.params_field)
        order = ExplainOrder(model=handle.name, version=handle.version, method=handler.method,
                             decode=lambda _: sample.copy(), params=params,
                             params_field=handler.params_field if params is not None else None)
        try:
            engine.explain(order, RequestState(), CostCounter())
            warmed.append(handler.name)
        except InvalidInput as exc:
            if not isinstance(exc, OverLimit) and not lowered:
                failed.append(f"{handler.name}: {type(exc).__name__}: {exc}")
                continue
            # A limit below what the method needs (or its own range): no request could use
            # it either, and the refusal tells the client which flag to raise.
            log.warning("model %s version %d: %s not warmed up: %s", handle.name,
                        handle.version, handler.name, exc)
        except Exception as exc:  # noqa: BLE001 - reported, the model still serves
            failed.append(f"{handler.name}: {type(exc).__name__}: {exc}")
    if not failed:
        try:
            warm_up_chunk_shapes(handle, sample, engine.limits)
        except Exception as exc:  # noqa: BLE001 - reported as the package's error
            failed.append(f"chunk shapes: {type(exc).__name__}: {exc}")
    log.info("model %s version %d warmed up in %.2f s (%d methods: %s)", handle.name,
             handle.version, time.perf_counter() - started, len(warmed), ", ".join(warmed),
             extra={"event": "warm_up", "model": handle.name,
                    "warm_up_seconds": round(time.perf_counter() - started, 3)})
    return failed


def warm_up_chunk_shapes(handle: ModelHandle, sample: np.ndarray,
                         limits: Mapping[str, float]) -> None:
    """Runs ONNX Runtime and every torch program variant the methods built at each chunk
    length a request can produce (``core.chunking``), after the methods ran once each."""
    job = Job(model=handle, inputs=sample[:1], targets=np.zeros(1, np.int64), limits=limits)
    forward_rows = chunk_shapes(job.items_per_chunk())
    spec = handle.spec()
    extra = list(spec.extra_outputs)
    for rows in forward_rows:
        batch = np.repeat(sample[:1], rows, axis=0)
        handle.run(batch)
        if extra:
            handle.run(batch, [spec.logits_output, *extra])
    if handle.has_torch:
        warm_up_variants(handle, sample, chunk_shapes(job.items_per_chunk(backward=True)),
                         forward_rows, int(limits.get("max_batch", 1)))
