"""Explanation methods, one file each (helpers in ``_utils``); ``registry`` maps a method name
to its handler.

The handler classes are importable from here by name (``from saliency_service.methods import
IntegratedGradients``), loaded through the registry on first use: the gradient methods need
PyTorch, which an install without the ``torch`` extra lacks, and the black-box ones must
import without it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Decam", "Drise", "FastCam", "GradCam", "GradCamPlusPlus", "GuidedAbsoluteGrad",
    "GuidedBackprop", "GuidedGradCam", "InputXGradient", "IntegratedGradients", "Lovi",
    "Occlusion", "Rise", "SmoeScale", "SmoothGrad", "VanillaGradient", "VarGrad", "XGradCam",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from saliency_service.methods import registry  # noqa: PLC0415 - loads the handlers

    for handler in registry.handlers():
        if type(handler).__name__ == name:
            return type(handler)
    raise AttributeError(f"{name} is not available: {registry.missing_reason()}")
