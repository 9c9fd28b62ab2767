"""Method → Handler. A new method is one handler module plus one line in ``_BUILTIN``."""

from __future__ import annotations

import functools
import importlib

from saliency_service.core.errors import NotFound
from saliency_service.methods.base import TORCH_EXTRA, Handler
from saliency_service.proto import explainer_pb2 as pb

# Modules whose Handler subclasses are registered at start-up.
_BUILTIN = (
    "saliency_service.methods.gradients",
    "saliency_service.methods.noise",
    "saliency_service.methods.integrated",
    "saliency_service.methods.cam",
    "saliency_service.methods.guided_gradcam",
    "saliency_service.methods.xgradcam",
    "saliency_service.methods.perturbation",
    "saliency_service.methods.decam",
    "saliency_service.methods.multiscale",
)

_HANDLERS: dict[int, Handler] = {}
# Why a built-in module's methods are missing from this install (module → reason).
_MISSING: dict[str, str] = {}
UNSPECIFIED = pb.METHOD_UNSPECIFIED
AUTO = pb.METHOD_AUTO  # the engine picks a method by measured cost and the request's budget


def register(handler_class: type[Handler]) -> type[Handler]:
    """Class decorator: registers one stateless instance per method."""
    if handler_class.method in _HANDLERS:
        raise ValueError(f"method {pb.Method.Name(handler_class.method)} registered twice")
    _HANDLERS[handler_class.method] = handler_class()
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
    """Every registered handler, in enum order."""
    load_builtin()
    return [_HANDLERS[m] for m in sorted(_HANDLERS)]


def get(method: int) -> Handler:
    """The handler for ``method``; NOT_FOUND lists the registered methods."""
    load_builtin()
    handler = _HANDLERS.get(method)
    if handler is None:
        try:
            name = pb.Method.Name(method)
        except ValueError:
            name = str(method)
        known = ", ".join(pb.Method.Name(m) for m in sorted(_HANDLERS))
        raise NotFound(f"method {name} is not available; available methods: {known}")
    return handler
