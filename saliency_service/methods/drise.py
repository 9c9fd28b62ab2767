"""D-RISE (Petsiuk et al., arXiv 2006.03204): RISE on a detector. Each random mask weighs by
the best similarity of the detections on the masked image to the target — IoU of the boxes ×
cosine of the class vectors × objectness (``core.dense.target_scores``) — and a target's map
is ``Σ_i w_i M_i / (N · p_keep)``. The paper's finer 16×16 grid suits objects smaller than
the image."""

from __future__ import annotations

from dataclasses import dataclass

from saliency_service.core.params import param
from saliency_service.methods.perturbation import Rise, RiseParams
from saliency_service.methods.registry import register


@dataclass(frozen=True)
class DriseParams(RiseParams):
    """RISE's masks on the paper's 16×16 grid."""

    cells: int = param(16, low=1)


@register
class Drise(Rise):
    """One map per detection: where masking it makes the detector lose the target box."""

    name = "drise"
    Params = DriseParams
    detectors_only = True
    description = "RISE on a detector, masks weighted by detection similarity (box × class)."
    paper = "https://arxiv.org/abs/2006.03204"
