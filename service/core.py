"""The transport-free core: decode and validate a request, run its handler, build the reply.

It raises ``service.errors`` exceptions and never touches a gRPC context, so it
can be driven in-process (benchmarks, TorchServe) exactly as the server drives it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import numpy as np

from handlers import registry
from handlers.base import ENGINE_ONNX, Handler
from kernel.errors import InvalidInput, NotFound
from kernel.repository import ModelHandle, Repository
from kernel.request import CostCounter, Job, ProgressUpdate, RequestState
from saliency.v1 import explainer_pb2 as pb
from service.config import Config
from service.images import array_to_tensor
from service.inputs import decode_input, resolve_targets
from service.metrics import Metrics
from service.overlays import captioned_overlays
from service.predictions import predictions

_DEFAULT_FORWARD_SECONDS = 0.03


class Core:
    """Runs requests against the repository; every public call is one request."""

    def __init__(self, repository: Repository, config: Config, metrics: Metrics) -> None:
        self.repository = repository
        self.config = config
        self.metrics = metrics
        self.limits = config.limits()

    # ---- discovery -----------------------------------------------------------------------

    def methods_for(self, model: ModelHandle) -> list[Handler]:
        return [h for h in registry.handlers() if h.available_for(model)]

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
            mean=spec.input.mean, std=spec.input.std, value_range=spec.input.value_range))
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
        for key, value in spec.extra.get("exporter", {}).items():
            info.metadata[f"exporter.{key}"] = str(value)
        return info

    # ---- inference -----------------------------------------------------------------------

    def predict(self, request: pb.PredictRequest, cost: CostCounter) -> pb.PredictResponse:
        handle = self.repository.get(request.model, request.version)
        spec = handle.spec()
        inputs = decode_input(request.input, spec.input, self.config, writable=False)
        started = time.perf_counter()
        cpu_started = time.process_time()
        (logits,) = handle.run(inputs)
        cost.forward(inputs.shape[0], ENGINE_ONNX)
        return pb.PredictResponse(
            model=handle.name, version=handle.version,
            predictions=predictions(logits, spec.class_labels, request.top_k),
            logits=array_to_tensor(logits.astype(np.float32)),
            cost=pb.Cost(forward_passes=cost.forward_passes,
                         wall_seconds=time.perf_counter() - started,
                         cpu_seconds=time.process_time() - cpu_started),
        )

    def choose_handler(self, request: pb.ExplainRequest, handle: ModelHandle) -> Handler:
        """The handler for the request; METHOD_AUTO picks by measured cost and budget."""
        if request.method == pb.METHOD_UNSPECIFIED:
            raise InvalidInput("method is unset: choose one, e.g. METHOD_VANILLA_GRADIENT, "
                               "or METHOD_AUTO")
        if request.method == pb.METHOD_AUTO:
            return self._auto(request, handle, {h.method: h for h in self.methods_for(handle)})
        handler = registry.get(request.method)
        if not handler.available_for(handle):
            names = ", ".join(h.name for h in self.methods_for(handle))
            raise NotFound(f"method {handler.name} is not offered for model {handle.name!r} "
                           f"({handler.unavailable_reason(handle)}); available methods: "
                           f"{names}")
        return handler

    def _auto(self, request: pb.ExplainRequest, handle: ModelHandle,
              available: dict[int, Handler], forward_seconds: float | None = None) -> Handler:
        """The most preferred method whose expected latency fits ``budget.max_latency_ms``,
        else the cheapest. Expected latency is the measured mean (``Metrics.mean_cost``) or,
        before any measurement, ``prior_forward_passes`` × the prediction run's time."""
        budget_seconds = request.budget.max_latency_ms / 1000.0
        ranked = sorted(available.values(), key=lambda h: (
            h.auto_rank is None, h.auto_rank if h.auto_rank is not None else 0, h.method))
        if not ranked:
            raise NotFound(f"model {handle.name!r} offers no methods")
        if budget_seconds <= 0:
            return ranked[0]
        unit = forward_seconds if forward_seconds else _DEFAULT_FORWARD_SECONDS
        expected = []
        for handler in ranked:
            mean = self.metrics.mean_cost(handle.name, handler.name)
            seconds = (mean.mean_seconds if mean.requests
                       else handler.prior_passes(handle) * unit)
            if seconds <= budget_seconds:
                return handler
            expected.append((seconds, len(expected), handler))
        return min(expected)[2]

    def _params(self, request: pb.ExplainRequest, handler: Handler) -> object:
        which = request.WhichOneof("params")
        if which is not None and which != handler.params_field:
            raise InvalidInput(f"params {which!r} were given for method {handler.name}; "
                               f"it takes {handler.params_field!r}")
        return handler.params(getattr(request, which) if which else None, self.limits)

    @staticmethod
    def _prediction_run(handle: ModelHandle, inputs: np.ndarray, names: list[str],
                        cost: CostCounter) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The one ONNX Runtime pass for the prediction, plus any outputs handlers read."""
        logits, *extra = handle.run(inputs, [handle.spec().logits_output, *names])
        cost.forward(inputs.shape[0], ENGINE_ONNX)
        return logits, dict(zip(names, extra, strict=True))

    def explain(
        self,
        request: pb.ExplainRequest,
        state: RequestState,
        cost: CostCounter,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
    ) -> pb.ExplainResponse:
        """Runs one Explain request to completion (or raises a ServiceError)."""
        started = time.perf_counter()
        cpu_started = time.process_time()
        handle = self.repository.get(request.model, request.version)
        spec = handle.spec()
        if request.method == pb.METHOD_AUTO and request.budget.max_latency_ms > 0:
            # AUTO times the prediction run to price methods not yet measured; that run also
            # fetches the outputs forward-only methods read, so any choice costs one pass.
            inputs = decode_input(request.input, spec.input, self.config)
            state.check()
            available = {h.method: h for h in self.methods_for(handle)}
            names = list(dict.fromkeys(
                n for h in available.values() if h.wants_scale_outputs
                for n in h.scale_outputs_for(handle)))
            run_started = time.perf_counter()
            logits, extra = self._prediction_run(handle, inputs, names, cost)
            handler = self._auto(request, handle, available, time.perf_counter() - run_started)
            params = self._params(request, handler)
        else:
            handler = self.choose_handler(request, handle)
            params = self._params(request, handler)
            inputs = decode_input(request.input, spec.input, self.config)
            state.check()
            names = handler.scale_outputs_for(handle) if handler.wants_scale_outputs else []
            logits, extra = self._prediction_run(handle, inputs, names, cost)
        targets = resolve_targets(request.target, logits)
        job = Job(
            model=handle, inputs=inputs, targets=targets, params=params, base_logits=logits,
            seed=int(request.seed), state=state, cost=cost, limits=self.limits,
            best_effort=request.budget.best_effort, on_progress=on_progress,
            scale_outputs=extra or None, wants_overlays=request.return_overlay,
            wants_raw=request.return_raw,
        )
        result = handler.explain(job)
        response = pb.ExplainResponse(
            model=handle.name, version=handle.version,
            saliency=array_to_tensor(result.maps),
            predictions=predictions(logits, spec.class_labels, request.top_k),
            targets=targets.tolist(),
            diagnostics=result.diagnostics,
            request_id=uuid.uuid4().hex,
        )
        if request.return_raw:
            response.raw.CopyFrom(array_to_tensor(result.raw.astype(np.float32)))
        wall = time.perf_counter() - started
        if request.return_overlay:
            response.overlays.extend(result.overlays or captioned_overlays(
                inputs, spec.input, result.maps, targets, spec.class_labels,
                handler.name, cost, wall))
        response.cost.CopyFrom(pb.Cost(
            method=handler.method, forward_passes=cost.forward_passes,
            backward_passes=cost.backward_passes, wall_seconds=time.perf_counter() - started,
            cpu_seconds=time.process_time() - cpu_started, truncated=result.truncated))
        return response
