"""The protocol adapter over the engine: messages in, orders to the engine, messages out.

Every transport (gRPC, HTTP, TorchServe, benchmarks in-process) calls ``Core`` with the
``saliency.v1`` messages; ``saliency_service.serving.engine`` does the work on plain Python objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from saliency_service.core import devices, forward_engine
from saliency_service.core.dense import TargetRequest
from saliency_service.core.detections import Detections
from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import MAX_ITEMS, check_count
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import CostCounter, ProgressUpdate, RequestState
from saliency_service.methods import registry
from saliency_service.methods.base import Handler
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.protocol.inputs import ImageGeometry, decode_input
from saliency_service.protocol.predictions import predictions
from saliency_service.render.overlays import captioned_overlays
from saliency_service.serving.config import Config
from saliency_service.serving.engine import Engine, ExplainOrder, Explanation, Prepared, Target
from saliency_service.serving.metrics import Metrics

_METHOD_PREFIX = "METHOD_"


def method_name(method: int) -> str:
    """The engine's name of a proto Method value (``METHOD_VANILLA_GRADIENT`` →
    ``vanilla_gradient``, METHOD_AUTO → ``auto``, unset → ``""``); a number the proto does
    not define keeps its digits (refused by the engine, labelled ``unknown`` in metrics)."""
    if method == pb.METHOD_UNSPECIFIED:
        return ""
    try:
        return pb.Method.Name(method).removeprefix(_METHOD_PREFIX).lower()
    except ValueError:
        return str(method)


def method_label(method: int) -> str:
    """A bounded metrics label for a proto Method value: its name, or ``unknown``."""
    name = method_name(method)
    return name if name and not name.isdigit() else "unknown"


def method_enum(name: str) -> int:
    """The proto Method value of an engine method name (METHOD_UNSPECIFIED if unknown)."""
    value = pb.Method.DESCRIPTOR.values_by_name.get(_METHOD_PREFIX + name.upper())
    return value.number if value is not None else pb.METHOD_UNSPECIFIED


def _enum_name(descriptor: FieldDescriptor, value: int, label: str) -> str:
    """An enum field's value as its lower-case name without the enum's prefix
    (``BASELINE_UNIFORM_NOISE`` → ``uniform_noise``). A number the proto does not define is
    the client's mistake: INVALID_ARGUMENT naming the field and its values."""
    enum = descriptor.enum_type
    known = enum.values_by_number.get(value)
    if known is None:
        valid = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
        raise InvalidInput(f"{label}={value} is not a {enum.name} value; use one of {valid}")
    prefix = enum.values[0].name.rsplit("_", 1)[0] + "_"
    return known.name.removeprefix(prefix).lower()


def params_values(message: Message | None, where: str) -> dict[str, Any]:
    """The fields the client set in a method's params message, as plain values (enum fields
    by name). A repeated field is bounded by its length before its values are read (this
    runs before admission, where converting millions of values would stall every call);
    the method's own bounds are checked by its parameters dataclass."""
    if message is None:
        return {}
    values: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        name, label = descriptor.name, f"{where}.{descriptor.name}"
        value = getattr(message, name)
        if descriptor.is_repeated:
            check_count(label, len(value), MAX_ITEMS)
            if len(value):
                values[name] = tuple(value)
        elif message.HasField(name) if descriptor.has_presence else bool(value):
            values[name] = (_enum_name(descriptor, value, label)
                            if descriptor.enum_type is not None else value)
    return values


def target_of(message: pb.Target, max_batch: int) -> Target:
    """The engine's target; per-item indices are bounded by ``max_batch`` (one per item)
    before they are read."""
    kind = message.WhichOneof("kind")
    if kind == "class_index":
        return Target("class_index", (int(message.class_index),))
    if kind == "per_item":
        indices = message.per_item.indices
        check_count("target.per_item.indices", len(indices), max_batch,
                    "one class index per batch item, and a batch holds at most "
                    f"max_batch={max_batch} items (--max-batch)")
        return Target("per_item", tuple(int(i) for i in indices))
    if kind == "detection":
        found = message.detection
        return Target("dense", dense=TargetRequest(
            "detection", box=_box(found.box) if found.HasField("box") else None,
            label=found.label or (found.class_index if found.HasField("box") else None)))
    if kind == "min_score":
        if not 0.0 <= message.min_score <= 1.0:
            raise InvalidInput(f"target.min_score={message.min_score:g} must be in [0, 1]")
        return Target("dense", dense=TargetRequest("min_score",
                                                   min_score=float(message.min_score)))
    if kind == "region":
        region = message.region
        mask = None
        if region.HasField("mask"):
            mask = tensor_to_array(region.mask)
        return Target("dense", dense=TargetRequest(
            "region", box=_box(region.box) if region.HasField("box") else None,
            label=region.label or region.class_index, mask=mask))
    return Target()


def _box(box: pb.Box) -> tuple[float, ...]:
    return (box.x1, box.y1, box.x2, box.y2)


def box_message(box: np.ndarray) -> pb.Box:
    x1, y1, x2, y2 = (float(v) for v in box)
    return pb.Box(x1=x1, y1=y1, x2=x2, y2=y2)


