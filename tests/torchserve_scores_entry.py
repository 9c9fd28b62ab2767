"""TorchServe entry point for the remote-model tests: ``deploy/torchserve/scores_handler.py``
(archived beside it), except that a batch whose first value is ``SLOW_SENTINEL`` is answered
after 20 s (a predictor slower than a request's deadline) and the first two batches whose
first value is ``FLAKY_SENTINEL`` are answered 503 (a predictor that is briefly overloaded).
"""

from __future__ import annotations

import time
from typing import Any

SLOW_SENTINEL = 1234.5
FLAKY_SENTINEL = 4321.5
SLOW_SECONDS = 20.0

_service: list[Any] = []  # the handler, made at initialization
_flaky_left = [2]


def _first_value(row: Any) -> float:
    from scores_handler import _tensor  # noqa: PLC0415 - archived beside this file

    try:
        return float(_tensor(row)[0].flat[0])
    except (KeyError, TypeError, ValueError, IndexError):
        return 0.0


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's function entry point: ``handle(None, context)`` initializes."""
    if data is None:
        from scores_handler import TensorScoresHandler  # noqa: PLC0415 - archived beside

        _service.append(TensorScoresHandler())
        _service[0].initialize(context)
        return None
    firsts = [_first_value(row) for row in data]
    if SLOW_SENTINEL in firsts:
        time.sleep(SLOW_SECONDS)
    if FLAKY_SENTINEL in firsts and _flaky_left[0] > 0:
        _flaky_left[0] -= 1
        for index in range(len(data)):
            context.set_response_status(503, "overloaded, try again", idx=index)
        return ["overloaded, try again"] * len(data)
    return _service[0].handle(data, context)
