"""The transport-free engine: choose a method, decode the input, predict, run the handler.

It takes an order (what a client asked for, in plain Python) and returns what was computed;
``protocol.codec`` converts protocol messages into orders and results back into messages, so
the engine can be driven in-process exactly as the server drives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saliency_service.core.dense import (
    SEGMENTATION,
    DenseTarget,
    TargetedModel,
    TargetRequest,
    check_segmentation,
    class_map,
    detections,
    target_scores,
)
from saliency_service.core.dense import resolve_targets as resolve_dense
from saliency_service.core.detections import Detections
from saliency_service.core.errors import InvalidInput, NotFound
from saliency_service.core.repository import InputSpec, ModelHandle, Repository
from saliency_service.core.request import CostCounter, Job, ProgressUpdate, RequestState, Result
from saliency_service.methods import registry
from saliency_service.methods.base import ENGINE_ONNX, Handler

_DEFAULT_FORWARD_SECONDS = 0.03

Decoder = Callable[[InputSpec], np.ndarray]  # the request's input as a model takes it
MeanSeconds = Callable[[str, str], tuple[float, int]]  # (model, method) → (mean, requests)


@dataclass(frozen=True)
class Target:
    """Which class to explain per item: the predicted one, one index, or one per item; for
    a detector or segmenter, ``dense`` says which detections or regions."""

    kind: str = "predicted"  # "predicted" | "class_index" | "per_item" | "dense"
    indices: tuple[int, ...] = ()
    dense: TargetRequest | None = None


@dataclass(frozen=True)
class ExplainOrder:
    """One explanation request in plain Python. ``method`` is a method's name (``auto``
    lets the engine choose; ``""`` is unset); ``params`` holds the values the client set
    (field name → value) for the method named ``params_field``."""

    model: str
    method: str
    decode: Decoder
    version: int = 0
    params: Mapping[str, Any] | None = None
    params_field: str | None = None
    target: Target = Target()
    seed: int = 0
    max_latency_ms: float = 0.0
    best_effort: bool = False
    wants_overlays: bool = False
    wants_raw: bool = False


@dataclass(frozen=True)
class Prepared:
    """An order checked before it takes a slot: its model, its handler and parameters
    (None while METHOD_AUTO waits for the prediction run's time to choose)."""

    order: ExplainOrder
    handle: ModelHandle
    handler: Handler | None
    params: Any = None


@dataclass(frozen=True)
class Explanation:
    """What an explanation computed, and with which model, method and inputs."""

    handle: ModelHandle
    handler: Handler
    inputs: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    result: Result
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)
    # A detector's or segmenter's targets, one per map, and what it predicted.
    dense_targets: list[DenseTarget] | None = None
    detections: list[Detections] | None = None
    class_map: np.ndarray | None = None


@dataclass(frozen=True)
class Scores:
    """A prediction: the model's outputs for each item."""

    handle: ModelHandle
    logits: np.ndarray
    wall_seconds: float
    cpu_seconds: float
    # A detector's detections per item, or a segmenter's N×H×W predicted classes.
    detections: list[Detections] | None = None
    class_map: np.ndarray | None = None


def resolve_targets(target: Target, logits: np.ndarray) -> np.ndarray:
    """One class index per batch item, checked against the model's classes."""
    batch, classes = logits.shape
    if target.kind == "dense":
        raise InvalidInput("target.detection, target.min_score and target.region are for "
                           "detectors and segmenters; this model is a classifier: give a "
                           "class_index or per_item classes")
    if target.kind == "predicted":
        return logits.argmax(axis=1).astype(np.int64)
    if target.kind == "class_index":
        indices = np.full(batch, target.indices[0], np.int64)
    else:
        indices = np.asarray(target.indices, np.int64)
        if indices.shape[0] != batch:
            raise InvalidInput(
                f"target.per_item has {indices.shape[0]} indices for a batch of {batch}"
            )
    if indices.size and (indices.min() < 0 or indices.max() >= classes):
        raise InvalidInput(f"target class {indices.tolist()} out of range [0, {classes - 1}]")
    return indices


def dense_request(target: Target, kind: str) -> TargetRequest:
    """A detector's or segmenter's target from the order: its own kinds, the default, or
    a class index (a segmenter's region of the pixels predicted as that class)."""
    if target.dense is not None:
        return target.dense
    if target.kind == "predicted":
        return TargetRequest()
    if target.kind == "class_index" and kind == SEGMENTATION:
        return TargetRequest("region", label=target.indices[0])
    raise InvalidInput(f"a {kind} model explains detections or regions, not classes per "
                       "item: give target.detection (a box and class) or target.min_score"
                       if kind != SEGMENTATION else
                       "a segmentation model explains regions: give target.region (a class, "
                       "and a box or mask) or one class_index")


