"""Grad-CAM (Selvaraju et al., arXiv 1610.02391) and Grad-CAM++ (Chattopadhay et al.,
arXiv 1710.11063) at a scale output of the exported program.

The program already returns the scale activations, so the gradient is
``torch.autograd.grad(logit, scale_output)`` on a program copy where that output is a leaf:
the layers before it run without autograd and the backward stops there.

Maps: the ReLU'd CAM upsampled bilinearly (align_corners=False) to the input size, then
min-max normalized per image (pytorch-grad-cam's result; an all-zero CAM stays all zeros).
``return_raw`` gives the signed CAM before the ReLU at the layer's resolution (N×h×w, Captum's
``relu_attributions=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import param
from saliency_service.core.repository import ModelHandle
from saliency_service.methods._utils.layer_program import find_layer, layer_module
from saliency_service.methods._utils.resize import upsample
from saliency_service.methods._utils.target_score import selected_scores
from saliency_service.methods._utils.torch_program import CUT_PREFIX, prepared_module
from saliency_service.methods.base import (
    CAM_PASS,
    ENGINE_TORCH,
    Job,
    normalize_per_image,
    scales_missing,
)
from saliency_service.methods.gradients import GradientHandler
from saliency_service.methods.registry import register

# pytorch-grad-cam's guard in the Grad-CAM++ α denominator.
PLUS_PLUS_EPSILON = 1e-6


def resolve_layer(job: Job, layer: str) -> str:
    """The output for ``layer``: '' = the manifest's CAM output, a scale or token output
    name, or a module name listed in the manifest's scale modules (or its CAM layer); else
    the ONNX tensor of any N×C×H×W layer named by tensor, node or module (``find_layer``)."""
    spec = job.model.spec()
    if not layer:
        if not spec.cam_output:
            raise InvalidInput(
                f"model {spec.name!r} names no CAM layer; set params.layer to "
                f"one of {list(spec.extra_outputs)}"
            )
        return spec.cam_output
    if layer in spec.extra_outputs:
        return layer
    if layer in spec.scale_modules:
        return spec.scale_outputs[spec.scale_modules.index(layer)]
    if layer == spec.cam_layer:
        return spec.cam_output
    return find_layer(job.model, layer)


def as_feature_map(model: ModelHandle, output_name: str, values: np.ndarray) -> np.ndarray:
    """N×K×h×w for a scale output as it is; for the token output, the patch tokens on their
    grid (class and register tokens dropped), as pytorch-grad-cam's ``reshape_transform``."""
    grid = model.spec().token_grid
    if not grid or output_name != grid.get("output"):
        return values
    if int(grid.get("batch_dim", 0)) == 1:
        values = values.transpose(1, 0, 2)
    height, width = (int(v) for v in grid["grid"])
    patches = values[:, int(grid.get("prefix_tokens", 0)):, :]
    return np.ascontiguousarray(
        patches.reshape(values.shape[0], height, width, values.shape[2]).transpose(0, 3, 1, 2))


