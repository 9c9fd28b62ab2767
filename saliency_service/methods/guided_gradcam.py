"""Guided Grad-CAM (Selvaraju et al., arXiv 1610.02391): Guided Backprop × upsampled Grad-CAM.

Composed of the two methods, as Captum's ``GuidedGradCam`` composes ``LayerGradCam`` and
``GuidedBackprop``: pixel-level detail from Guided Backprop, class-discriminative through the
ReLU'd Grad-CAM upsampled bilinearly to the input (``interpolate_mode="bilinear"``).
Cost: two forward and two backward passes per image.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.repository import ModelHandle
from saliency_service.methods._utils.resize import upsample
from saliency_service.methods._utils.torch_program import GUIDED
from saliency_service.methods.base import CAM_PASS, TORCH_GRADIENT_PASS, Job
from saliency_service.methods.cam import CamParams, GradCam, grad_cam, resolve_layer
from saliency_service.methods.gradients import GradientHandler, input_gradients
from saliency_service.methods.registry import register

_GRAD_CAM = GradCam()


@register
class GuidedGradCam(GradientHandler):
    """Guided Backprop at each pixel, weighted by the target's Grad-CAM there.

    Map: |attribution| maxed over channels, divided by the image's maximum.
    """

    name = "guided_gradcam"
    auto_rank = 0  # most mass on the object and passes the sanity checks (groundtruth.md)
    Params = CamParams  # the layer of the Grad-CAM factor
    description = "Guided Backprop × upsampled Grad-CAM; 2 forward + 2 backward."
    paper = "https://arxiv.org/abs/1610.02391"

    def available_for(self, model: ModelHandle) -> bool:
        return _GRAD_CAM.available_for(model)

    def unavailable_reason(self, model: ModelHandle) -> str:
        return _GRAD_CAM.unavailable_reason(model)

    def check(self, job: Job) -> None:
        _GRAD_CAM.check(job)

    def prior_passes(self, model: ModelHandle) -> float:
        return 1.0 + CAM_PASS + TORCH_GRADIENT_PASS

    def _compute(self, job: Job) -> np.ndarray:
        cam = grad_cam(job, resolve_layer(job, job.params.layer))
        guided = input_gradients(job, job.inputs, job.targets, variant=GUIDED)
        return guided * upsample(cam, *job.inputs.shape[2:])[:, None]
