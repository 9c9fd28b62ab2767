"""The Handler contract: what a method declares, and the steps every method shares.

A method is one subclass: its name, its parameters dataclass (``core.params``), its
needs and its cost, and ``_compute``. The base checks, runs and normalizes; chunking by the
memory budget and the deadline checks between chunks live on the ``Job``
(``saliency_service.core.request``), so a new method is one small file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from saliency_service.core.dense import DETECTION, DETECTORS
from saliency_service.core.outputs import softmax
from saliency_service.core.params import defaults_of, from_values
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import DEFAULT_LIMITS, Attribution, Job, Result, chunks

__all__ = ["ENGINE_ONNX", "ENGINE_TORCH", "Attribution", "Handler", "Job", "NoParams",
           "Result", "chunks", "normalize_per_image", "run_onnx_batched",
           "scale_by_max", "softmax"]

ENGINE_TORCH = "torch"
ENGINE_ONNX = "onnxruntime"
# One torch forward + input-gradient backward pass, and a Grad-CAM pass (backward only down
# to the CAM layer), in ONNX Runtime forward passes: METHOD_AUTO's unit before measurement.
TORCH_GRADIENT_PASS = 4.5
CAM_PASS = 2.0


def normalize_per_image(maps: np.ndarray) -> np.ndarray:
    """Min-max scales each N×H×W map into [0, 1]; a flat map becomes all zeros."""
    maps = maps.astype(np.float32, copy=False)
    low = maps.reshape(maps.shape[0], -1).min(axis=1).reshape(-1, 1, 1)
    high = maps.reshape(maps.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (maps - low) / safe, 0.0).astype(np.float32)


def scale_by_max(maps: np.ndarray) -> np.ndarray:
    """Divides each non-negative N×H×W map by its maximum (0 stays 0, so absence stays absent)."""
    maps = np.maximum(maps.astype(np.float32, copy=False), 0.0)
    high = maps.reshape(maps.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(high > 0, maps / np.where(high > 0, high, 1.0), 0.0).astype(np.float32)


@dataclass(frozen=True)
class NoParams:
    """The parameters of a method that takes none."""


class Handler:
    """One explanation method; a subclass declares everything about it.

    ``name`` (``vanilla_gradient``) is also its ``params_field``; ``Params`` is the
    parameters dataclass (``core.params``: defaults, ranges, choices and the server limit
    of each field); ``auto_rank`` places it in METHOD_AUTO's preference (lower first, None
    = ranked after the others); ``warm_up`` runs it once (with ``warm_up_overrides``)
    before a package reports ready;
    ``prior_passes`` is its expected cost before it has been measured. A method overrides
    ``_compute`` (and ``check``, ``to_maps`` where it needs to).
    """

    name: ClassVar[str]
    params_field: ClassVar[str]
    Params: ClassVar[type] = NoParams
    engine: ClassVar[str] = ENGINE_ONNX
    needs_torch: ClassVar[bool] = False
    uses_gradients: ClassVar[bool] = False
    needs_scales: ClassVar[bool] = False
    # Ask the service to return ``scale_outputs_for(model)`` from its prediction run.
    wants_scale_outputs: ClassVar[bool] = False
    auto_rank: ClassVar[int | None] = None
    warm_up: ClassVar[bool] = True
    # Parameters of the warm-up run where the defaults would cost many passes.
    warm_up_overrides: ClassVar[dict[str, Any]] = {}
    # Whether a black-box method also explains detectors' and segmenters' targets (their
    # scores read as class probabilities, ``core.dense.TargetedModel``), and whether it
    # explains nothing else.
    explains_dense: ClassVar[bool] = True
    detectors_only: ClassVar[bool] = False
    # Whether the map is the same whatever the target (SMOE Scale reads the features alone).
    target_free: ClassVar[bool] = False
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.params_field = cls.name

    @property
    def defaults(self) -> dict[str, Any]:
        return defaults_of(self.Params)

    def params(self, values: Mapping[str, Any] | None = None,
               limits: Mapping[str, float] = DEFAULT_LIMITS, **overrides: Any) -> Any:
        """The method's parameters: the dataclass defaults, replaced by keyword
        ``overrides`` (code), then by the ``values`` the client set (name → value); all
        checked once against the field declarations and the server ``limits``."""
        base = dataclasses.replace(self.Params(), **overrides) if overrides else None
        return from_values(self.Params, values, limits, self.params_field, base=base)

    def available_for(self, model: ModelHandle) -> bool:
        """Whether this package has what the method needs."""
        spec = model.spec()
        if spec.dense is not None:
            return not self._dense_problem(model)
        if self.detectors_only:
            return False
        if model.remote is not None and not self.black_box:
            return False
        if self.needs_torch and gradients_problem(model):
            return False
        return not (self.needs_scales and not spec.scale_outputs)

    def unavailable_reason(self, model: ModelHandle) -> str:
        """What the package lacks for this method (empty when it is available)."""
        if self.available_for(model):
            return ""
        kind = model.spec().output_kind
        if model.spec().dense is not None:
            return self._dense_problem(model)
        if self.detectors_only:
            return f"it explains detectors; this model's outputs are {kind} class scores"
        if model.remote is not None and not self.black_box:
            return (f"the model is served remotely by a {model.remote.spec.protocol} predictor, "
                    "which gives only its class scores; this method needs "
                    + ("gradients through the graph" if self.needs_torch
                       else "its intermediate feature maps"))
        if self.needs_torch and gradients_problem(model):
            return gradients_problem(model)
        grid = model.spec().token_grid
        if grid:
            height, width = grid["grid"]
            return (f"it needs spatial scale outputs; this model's features are tokens on a "
                    f"{height}×{width} patch grid (a vision transformer), not feature maps")
        return "it needs scale outputs" + scales_missing(model)

    def _dense_problem(self, model: ModelHandle) -> str:
        """Why this method does not explain a detector's or segmenter's targets ("" when
        it does): black-box methods read each target's score; gradient methods differentiate
        it (a region's summed class logit, a raw grid detection's box score) where the graph
        translates; the multi-scale path and post-NMS graphs have nothing to read."""
        dense = model.spec().dense
        assert dense is not None
        kind = dense.kind.replace("_", " ")
        if self.detectors_only and dense.kind not in DETECTORS:
            return f"it explains detectors; this model is a {kind} model"
        if self.black_box:
            return "" if self.explains_dense else f"it does not explain {kind} models"
        if self.needs_scales and not model.spec().scale_outputs:
            return (f"it needs scale outputs, which this {kind} package lacks"
                    + scales_missing(model))
        if dense.kind == DETECTION and not self.target_free:
            return ("the detector's scores come out of NMS inside its graph, which passes no "
                    "gradient to a box: use D-RISE or another black-box method, or serve the "
                    "raw grid head (outputs.kind detection_raw)")
        return gradients_problem(model) if self.needs_torch else ""

    @property
    def black_box(self) -> bool:
        """Whether the method reads only the model's class scores (so a remote model,
        ``core.remote``, serves it)."""
        return not (self.needs_torch or self.needs_scales or self.wants_scale_outputs)

    def scale_outputs_for(self, model: ModelHandle) -> list[str]:
        """ONNX outputs (beside the logits) to fetch in the prediction run."""
        return list(model.spec().scale_outputs)

    def repeats(self, model: ModelHandle) -> float:
        """Network passes per image with the default parameters (samples, steps, masks)."""
        return 1.0

    def prior_passes(self, model: ModelHandle) -> float:
        """Expected cost per image in ONNX Runtime forward passes, the prediction run
        included, before the method has been measured on this model."""
        per_pass = TORCH_GRADIENT_PASS if self.uses_gradients else 1.0
        return 1.0 + self.repeats(model) * per_pass

    def check(self, job: Job) -> None:
        """Raises InvalidInput for parameters that are wrong for this input or model
        (ranges and limits are the dataclass's); override per method."""

    def explain(self, job: Job) -> Result:
        """Checks, computes and normalizes; the one entry point the service calls."""
        self.check(job)
        job.state.check()
        found = self._compute(job)
        if not isinstance(found, Attribution):
            found = Attribution(raw=found)
        maps = self.to_maps(found.raw, job)
        if maps.shape != (job.batch, job.inputs.shape[2], job.inputs.shape[3]):
            raise RuntimeError(f"{self.name} produced maps of shape {maps.shape}")
        maps = maps.astype(np.float32, copy=False)
        if not np.isfinite(maps).all():  # cheap check; the copy only when needed
            maps = np.nan_to_num(maps)
        return Result(maps=maps, raw=found.raw, diagnostics=dict(found.diagnostics),
                      truncated=found.truncated, overlays=found.overlays)

    def _compute(self, job: Job) -> np.ndarray | Attribution:
        raise NotImplementedError

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        """Default: |attribution| max over channels, scaled by the image's maximum."""
        if raw.ndim == 4:
            raw = np.abs(raw).max(axis=1)
        return scale_by_max(raw)


def scales_missing(model: ModelHandle) -> str:
    """"; " + why ``saliency import`` found no scale outputs in the graph ("" if unknown)."""
    why = model.spec().extra.get("exporter", {}).get("scales_missing", "")
    return f"; {why}" if isinstance(why, str) and why else ""


TORCH_EXTRA = "needs PyTorch, which this install lacks: pip install 'saliency-service[torch]'"


def gradients_problem(model: ModelHandle) -> str:
    """Why the package's graph cannot be differentiated ("" when it can): its translation to
    torch, checked against ONNX Runtime (``methods._utils.gradient_program``)."""
    try:
        from saliency_service.methods._utils.gradient_program import (  # noqa: PLC0415
            gradient_problem,
        )
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        return TORCH_EXTRA
    return gradient_problem(model)


def run_onnx_batched(
    job: Job, batch: np.ndarray, outputs: list[str] | None = None,
    chunk_items: int | None = None,
) -> list[np.ndarray]:
    """Runs ``batch`` through ONNX Runtime in memory-bounded chunks, checking the deadline
    between chunks and counting one forward pass per image."""
    size = chunk_items or job.items_per_chunk()
    results: list[list[np.ndarray]] = []
    for part in job.checked_chunks(batch.shape[0], size):
        results.append(job.model.run(batch[part], outputs, job.state, job.cost.remote))
        job.cost.forward(part.stop - part.start, ENGINE_ONNX)
    return [np.concatenate([r[i] for r in results]) for i in range(len(results[0]))]