class Engine:
    """Runs orders against the repository; every public call is one request."""

    def __init__(self, repository: Repository, limits: Mapping[str, float],
                 mean_seconds: MeanSeconds) -> None:
        self.repository = repository
        self.limits = limits
        self.mean_seconds = mean_seconds

    def methods_for(self, model: ModelHandle) -> list[Handler]:
        return [h for h in registry.handlers() if h.available_for(model)]

    def predict(self, model: str, version: int, decode: Decoder, cost: CostCounter,
                state: RequestState | None = None) -> Scores:
        """The model's scores for the decoded inputs (a remote model's calls bounded by
        ``state``'s deadline)."""
        handle = self.repository.get(model, version)
        inputs = decode(handle.spec().input)
        started = time.perf_counter()
        cpu_started = time.process_time()
        dense = handle.spec().dense
        if dense is not None:
            outputs = handle.run(inputs, list(dense.outputs), state=state,
                                 count_remote=cost.remote)
            cost.forward(inputs.shape[0], ENGINE_ONNX)
            found, classes = self._dense_prediction(handle, outputs)
            return Scores(handle, np.zeros((inputs.shape[0], 0), np.float32),
                          time.perf_counter() - started, time.process_time() - cpu_started,
                          found, classes)
        (logits,) = handle.run(inputs, state=state, count_remote=cost.remote)
        cost.forward(inputs.shape[0], ENGINE_ONNX)
        return Scores(handle, logits, time.perf_counter() - started,
                      time.process_time() - cpu_started)

    @staticmethod
    def _dense_prediction(handle: ModelHandle, outputs: list[np.ndarray]
                          ) -> tuple[list[Detections] | None, np.ndarray | None]:
        spec = handle.spec()
        assert spec.dense is not None
        if spec.dense.kind == SEGMENTATION:
            check_segmentation(outputs[0], len(spec.class_labels), spec.input.height,
                               spec.input.width)
            return None, class_map(spec.dense, outputs[0])
        return detections(spec.dense, outputs, len(spec.class_labels)), None

    def choose_handler(self, order: ExplainOrder, handle: ModelHandle) -> Handler:
        """The handler for a named method, offered for this model."""
        if not order.method:
            raise InvalidInput("method is unset: choose one, e.g. METHOD_VANILLA_GRADIENT, "
                               "or METHOD_AUTO")
        handler = registry.get(order.method)
        if not handler.available_for(handle):
            names = ", ".join(h.name for h in self.methods_for(handle))
            raise NotFound(f"method {handler.name} is not offered for model {handle.name!r} "
                           f"({handler.unavailable_reason(handle)}); available methods: "
                           f"{names}")
        return handler

    def auto(self, order: ExplainOrder, handle: ModelHandle,
             forward_seconds: float | None = None) -> Handler:
        """METHOD_AUTO: the most preferred method whose expected latency fits the budget,
        else the cheapest. Expected latency is the measured mean or, before any
        measurement, the handler's prior passes × the prediction run's time."""
        ranked = sorted(self.methods_for(handle), key=lambda h: (
            h.auto_rank is None, h.auto_rank if h.auto_rank is not None else 0, h.name))
        if not ranked:
            raise NotFound(f"model {handle.name!r} offers no methods")
        budget_seconds = order.max_latency_ms / 1000.0
        if budget_seconds <= 0:
            return ranked[0]
        unit = forward_seconds if forward_seconds else _DEFAULT_FORWARD_SECONDS
        expected = []
        for handler in ranked:
            mean, requests = self.mean_seconds(handle.name, handler.name)
            seconds = mean if requests else handler.prior_passes(handle) * unit
            if seconds <= budget_seconds:
                return handler
            expected.append((seconds, len(expected), handler))
        return min(expected)[2]

    def params(self, order: ExplainOrder, handler: Handler) -> object:
        """The handler's parameters from the order's values, checked against the limits."""
        if order.params_field is not None and order.params_field != handler.params_field:
            raise InvalidInput(f"params {order.params_field!r} were given for method "
                               f"{handler.name}; it takes {handler.params_field!r}")
        return handler.params(order.params if order.params_field else None, self.limits)

    def prepare(self, order: ExplainOrder) -> Prepared:
        """Everything that can be checked before the request takes a slot: the model, the
        method and its parameters. METHOD_AUTO under a latency budget chooses after the
        prediction run (it prices methods by that run's time); its parameters, if given,
        are checked here against the method they name."""
        handle = self.repository.get(order.model, order.version)
        if order.method == registry.AUTO and order.max_latency_ms > 0:
            params = None
            if order.params_field is not None:
                params = registry.get(order.params_field).params(order.params, self.limits)
            return Prepared(order, handle, None, params)
        handler = (self.auto(order, handle) if order.method == registry.AUTO
                   else self.choose_handler(order, handle))
        return Prepared(order, handle, handler, self.params(order, handler))

    @staticmethod
    def _prediction_run(handle: ModelHandle, inputs: np.ndarray, names: list[str],
                        cost: CostCounter, state: RequestState | None = None,
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The one ONNX Runtime pass for the prediction, plus any outputs handlers read."""
        logits, *extra = handle.run(inputs, [handle.spec().logits_output, *names], state,
                                    cost.remote)
        cost.forward(inputs.shape[0], ENGINE_ONNX)
        return logits, dict(zip(names, extra, strict=True))

    def explain(self, order: ExplainOrder | Prepared, state: RequestState, cost: CostCounter,
                on_progress: Callable[[ProgressUpdate], None] | None = None) -> Explanation:
        """Runs one explanation to completion (or raises a ServiceError); an order not yet
        prepared is prepared first."""
        started, cpu_started = time.perf_counter(), time.process_time()
        prepared = order if isinstance(order, Prepared) else self.prepare(order)
        order, handle, handler = prepared.order, prepared.handle, prepared.handler
        params = prepared.params
        spec = handle.spec()
        if spec.dense is not None:
            return self._explain_dense(prepared, state, cost, on_progress, started,
                                       cpu_started)
        if handler is None:
            # AUTO times the prediction run to price methods not yet measured; that run also
            # fetches the outputs forward-only methods read, so any choice costs one pass.
            inputs = order.decode(spec.input)
            state.check()
            names = list(dict.fromkeys(
                n for h in self.methods_for(handle) if h.wants_scale_outputs
                for n in h.scale_outputs_for(handle)))
            run_started = time.perf_counter()
            logits, extra = self._prediction_run(handle, inputs, names, cost, state)
            handler = self.auto(order, handle, time.perf_counter() - run_started)
            if params is None or order.params_field != handler.params_field:
                params = self.params(order, handler)
        else:
            inputs = order.decode(spec.input)
            state.check()
            names = handler.scale_outputs_for(handle) if handler.wants_scale_outputs else []
            logits, extra = self._prediction_run(handle, inputs, names, cost, state)
        targets = resolve_targets(order.target, logits)
        job = Job(
            model=handle, inputs=inputs, targets=targets, params=params, base_logits=logits,
            seed=order.seed, state=state, cost=cost, limits=self.limits,
            best_effort=order.best_effort, on_progress=on_progress,
            scale_outputs=extra or None, wants_overlays=order.wants_overlays,
            wants_raw=order.wants_raw,
        )
        return Explanation(handle, handler, inputs, logits, targets, handler.explain(job),
                           started, cpu_started)

    def _explain_dense(self, prepared: Prepared, state: RequestState, cost: CostCounter,
                       on_progress: Callable[[ProgressUpdate], None] | None, started: float,
                       cpu_started: float) -> Explanation:
        """A detector or segmenter: one map per target (``core.dense``). The targets are
        resolved on the unperturbed inputs; each becomes one row of the job (its item's
        image) and the model is seen through ``TargetedModel``, which scores every target,
        so the method explains row r's target as it would explain a class."""
        order, handle = prepared.order, prepared.handle
        spec = handle.spec()
        assert spec.dense is not None
        handler = prepared.handler or self.auto(order, handle)
        params = prepared.params if prepared.handler is not None else self.params(order,
                                                                                  handler)
        request = dense_request(order.target, spec.dense.kind)
        inputs = order.decode(spec.input)
        state.check()
        # The scale outputs the multi-scale methods read come from the same pass.
        names = handler.scale_outputs_for(handle) if handler.wants_scale_outputs else []
        outputs = handle.run(inputs, [*spec.dense.outputs, *names], state, cost.remote)
        cost.forward(inputs.shape[0], ENGINE_ONNX)
        extra = dict(zip(names, outputs[len(spec.dense.outputs):], strict=True))
        outputs = outputs[:len(spec.dense.outputs)]
        found, classes = self._dense_prediction(handle, outputs)
        targets = resolve_dense(spec.dense, request, outputs, spec.class_labels,
                                spec.input.height, spec.input.width)
        model = TargetedModel(handle, spec.dense, targets, spec.class_labels,
                              on_shared=lambda rows: cost.forward(-rows, ENGINE_ONNX))
        items = np.array([t.item for t in targets], np.int64)
        base = target_scores(spec.dense, outputs, targets, len(spec.class_labels))[items]
        # Gradient methods differentiate another score (``methods._utils.target_score``):
        # they compute their own at the input.
        job = Job(
            model=model, inputs=inputs[items], targets=np.arange(len(targets)), params=params,
            base_logits=None if handler.needs_torch else base, seed=order.seed, state=state,
            cost=cost, limits=self.limits,
            best_effort=order.best_effort, on_progress=on_progress,
            scale_outputs={name: values[items] for name, values in extra.items()} or None,
            wants_overlays=order.wants_overlays, wants_raw=order.wants_raw,
        )
        return Explanation(handle, handler, inputs, base,
                           np.array([t.label for t in targets], np.int64), handler.explain(job),
                           started, cpu_started, dense_targets=targets, detections=found,
                           class_map=classes)
