"""pytorch-grad-cam as a peer, importable beside the pinned torch.

``make setup`` installs it without its dependencies: its package imports torchvision and
scikit-learn at import time for methods neither the tests nor the benchmarks use, and
torchvision cannot be installed beside the pinned torch. Those modules get placeholders that
raise if ever called; Grad-CAM and Grad-CAM++ themselves need only torch, numpy and cv2.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_PLACEHOLDERS = {
    "torchvision": (),
    "torchvision.transforms": ("Compose", "Normalize", "ToTensor"),
    "torchvision.transforms.functional": ("resize",),
    "torchvision.ops": ("box_iou",),
    "sklearn": (),
    "sklearn.decomposition": ("KernelPCA", "NMF"),
}


def _unavailable(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("not installed: a placeholder for an import pytorch-grad-cam does not "
                       "need for Grad-CAM or Grad-CAM++")


def import_pytorch_grad_cam() -> tuple[Any, Any]:
    """``(pytorch_grad_cam, ClassifierOutputTarget)``; placeholders are removed afterwards."""
    saved = {name: sys.modules.get(name) for name in _PLACEHOLDERS}
    for name, attributes in _PLACEHOLDERS.items():
        try:
            __import__(name)
        except ImportError:
            placeholder = types.ModuleType(name)
            for attribute in attributes:
                setattr(placeholder, attribute, _unavailable)
            sys.modules[name] = placeholder
    try:
        import pytorch_grad_cam  # noqa: PLC0415
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: PLC0415
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
    return pytorch_grad_cam, ClassifierOutputTarget
