"""The protocol adapter over the engine: messages in, orders to the engine, messages out.

Every transport (gRPC, HTTP, TorchServe, benchmarks in-process) calls ``Core`` with the
``saliency.v1`` messages; ``saliency_service.serving.engine`` does the work on plain Python objects.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import numpy as np

from saliency_service.core.params import check_count
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import CostCounter, ProgressUpdate, RequestState
from saliency_service.methods import registry
from saliency_service.methods.base import Handler, method_name
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor
from saliency_service.protocol.inputs import ImageGeometry, decode_input
from saliency_service.protocol.predictions import predictions
from saliency_service.render.overlays import captioned_overlays
from saliency_service.serving.config import Config
from saliency_service.serving.engine import Engine, ExplainOrder, Explanation, Target
from saliency_service.serving.metrics import Metrics


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
    return Target()


def precision_bits(handle: ModelHandle, handler: Handler) -> int:
    """16 when ``handler`` ran a gradient program under bfloat16 autocast on ``handle``,
    else 32 (ONNX Runtime and float32 programs)."""
    checked = handle.derived_items("precision")
    return 16 if handler.needs_torch and checked and checked[0][1].bfloat16 else 32


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
        for handler in self.methods_for(handle):
            mean = self.metrics.mean_cost(handle.name, handler.name)
            info.methods.append(pb.MethodInfo(
                method=handler.method, name=handler.name, engine=handler.engine,
                defaults={k: str(v) for k, v in handler.defaults.items()},
                mean_seconds=mean.mean_seconds, measured_requests=mean.requests,
                description=handler.description))
        offered = {h.method for h in self.methods_for(handle)}
        for handler in registry.handlers():
            if handler.method not in offered:
                info.unavailable_methods.append(pb.UnavailableMethod(
                    method=handler.method, name=handler.name,
                    reason=handler.unavailable_reason(handle)))
        missing = registry.missing_reason()
        if missing is not None:
            registered = {h.method for h in registry.handlers()}
            for method in pb.Method.values():
                if method not in registered and method not in (registry.UNSPECIFIED,
                                                               registry.AUTO):
                    info.unavailable_methods.append(pb.UnavailableMethod(
                        method=method, name=method_name(method), reason=missing))
        for key, value in spec.extra.get("exporter", {}).items():
            info.metadata[f"exporter.{key}"] = str(value)
        checked = handle.derived_items("precision")  # set once a gradient program ran
        info.metadata["precision"] = checked[0][1].note if checked else "float32"
        if handle.remote is not None:
            info.metadata.update(handle.remote.describe())
        return info

    # ---- inference -----------------------------------------------------------------------

    def predict(self, request: pb.PredictRequest, cost: CostCounter) -> pb.PredictResponse:
        scores = self.engine.predict(
            request.model, request.version,
            lambda spec: decode_input(request.input, spec, self.config, writable=False,
                                      resize=request.resize), cost)
        return pb.PredictResponse(
            model=scores.handle.name, version=scores.handle.version,
            predictions=predictions(scores.logits, scores.handle.spec().class_labels,
                                    request.top_k, scores.handle.spec().output_kind),
            logits=array_to_tensor(scores.logits.astype(np.float32)),
            cost=pb.Cost(forward_passes=cost.forward_passes, wall_seconds=scores.wall_seconds,
                         cpu_seconds=scores.cpu_seconds),
        )

    def order(self, request: pb.ExplainRequest,
              geometry: ImageGeometry | None = None) -> ExplainOrder:
        """The engine's order for an Explain request; ``geometry`` records where its images
        went in the model's input."""
        which = request.WhichOneof("params")
        return ExplainOrder(
            model=request.model, version=request.version, method=request.method,
            decode=lambda spec: decode_input(request.input, spec, self.config,
                                             resize=request.resize, geometry=geometry),
            params=getattr(request, which) if which else None, params_field=which,
            target=target_of(request.target, self.config.max_batch), seed=int(request.seed),
            max_latency_ms=request.budget.max_latency_ms,
            best_effort=request.budget.best_effort,
            wants_overlays=request.return_overlay, wants_raw=request.return_raw,
        )

    def explain(
        self,
        request: pb.ExplainRequest,
        state: RequestState,
        cost: CostCounter,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
    ) -> pb.ExplainResponse:
        """Runs one Explain request to completion (or raises a ServiceError)."""
        geometry = ImageGeometry(keep_pixels=request.return_overlay)
        done = self.engine.explain(self.order(request, geometry), state, cost, on_progress)
        return self.response(done, request, cost, geometry, state.check)

    @staticmethod
    def response(done: Explanation, request: pb.ExplainRequest, cost: CostCounter,
                 geometry: ImageGeometry | None = None,
                 check: Callable[[], None] | None = None) -> pb.ExplainResponse:
        """The reply to ``request``; ``check`` (the request's deadline and cancellation)
        runs between overlays."""
        handle, result, spec = done.handle, done.result, done.handle.spec()
        geometry = geometry or ImageGeometry()  # maps in the images' geometry, when it says
        maps = geometry.maps(result.maps)
        response = pb.ExplainResponse(
            model=handle.name, version=handle.version,
            saliency=array_to_tensor(maps),
            predictions=predictions(done.logits, spec.class_labels, request.top_k,
                                    spec.output_kind),
            targets=done.targets.tolist(),
            diagnostics={**result.diagnostics,
                         "precision_bits": float(precision_bits(handle, done.handler))},
            request_id=uuid.uuid4().hex,
        )
        if request.return_raw:
            response.raw.CopyFrom(array_to_tensor(result.raw.astype(np.float32)))
        if request.return_overlay:
            pictures = geometry.pictures(spec.input) if geometry.follows_images else done.inputs
            response.overlays.extend(captioned_overlays(
                pictures, spec.input, maps, done.targets, spec.class_labels,
                done.handler.name, cost, time.perf_counter() - done.started, result.overlays,
                check))
        response.cost.CopyFrom(pb.Cost(
            method=done.handler.method, forward_passes=cost.forward_passes,
            backward_passes=cost.backward_passes, wall_seconds=time.perf_counter() - done.started,
            cpu_seconds=time.process_time() - done.cpu_started, truncated=result.truncated))
        return response