def detections_message(found: Detections, labels: tuple[str, ...]) -> pb.Detections:
    return pb.Detections(detections=[
        pb.Detection(box=box_message(found.boxes[i]), class_index=int(found.classes[i]),
                     label=labels[int(found.classes[i])], score=float(found.scores[i]))
        for i in range(len(found))])


def precision_bits(handle: ModelHandle, handler: Handler) -> int:
    """16 when ``handler``'s passes on ``handle`` ran in bfloat16 for the request being
    served (torch autocast, or OpenVINO's forward passes), else 32."""
    return 16 if forward_engine.precision_used(handle, family(handler)) == "bfloat16" else 32


def gradient_note(handle: ModelHandle) -> str:
    """The gradient programs' precision on ``handle`` ("bfloat16 …", "float32 …"), or why
    there is none (no torch, a graph that does not translate)."""
    try:
        from saliency_service.methods._utils.torch_program import (  # noqa: PLC0415
            model_precision,
        )

        return model_precision(handle).note
    except Exception as exc:  # noqa: BLE001 - no gradient program: say why
        return str(exc) or type(exc).__name__


def family(handler: Handler) -> str:
    """Whose precision a method's result has: the gradient programs' or the forward
    passes' (``core.devices``)."""
    return devices.GRADIENT if handler.needs_torch else devices.FORWARD


