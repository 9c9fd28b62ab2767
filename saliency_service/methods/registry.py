"""Method name → Handler. A new method is one handler module plus one line in ``_BUILTIN``.

Methods are known by their names (``vanilla_gradient``); the protocol layer maps its own
identifiers (the proto's Method enum) to these names.
"""

from __future__ import annotations

import functools
import importlib

from saliency_service.core.errors import NotFound
from saliency_service.methods.base import TORCH_EXTRA, Handler

# Modules whose Handler subclasses are registered at start-up.
_BUILTIN = (
    "saliency_service.methods.gradients",
    "saliency_service.methods.noise",
    "saliency_service.methods.integrated",
    "saliency_service.methods.cam",
    "saliency_service.methods.guided_gradcam",
    "saliency_service.methods.xgradcam",
    "saliency_service.methods.perturbation",
    "saliency_service.methods.drise",
    "saliency_service.methods.decam",
    "saliency_service.methods.multiscale",
)

_HANDLERS: dict[str, Handler] = {}
# Why a built-in module's methods are missing from this install (module → reason).
_MISSING: dict[str, str] = {}
AUTO = "auto"  # the engine picks a method by measured cost and the request's budget


def register(handler_class: type[Handler]) -> type[Handler]:
    """Class decorator: registers one stateless instance per method."""
    if handler_class.name in _HANDLERS or handler_class.name == AUTO:
        raise ValueError(f"method {handler_class.name} registered twice")
    _HANDLERS[handler_class.name] = handler_class()
    return handler_class


@functools.cache
def load_builtin() -> None:
    """Imports the built-in handler modules once (a per-request import lookup is not free);
    a failed import is not cached, so the next call retries and raises again."""
    for module in _BUILTIN:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            _MISSING[module] = TORCH_EXTRA


def missing_reason() -> str | None:
    """Why some built-in methods are not registered in this install, or None."""
    load_builtin()
    return next(iter(_MISSING.values()), None)


def handlers() -> list[Handler]:
    """Every registered handler, in registration order (families together)."""
    load_builtin()
    return list(_HANDLERS.values())


def get(method: str) -> Handler:
    """The handler named ``method``; NOT_FOUND lists the registered methods."""
    load_builtin()
    handler = _HANDLERS.get(method)
    if handler is None:
        known = ", ".join(_HANDLERS)
        raise NotFound(f"method {method} is not available; available methods: {known}")
    return handler