def layer_gradients(job: Job, output_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Activations A and ∂ logit[target] / ∂ A at ``output_name`` (both N×K×h×w float32;
    tokens reshaped to their patch grid): an extra output, or an ONNX tensor a client named.

    One forward and one (partial) backward pass per image, chunked by the memory budget.
    """
    extra_outputs = job.model.spec().extra_outputs
    if output_name in extra_outputs:
        module = prepared_module(job.model, CUT_PREFIX + output_name)
        index = extra_outputs.index(output_name) + 1
    else:  # a layer the client named
        module, index = layer_module(job.model, output_name, job.state)
    grid = job.model.spec().token_grid
    # Tokens may come L×N×D (batch second); feature maps are N×K×h×w.
    batch_dim = int(grid.get("batch_dim", 0)) if grid and output_name == grid.get("output") else 0
    activations: list[np.ndarray] = []
    gradients: list[np.ndarray] = []
    targets = torch.from_numpy(job.targets.astype(np.int64)).view(-1, 1)
    for part in job.checked_chunks(job.batch, job.items_per_chunk(backward=True)):
        outputs = module(torch.from_numpy(np.ascontiguousarray(job.inputs[part])))
        count = part.stop - part.start
        activation = outputs[index]  # a fixed-batch graph's padding rows come after ``count``
        selected = selected_scores(job, outputs, targets[part]).sum()
        (grad,) = torch.autograd.grad(selected, activation)
        activations.append(as_feature_map(job.model, output_name, _rows(
            activation.detach(), batch_dim, count)))
        gradients.append(as_feature_map(job.model, output_name, _rows(grad, batch_dim, count)))
        job.cost.forward(count, ENGINE_TORCH)
        job.cost.backward(count)
    return np.concatenate(activations), np.concatenate(gradients)


def _rows(values: torch.Tensor, batch_dim: int, count: int) -> np.ndarray:
    """The first ``count`` items of ``values`` along its batch dimension, as numpy."""
    return values.narrow(batch_dim, 0, count).contiguous().cpu().numpy()


def gradcam_weights(_activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM: the spatial mean of the gradient per channel (N×K)."""
    return gradients.mean(axis=(2, 3))


def gradcam_plus_plus_weights(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ with the exponential-output closed form, as in pytorch-grad-cam:
    α = g² / (2g² + ΣA · g³ + ε) where g ≠ 0 (else 0); weight = Σ α · ReLU(g)."""
    squares = gradients**2
    cubes = squares * gradients
    activation_sums = activations.sum(axis=(2, 3))[:, :, None, None]
    alpha = squares / (2 * squares + activation_sums * cubes + PLUS_PLUS_EPSILON)
    alpha = np.where(gradients != 0, alpha, 0)
    return (np.maximum(gradients, 0) * alpha).sum(axis=(2, 3))


def signed_cam(job: Job, output_name: str,
               weights: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
               ) -> np.ndarray:
    """Σ_k w_k A_k at ``output_name`` before the ReLU (N×h×w float32); ``weights`` maps
    activations and gradients (N×K×h×w) to the channel weights w (N×K), Grad-CAM's by
    default."""
    activations, gradients = layer_gradients(job, output_name)
    channel_weights = (weights or gradcam_weights)(activations, gradients)
    return np.einsum("nk,nkhw->nhw", channel_weights, activations).astype(np.float32)


def grad_cam(job: Job, output_name: str) -> np.ndarray:
    """The ReLU'd Grad-CAM (N×h×w float32) at scale output ``output_name``, before upsampling."""
    return np.maximum(signed_cam(job, output_name), 0.0)


@dataclass(frozen=True)
class CamParams:
    """The layer: a scale output or module name, or any N×C×H×W tensor of the graph by
    tensor, node or module name; empty = the manifest's CAM layer."""

    layer: str = param("")


class CamHandler(GradientHandler):
    """The CAM pipeline (layer choice, activations and gradients, map making); a variant
    overrides ``weights`` alone, as pytorch-grad-cam's ``get_cam_weights``."""

    Params = CamParams

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        """Channel weights (N×K) from activations and gradients (N×K×h×w): Grad-CAM's."""
        return gradcam_weights(activations, gradients)

    def available_for(self, model: ModelHandle) -> bool:
        return super().available_for(model) and bool(model.spec().extra_outputs)

    def unavailable_reason(self, model: ModelHandle) -> str:
        if super().available_for(model) and not model.spec().extra_outputs:
            return "it needs a CAM layer (scale or token outputs)" + scales_missing(model)
        return super().unavailable_reason(model)

    def check(self, job: Job) -> None:
        resolve_layer(job, job.params.layer)

    def prior_passes(self, model: ModelHandle) -> float:
        return 1.0 + CAM_PASS

    def _compute(self, job: Job) -> np.ndarray:
        return signed_cam(job, resolve_layer(job, job.params.layer), self.weights)

    def to_maps(self, raw: np.ndarray, job: Job) -> np.ndarray:
        positive = np.maximum(raw, 0.0)
        return normalize_per_image(upsample(positive, job.inputs.shape[2], job.inputs.shape[3]))


@register
class GradCam(CamHandler):
    """Grad-CAM: channel weights are the spatially averaged gradients of the target logit."""

    name = "gradcam"
    auto_rank = 3
    warm_up = True
    description = "Gradient-weighted class activation map at the CAM layer; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/1610.02391"


@register
class GradCamPlusPlus(CamHandler):
    """Grad-CAM++: channel weights from positive gradients with per-pixel α coefficients."""

    name = "gradcam_plus_plus"
    description = "Grad-CAM with higher-order pixel weights; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/1710.11063"

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return gradcam_plus_plus_weights(activations, gradients)
