"""Grad-CAM on a detection's or a region's score, for PyTorch detectors and segmenters.

Grad-CAM (Selvaraju et al., https://arxiv.org/abs/1610.02391) weighs a layer's channels by the
spatial mean of the target score's gradient. The target scores:
- a detection of a raw grid head: its cell's objectness × its class's probability;
- a detection of a model with NMS inside: its row of the ``scores`` output;
- a segmentation region: the class's logit summed over the region (Seg-Grad-CAM, Vinogradova
  et al., https://arxiv.org/abs/2002.11434).

The module is never changed: one forward hook reads the layer's output and is removed in
``finally``; gradients are taken with ``torch.autograd.grad`` (no ``.grad`` left behind).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from saliency_service.methods._utils.resize import upsample

Score = Callable[[Any], torch.Tensor]
"""The module's output → one target score per batch item (N)."""


def grad_cam(module: nn.Module, layer: str, inputs: torch.Tensor, score: Score) -> np.ndarray:
    """Grad-CAM maps (float32 N×H×W, each min-max scaled to [0, 1] after a bilinear
    upsampling to the input size) of ``score`` at ``module``'s submodule ``layer``."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output)

    hook = module.get_submodule(layer).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            values = score(module(inputs))
            (gradients,) = torch.autograd.grad(values.sum(), captured[-1])
    finally:
        hook.remove()
    activations = captured[-1].detach()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * activations).sum(dim=1)).numpy()
    return scale_to_unit(upsample(cams, *inputs.shape[2:]))


def scale_to_unit(maps: np.ndarray) -> np.ndarray:
    """Each map minus its minimum over its maximum (1e-7 keeps a flat map at 0)."""
    maps = maps - maps.reshape(len(maps), -1).min(axis=1)[:, None, None]
    return (maps / (1e-7 + maps.reshape(len(maps), -1).max(axis=1)[:, None, None])).astype(
        np.float32)


def grid_box_score(cells: torch.Tensor, classes: torch.Tensor) -> Score:
    """Score of a raw grid head (N×(5 + K)×S×S): item n's cell ``cells[n]`` (row-major) as
    objectness × the probability of ``classes[n]``."""
    def score(raw: torch.Tensor) -> torch.Tensor:
        flat = raw.flatten(2)  # N×(5 + K)×S²
        rows = torch.arange(len(flat))
        objectness = torch.sigmoid(flat[rows, 0, cells])
        probabilities = torch.softmax(flat[rows, 5:, cells], dim=1)
        return objectness * probabilities[rows, classes]
    return score


def post_nms_score(rows: torch.Tensor) -> Score:
    """Score of a post-NMS model (boxes, scores, classes): item n's detection ``rows[n]``."""
    def score(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scores = outputs[1]
        return scores[torch.arange(len(scores)), rows]
    return score


def region_score(classes: torch.Tensor, regions: torch.Tensor) -> Score:
    """Score of a segmenter's N×K×H×W logits: class ``classes[n]``'s logit summed over
    ``regions[n]`` (bool N×H×W)."""
    def score(logits: torch.Tensor) -> torch.Tensor:
        chosen = logits[torch.arange(len(logits)), classes]  # N×H×W
        return (chosen * regions.to(chosen.dtype)).sum(dim=(1, 2))
    return score