class Core:
    """Runs requests against the repository; every public call is one request."""

    def __init__(self, repository: Repository, config: Config, metrics: Metrics) -> None:
        self.repository = repository
        self.config = config
        self.metrics = metrics
        self.limits = config.limits()
        self.engine = Engine(repository, self.limits, self._mean_seconds)

    def _mean_seconds(self, model: str, method: str) -> tuple[float, int]:
        mean = self.metrics.mean_cost(model, method)
        return mean.mean_seconds, mean.requests

    # ---- discovery -----------------------------------------------------------------------

    def methods_for(self, model: ModelHandle) -> list[Handler]:
        return self.engine.methods_for(model)

    def list_models(self) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._status(h) for h in self.repository.handles()])

    @staticmethod
    def _status(handle: ModelHandle) -> pb.ModelStatus:
        return pb.ModelStatus(name=handle.name, version=handle.version, ready=handle.ready,
                              error=handle.error)

    def get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        handle = self.repository.find(request.model, request.version)
        info = pb.ModelInfo(status=self._status(handle))
        if not handle.ready:
            return info
        spec = handle.spec()
        info.input.CopyFrom(pb.InputSpec(
            shape=[-1, *spec.input.shape[1:]], dtype=pb.DTYPE_FLOAT32, layout=spec.input.layout,
            mean=spec.input.mean, std=spec.input.std, value_range=spec.input.value_range,
            name=spec.input.name, batch_size=spec.input.batch, resize=spec.input.resize))
        info.output_kind = spec.output_kind
        info.class_labels.extend(spec.class_labels)
        info.scale_outputs.extend(spec.scale_outputs)
        info.cam_layer = spec.cam_layer
        offered = self.methods_for(handle)
        for handler in sorted(offered, key=lambda h: method_enum(h.name)):
            mean = self.metrics.mean_cost(handle.name, handler.name)
            info.methods.append(pb.MethodInfo(
                method=method_enum(handler.name), name=handler.name, engine=handler.engine,
                defaults={k: str(v) for k, v in handler.defaults.items()},
                mean_seconds=mean.mean_seconds, measured_requests=mean.requests,
                description=handler.description))
        names = {h.name for h in offered}
        reasons = {h.name: h.unavailable_reason(handle)
                   for h in registry.handlers() if h.name not in names}
        missing = registry.missing_reason()
        for value in pb.Method.values():
            name = method_name(value)
            if name in names or name in ("", registry.AUTO):
                continue
            reason = reasons.get(name, missing)
            if reason is not None:
                info.unavailable_methods.append(pb.UnavailableMethod(
                    method=value, name=name, reason=reason))
        for key, value in spec.extra.get("exporter", {}).items():
            info.metadata[f"exporter.{key}"] = str(value)
        checked = handle.derived_items("precision")  # set once a gradient program ran
        info.metadata["precision"] = checked[0][1].note if checked else "float32"
        info.metadata["forward_precision"] = forward_engine.precision_note(handle)
        if handle.remote is not None:
            info.metadata.update(handle.remote.describe())
        return info

    # ---- inference -----------------------------------------------------------------------

    def predict(self, request: pb.PredictRequest, cost: CostCounter,
                state: RequestState | None = None) -> pb.PredictResponse:
        forward_engine.check_requested(
            request.precision, self.repository.get(request.model, request.version),
            devices.FORWARD)
        with devices.requested(request.precision):
            scores = self.engine.predict(
                request.model, request.version,
                lambda spec: decode_input(request.input, spec, self.config, writable=False,
                                          resize=request.resize), cost, state)
            precision = forward_engine.precision_used(scores.handle, devices.FORWARD)
        spec = scores.handle.spec()
        response = pb.PredictResponse(
            model=scores.handle.name, version=scores.handle.version,
            predictions=([] if spec.dense is not None else
                         predictions(scores.logits, spec.class_labels, request.top_k,
                                     spec.output_kind)),
            logits=array_to_tensor(scores.logits.astype(np.float32)),
            cost=pb.Cost(forward_passes=cost.forward_passes, wall_seconds=scores.wall_seconds,
                         remote_calls=cost.remote_calls, remote_bytes=cost.remote_bytes,
                         cpu_seconds=scores.cpu_seconds, precision=precision),
        )
        if scores.detections is not None:
            response.detections.extend(detections_message(found, spec.class_labels)
                                       for found in scores.detections)
        if scores.class_map is not None:
            response.class_map.CopyFrom(array_to_tensor(scores.class_map))
        return response

    def order(self, request: pb.ExplainRequest,
              geometry: ImageGeometry | None = None) -> ExplainOrder:
        """The engine's order for an Explain request (plain Python: the method's name, the
        parameters the client set); ``geometry`` records where its images went in the
        model's input."""
        which = request.WhichOneof("params")
        return ExplainOrder(
            model=request.model, version=request.version, method=method_name(request.method),
            decode=lambda spec: decode_input(request.input, spec, self.config,
                                             resize=request.resize, geometry=geometry),
            params=params_values(getattr(request, which), which) if which else None,
            params_field=which,
            target=target_of(request.target, self.config.max_batch), seed=int(request.seed),
            max_latency_ms=request.budget.max_latency_ms,
            best_effort=request.budget.best_effort,
            wants_overlays=request.return_overlay, wants_raw=request.return_raw,
        )

    def prepare(self, request: pb.ExplainRequest) -> tuple[Prepared, ImageGeometry]:
        """Checks an Explain request before it takes a slot (model, method, parameters);
        the result is what ``explain`` runs."""
        geometry = ImageGeometry(keep_pixels=request.return_overlay)
        prepared = self.engine.prepare(self.order(request, geometry))
        forward_engine.check_requested(
            request.precision, prepared.handle,
            family(prepared.handler) if prepared.handler is not None else None, gradient_note)
        return prepared, geometry

    def explain(
        self,
        request: pb.ExplainRequest,
        state: RequestState,
        cost: CostCounter,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
        prepared: tuple[Prepared, ImageGeometry] | None = None,
    ) -> pb.ExplainResponse:
        """Runs one Explain request to completion (or raises a ServiceError); ``prepared``
        is ``prepare(request)`` when the caller checked it already."""
        order, geometry = prepared or self.prepare(request)
        with devices.requested(request.precision):
            done = self.engine.explain(order, state, cost, on_progress)
            return self.response(done, request, cost, geometry, state.check)

    @staticmethod
    def response(done: Explanation, request: pb.ExplainRequest, cost: CostCounter,
                 geometry: ImageGeometry | None = None,
                 check: Callable[[], None] | None = None) -> pb.ExplainResponse:
        """The reply to ``request``; ``check`` (the request's deadline and cancellation)
        runs between overlays."""
        handle, result, spec = done.handle, done.result, done.handle.spec()
        geometry = geometry or ImageGeometry()  # maps in the images' geometry, when it says
        dense = done.dense_targets
        items = None if dense is None else np.array([t.item for t in dense], np.int64)
        maps = geometry.maps(result.maps, items)
        response = pb.ExplainResponse(
            model=handle.name, version=handle.version,
            saliency=array_to_tensor(maps),
            predictions=([] if dense is not None else
                         predictions(done.logits, spec.class_labels, request.top_k,
                                     spec.output_kind)),
            targets=done.targets.tolist(),
            diagnostics={**result.diagnostics,
                         "precision_bits": float(precision_bits(handle, done.handler))},
        )
        if dense is not None:
            response.explained.extend(pb.ExplainedTarget(
                item=t.item, class_index=t.label, label=spec.class_labels[t.label],
                box=box_message(t.box), score=t.score,
                region_pixels=int(t.region.sum()) if t.region is not None else 0)
                for t in dense)
        if request.return_raw:
            response.raw.CopyFrom(array_to_tensor(result.raw.astype(np.float32)))
        if request.return_overlay:
            pictures = geometry.pictures(spec.input) if geometry.follows_images else done.inputs
            boxes = None
            if dense is not None:
                pictures = pictures[items]
                # Boxes are in the model input's pixels: drawn where the maps are too.
                boxes = None if geometry.follows_images else np.stack([t.box for t in dense])
            response.overlays.extend(captioned_overlays(
                pictures, spec.input, maps, done.targets, spec.class_labels,
                done.handler.name, cost, time.perf_counter() - done.started, result.overlays,
                check, boxes))
        response.cost.CopyFrom(pb.Cost(
            remote_calls=cost.remote_calls, remote_bytes=cost.remote_bytes,
            method=method_enum(done.handler.name), forward_passes=cost.forward_passes,
            backward_passes=cost.backward_passes, wall_seconds=time.perf_counter() - done.started,
            cpu_seconds=time.process_time() - done.cpu_started, truncated=result.truncated,
            precision=forward_engine.precision_used(handle, family(done.handler))))
        return response
