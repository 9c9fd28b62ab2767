"""Explanation methods, one file each (helpers in ``_utils``); ``registry`` maps a method name
to its handler.

The handlers are importable from here by class name (``from saliency_service.methods import
IntegratedGradients``), each loaded on first use: the gradient methods need PyTorch, which an
install without the ``torch`` extra lacks, and the black-box ones must import without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "VanillaGradient": "gradients", "InputXGradient": "gradients",
    "GuidedBackprop": "gradients", "SmoothGrad": "noise", "VarGrad": "noise",
    "GuidedAbsoluteGrad": "noise", "IntegratedGradients": "integrated", "GradCam": "cam",
    "GradCamPlusPlus": "cam", "XGradCam": "xgradcam", "GuidedGradCam": "guided_gradcam",
    "SmoeScale": "multiscale", "FastCam": "multiscale", "Lovi": "multiscale",
    "Occlusion": "perturbation", "Rise": "perturbation", "Drise": "drise", "Decam": "decam",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
