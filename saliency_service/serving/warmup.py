"""Warm-up of a loaded model before it reports ready."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from saliency_service.core.chunking import chunk_shapes
from saliency_service.core.dense import TargetRequest
from saliency_service.core.errors import InvalidInput, OverLimit, Unavailable
from saliency_service.core.params import limits_of
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import CostCounter, Job, RequestState
from saliency_service.methods import registry
from saliency_service.methods.base import Handler
from saliency_service.serving.engine import Engine, ExplainOrder, Target

log = logging.getLogger(__name__)


class WarmUpBound:
    """Ends a warm-up whose model run outlasts its time (a graph that never terminates), or
    that the server no longer wants (it is shutting down): ONNX Runtime's run stops through
    ``RunOptions.terminate``, a method at its next check, and every later run of the warm-up
    at once. The bound is per run, so a model of many quick runs is never cut short."""

    def __init__(self, handle: ModelHandle, seconds: float) -> None:
        self.handle = handle
        self.seconds = seconds
        self.options = ort.RunOptions()
        self.options.log_severity_level = 4  # the refusal is reported once, by the server
        self.state = RequestState()
        self.reason = ""
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._watch = (threading.Thread(target=self._watch_runs, daemon=True)
                       if 0 < seconds < math.inf else None)

    def __enter__(self) -> WarmUpBound:
        self.handle.run_options = self.options
        if self._watch is not None:
            self._watch.start()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._finished.set()
        self.handle.run_options = None

    def _watch_runs(self) -> None:
        while not self._finished.wait(min(0.25, self.seconds / 4)):
            started = self.handle.run_started
            if started is not None and time.monotonic() - started > self.seconds:
                self.stop(f"a model run did not finish within {self.seconds:g} s "
                          "(--warmup-timeout-seconds): a model that takes longer cannot be "
                          "served")

    def stop(self, reason: str) -> None:
        """Stops the warm-up with ``reason`` (the first one given stands)."""
        with self._lock:
            if self._finished.is_set() or self.reason:
                return
            self.reason = reason
            self.options.terminate = True
            self.state.cancel(Unavailable(reason))


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


def warm_up(engine: Engine, handle: ModelHandle, bound: WarmUpBound | None = None
            ) -> list[str]:
    """Runs a prediction and every method the model offers once, on a batch of the
    expected shape, so that the first client request pays for no session start-up,
    program preparation or first-shape planning, and a package that cannot serve its own
    manifest is caught. Methods whose defaults cost many passes run with their handler's
    ``warm_up_overrides``, within the server limits; a method that no request could use
    under those limits is skipped with a warning, not counted as a failure.

    ``bound`` (see ``WarmUpBound``) ends it early: its reason is then the one failure.
    Returns what failed; the caller marks the package not ready with it.
    """
    with bound or WarmUpBound(handle, 0.0) as active:
        try:
            failed = _warm_up(engine, handle, active.state)
        except Exception as exc:  # noqa: BLE001 - reported as the package's error
            failed = [f"{type(exc).__name__}: {exc}"]
    return [active.reason] if active.reason else failed


def _warm_up(engine: Engine, handle: ModelHandle, state: RequestState) -> list[str]:
    started = time.perf_counter()
    spec = handle.spec().input
    batch = max(getattr(spec, "batch", 0), 1)
    shape = (batch, spec.channels, spec.height, spec.width)
    sample = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    try:
        scores = engine.predict(handle.name, handle.version, lambda _: sample.copy(),
                                CostCounter())
    except Exception as exc:  # noqa: BLE001 - reported as the package's error
        return [f"predict: {type(exc).__name__}: {exc}"]
    labels = handle.spec().class_labels
    dense = handle.spec().dense is not None
    if not dense and (scores.logits.ndim != 2 or (labels and
                                                 len(labels) != scores.logits.shape[1])):
        return [f"predict: the model gives scores of shape {list(scores.logits.shape)} for "
                f"{len(labels)} class labels in the manifest (want N×classes, one label each)"]
    available = {h.name for h in engine.methods_for(handle)}
    failed = []
    warmed = []
    for handler in registry.handlers():
        if not handler.warm_up or handler.name not in available:
            continue
        overrides, lowered = warm_up_params(handler, engine.limits)
        # A detector or segmenter may find nothing in noise: its methods explain the whole
        # input as one target instead.
        target = Target("dense", dense=TargetRequest("whole")) if dense else Target()
        order = ExplainOrder(model=handle.name, version=handle.version, method=handler.name,
                             decode=lambda _: sample.copy(), params=overrides or None,
                             params_field=handler.params_field if overrides else None,
                             target=target)
        try:
            state.check()
            engine.explain(order, state, CostCounter())
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
    if handle.remote is not None:  # its predictor batches on its own terms
        return
    job = Job(model=handle, inputs=sample[:1], targets=np.zeros(1, np.int64), limits=limits)
    forward_rows = chunk_shapes(job.items_per_chunk())
    spec = handle.spec()
    extra = list(spec.extra_outputs)
    for rows in forward_rows:
        batch = np.repeat(sample[:1], rows, axis=0)
        handle.run(batch)
        if extra:
            handle.run(batch, [spec.logits_output, *extra])
    if handle.derived_items("program:"):  # a gradient method built a program variant
        from saliency_service.methods._utils.torch_program import (  # noqa: PLC0415
            warm_up_variants,
        )

        warm_up_variants(handle, sample, chunk_shapes(job.items_per_chunk(backward=True)),
                         forward_rows, int(limits.get("max_batch", 1)))
