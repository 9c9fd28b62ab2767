"""Warm-up of a loaded model before it reports ready."""

from __future__ import annotations

import numpy as np

from handlers import registry
from kernel.repository import ModelHandle
from kernel.request import CostCounter, RequestState
from saliency.v1 import explainer_pb2 as pb
from service.core import Core
from service.images import array_to_tensor


def warm_up(core: Core, handle: ModelHandle) -> list[str]:
    """Runs a prediction and one small request per engine and program variant, so that
    the first client request does not pay for session start-up or for preparing the
    torch program, and a package that cannot serve its own manifest is caught.

    Returns what failed; the caller marks the package not ready with it.
    """
    spec = handle.spec().input
    zeros = np.zeros((1, spec.channels, spec.height, spec.width), np.float32)
    try:
        core.predict(pb.PredictRequest(model=handle.name, version=handle.version,
                                       input=pb.Input(tensor=array_to_tensor(zeros))),
                     CostCounter())
    except Exception as exc:  # noqa: BLE001 - reported as the package's error
        return [f"predict: {type(exc).__name__}: {exc}"]
    available = {h.method for h in core.methods_for(handle)}
    failed = []
    for method in (h.method for h in registry.handlers() if h.warm_up):
        if method not in available:
            continue
        request = pb.ExplainRequest(model=handle.name, version=handle.version, method=method,
                                    input=pb.Input(tensor=array_to_tensor(zeros)))
        try:
            core.explain(request, RequestState(), CostCounter())
        except Exception as exc:  # noqa: BLE001 - reported, the model still serves
            failed.append(f"{registry.get(method).name}: {type(exc).__name__}: {exc}")
    return failed
