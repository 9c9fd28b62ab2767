"""SMOE Scale, FastCAM and LOVI: saliency from the scale activations of one forward pass
(Mundhenk, Chen & Friedland, https://arxiv.org/abs/1911.11293; the maths is
``saliency_service.methods._utils.smoe``).

The maps are computed from outputs of the prediction run the service makes anyway (handlers
set ``wants_scale_outputs``), so SMOE, LOVI and FastCAM on a linear head cost one forward
pass per image. FastCAM multiplies the combined map by a class activation map; for a
global-average-pool + linear head the CAM is read off the head's weights
(``methods._utils.linear_head``), which is exactly Grad-CAM there with no backward pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from saliency_service.core import forward_engine
from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import param
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Attribution
from saliency_service.methods._utils.linear_head import linear_head
from saliency_service.methods._utils.resize import upsample
from saliency_service.methods._utils.smoe import (
    NORMALIZATIONS,
    combine,
    combined_map,
    layer_maps,
    smoe_scale,
)
from saliency_service.methods.base import (
    CAM_PASS,
    ENGINE_ONNX,
    Handler,
    Job,
    gradients_problem,
    run_onnx_batched,
    scale_by_max,
)
from saliency_service.methods.registry import register
from saliency_service.render.drawing import png
from saliency_service.render.lovi_picture import lovi_picture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiScaleParams:
    """Per-scale weights (empty = equal) and how each scale's map is squashed into [0, 1]."""

    weights: tuple[float, ...] = param(())
    normalization: str = param("gaussian_cdf", choices=NORMALIZATIONS)


class MultiScaleHandler(Handler):
    """Shared by SMOE Scale, FastCAM and LOVI: parameters and the per-scale maps."""

    engine = ENGINE_ONNX
    needs_scales = True
    wants_scale_outputs = True
    Params = MultiScaleParams
    paper = "https://arxiv.org/abs/1911.11293"

    def check(self, job: Job) -> None:
        self.weights(job)

    def weights(self, job: Job) -> np.ndarray:
        """One weight per scale output (equal when none are given), checked."""
        scales = len(job.model.spec().scale_outputs)
        weights = [float(w) for w in job.params.weights] or [1.0] * scales
        if len(weights) != scales:
            raise InvalidInput(
                f"{self.params_field}.weights has {len(weights)} values but model "
                f"{job.model.name!r} has {scales} scale outputs "
                f"{list(job.model.spec().scale_outputs)}: give one weight per scale, or none "
                "for equal weights")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise InvalidInput(f"{self.params_field}.weights must be finite, non-negative and "
                               f"sum to > 0, got {weights}")
        return np.asarray(weights)

    def prior_passes(self, model: ModelHandle) -> float:
        return 1.0

    def outputs(self, job: Job, names: list[str]) -> dict[str, np.ndarray]:
        """The named ONNX outputs of the prediction run; runs the network only if missing."""
        have = dict(job.scale_outputs or {})
        missing = [n for n in names if n not in have]
        if missing:
            have.update(zip(missing, run_onnx_batched(job, job.inputs, missing), strict=True))
        return have

    def smoe_maps(self, job: Job) -> list[np.ndarray]:
        """SMOE Scale of every scale output, N×hᵢ×wᵢ, at each scale's own resolution."""
        names = list(job.model.spec().scale_outputs)
        found = self.outputs(job, names)
        return [smoe_scale(found[n]) for n in names]

    def per_scale(self, job: Job) -> np.ndarray:
        """Normalized, upsampled SMOE maps N×S×H×W in [0, 1]."""
        height, width = job.inputs.shape[2:]
        return layer_maps(self.smoe_maps(job), job.params.normalization, height, width)

    def combined(self, job: Job) -> np.ndarray:
        """The weighted average of the normalized, upsampled per-scale maps, N×H×W."""
        height, width = job.inputs.shape[2:]
        return combined_map(self.smoe_maps(job), job.params.normalization,
                            self.weights(job), height, width)


