"""Method → Handler. A new method is one handler module plus one line in ``_BUILTIN``."""

from __future__ import annotations

import functools
import importlib

from handlers.base import Handler
from kernel.errors import NotFound
from saliency.v1 import explainer_pb2 as pb

# Modules whose Handler subclasses are registered at start-up.
_BUILTIN = (
    "handlers.gradients",
    "handlers.noise",
    "handlers.integrated",
    "handlers.cam",
    "handlers.guided_gradcam",
    "handlers.perturbation",
    "handlers.decam",
    "handlers.multiscale",
)

_HANDLERS: dict[int, Handler] = {}
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
        importlib.import_module(module)


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
