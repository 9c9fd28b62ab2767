"""XGrad-CAM (Fu et al., arXiv 2008.02312): Grad-CAM whose channel weights average the
gradient over the activation's own spatial distribution, Σ (A / ΣA) · ∂y/∂A."""

from __future__ import annotations

import numpy as np

from saliency_service.methods.cam import CamHandler
from saliency_service.methods.registry import register

# pytorch-grad-cam's guard against a channel whose activations sum to zero.
EPSILON = 1e-7


@register
class XGradCam(CamHandler):
    """XGrad-CAM: gradients weighted by the normalized activations, summed per channel."""

    name = "xgradcam"
    description = "Grad-CAM with activation-weighted gradients; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/2008.02312"

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        sums = activations.sum(axis=(2, 3), keepdims=True)
        return (gradients * activations / (sums + EPSILON)).sum(axis=(2, 3))