@register
class SmoeScale(MultiScaleHandler):
    """SMOE Scale fast path: the weighted average of the normalized per-scale maps."""

    name = "smoe_scale"
    auto_rank = 9
    target_free = True
    warm_up = True
    description = ("SMOE Scale of every scale output, normalized and averaged; reuses the "
                   "prediction's forward pass (1 forward, 0 backward).")

    def _compute(self, job: Job) -> np.ndarray | Attribution:
        """The combined map N×H×W, or the per-scale maps N×S×H×W (the raw attribution)
        when the request wants them as raw output or pictures."""
        if not (job.wants_raw or self.renders(job)):
            return self.combined(job)
        layers = self.per_scale(job)
        if self.renders(job):
            return Attribution(raw=layers, overlays=tuple(png(lovi_picture(item))
                                                          for item in layers))
        return layers

    def renders(self, job: Job) -> bool:
        return False

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        maps = combine(raw, self.weights(job)) if raw.ndim == 4 else raw
        return np.clip(maps, 0.0, 1.0)


@register
class Lovi(SmoeScale):
    """LOVI: the per-scale maps as one picture (hue = depth), the combined map as saliency."""

    name = "lovi"
    description = ("Per-scale SMOE maps rendered as one PNG overlay (hue by depth, violet = "
                   "early, red = late); saliency is the combined map (1 forward, 0 backward).")

    def renders(self, job: Job) -> bool:
        return job.wants_overlays  # the pictures are the point of LOVI, but only when asked


@register
class FastCam(MultiScaleHandler):
    """FastCAM: the combined SMOE map × a class activation map of the target class.

    On a GAP+linear head the CAM is W[target] · A over the last scale output, which equals
    Grad-CAM there (∂ logit / ∂ A_k(i,j) = W[target,k] / hw), so no backward pass runs.
    Other heads fall back to Grad-CAM on the torch program.
    """

    name = "fastcam"
    auto_rank = 2
    description = ("Combined SMOE map × class activation map; 1 forward on a GAP+linear "
                   "head, otherwise + 1 torch forward/backward for Grad-CAM.")

    def available_for(self, model: ModelHandle) -> bool:
        if not super().available_for(model):
            return False
        return model.spec().head.get("type") == "gap_linear" or not gradients_problem(model)

    def prior_passes(self, model: ModelHandle) -> float:
        return 1.0 if model.spec().head.get("type") == "gap_linear" else 1.0 + CAM_PASS

    def _compute(self, job: Job) -> Attribution:
        cam, backward_free = self.cam(job)
        height, width = job.inputs.shape[2:]
        return Attribution(raw=self.combined(job) * upsample(cam, height, width),
                           diagnostics={"cam_backward_free": float(backward_free)})

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        return scale_by_max(raw)

    def cam(self, job: Job) -> tuple[np.ndarray, bool]:
        """Raw ReLU'd CAM N×h×w, and whether it came without a backward pass: from the
        linear head when its logits check out, else Grad-CAM on the torch program."""
        head = linear_head(job.model)
        name = cam_output(job.model)
        if head is not None:
            activations = self.outputs(job, [name])[name]
            rows = np.arange(job.batch)
            if job.base_logits is None or _logits_match(
                    head.logits(activations, job.targets), job.base_logits[rows, job.targets],
                    forward_engine.logit_tolerance(job.model)):
                return head.cam(activations, job.targets), True
            log.warning("model %s: the linear head does not reproduce the logits; using "
                        "Grad-CAM", job.model.name)
        from saliency_service.methods.cam import grad_cam  # noqa: PLC0415 - torch only here

        return grad_cam(job, name), False


def cam_output(model: ModelHandle) -> str:
    spec = model.spec()
    return str(spec.head.get("scale_output") or spec.cam_output or spec.scale_outputs[-1])


def _logits_match(predicted: np.ndarray, actual: np.ndarray, relative: float = 1e-3) -> bool:
    tolerance = relative * max(1.0, float(np.abs(actual).max()))
    return predicted.shape == actual.shape and float(np.abs(predicted - actual).max()) <= tolerance
