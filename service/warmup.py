"""Warm-up of a loaded model before it reports ready."""

from __future__ import annotations

import numpy as np

from handlers import registry
from kernel.repository import ModelHandle
from kernel.request import CostCounter, RequestState
from service.engine import Engine, ExplainOrder


def warm_up(engine: Engine, handle: ModelHandle) -> list[str]:
    """Runs a prediction and one small request per engine and program variant, so that
    the first client request does not pay for session start-up or for preparing the
    torch program, and a package that cannot serve its own manifest is caught.

    Returns what failed; the caller marks the package not ready with it.
    """
    spec = handle.spec().input
    zeros = np.zeros((1, spec.channels, spec.height, spec.width), np.float32)
    try:
        engine.predict(handle.name, handle.version, lambda _: zeros, CostCounter())
    except Exception as exc:  # noqa: BLE001 - reported as the package's error
        return [f"predict: {type(exc).__name__}: {exc}"]
    available = {h.method for h in engine.methods_for(handle)}
    failed = []
    for handler in registry.handlers():
        if not handler.warm_up or handler.method not in available:
            continue
        order = ExplainOrder(model=handle.name, version=handle.version, method=handler.method,
                             decode=lambda _: zeros.copy())
        try:
            engine.explain(order, RequestState(), CostCounter())
        except Exception as exc:  # noqa: BLE001 - reported, the model still serves
            failed.append(f"{handler.name}: {type(exc).__name__}: {exc}")
    return failed
