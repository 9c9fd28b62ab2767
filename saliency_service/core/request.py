"""One request's work as the kernel sees it: the job, its cost, its deadline, its result.

Nothing here knows a transport; the service converts its messages into a ``Job`` and a
``Result`` back into messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saliency_service.core.chunking import MAX_CHUNK_ROWS, chunks, even_chunks
from saliency_service.core.errors import Cancelled, DeadlineExceeded, ServiceError
from saliency_service.core.repository import ModelHandle

# A remote model's input is held here as itself and as the bytes of its call.
REMOTE_COPIES = 2
DEFAULT_LIMITS: Mapping[str, float] = {"chunk_memory_bytes": 512 * 1024 * 1024}


@dataclass
class CostCounter:
    """Passes counted per image: a batch of 8 through the network is 8 forward passes."""

    forward_passes: int = 0
    backward_passes: int = 0
    forward_by_engine: dict[str, int] = field(default_factory=dict)
    # Calls to a remote model's predictor and the bytes they moved (request and answer).
    remote_calls: int = 0
    remote_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def forward(self, images: int, engine: str) -> None:
        with self._lock:
            self.forward_passes += images
            self.forward_by_engine[engine] = self.forward_by_engine.get(engine, 0) + images

    def backward(self, images: int) -> None:
        with self._lock:
            self.backward_passes += images

    def remote(self, calls: int, transferred_bytes: int) -> None:
        with self._lock:
            self.remote_calls += calls
            self.remote_bytes += transferred_bytes


class RequestState:
    """Deadline and cancellation of one request, checked by handlers between passes.

    A cancellation carries its reason: the client's (CANCELLED) unless the server stops the
    request itself, e.g. at the end of its grace period when shutting down (UNAVAILABLE).
    """

    def __init__(self, deadline: float | None = None) -> None:
        # ``deadline`` is on the time.monotonic() clock.
        self.deadline = deadline
        self.cancelled = threading.Event()
        self._reason: ServiceError | None = None

    def cancel(self, reason: ServiceError | None = None) -> None:
        """Stops the request at its next check with ``reason`` (default: the client
        cancelled); the first reason given stands."""
        if not self.cancelled.is_set():
            self._reason = reason
            self.cancelled.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raises the cancellation's reason, or DeadlineExceeded once the deadline passed."""
        if self.cancelled.is_set():
            raise self._reason or Cancelled("the request was cancelled by the client")
        if self.expired():
            raise DeadlineExceeded("the request's deadline passed before the method finished")


@dataclass(frozen=True)
class ProgressUpdate:
    """Intermediate state of a long method, streamed by ExplainStream."""

    step: int
    total_steps: int
    best_fitness: float = 0.0
    forward_passes: int = 0
    maps: np.ndarray | None = None


@dataclass(frozen=True)
class Job:
    """One explanation to compute: what the handler reads, already validated and decoded.

    Immutable; the handler's findings go into the ``Attribution`` it returns. ``cost`` and
    ``state`` are the request's shared counters and flags, not results.
    """

    model: ModelHandle
    inputs: np.ndarray  # float32 N×C×H×W, preprocessed per the manifest
    targets: np.ndarray  # int64 N
    params: Any = None  # the method's parameters dataclass
    # ONNX Runtime logits of ``inputs`` (N×classes), computed once for the prediction.
    base_logits: np.ndarray | None = None
    seed: int = 0
    state: RequestState = field(default_factory=RequestState)
    cost: CostCounter = field(default_factory=CostCounter)
    # Server limits by Config name (``max_steps``, ``chunk_memory_bytes``, …).
    limits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    best_effort: bool = False
    on_progress: Callable[[ProgressUpdate], None] | None = None
    # Extra ONNX outputs of the prediction run, by name, for handlers that set
    # ``wants_scale_outputs`` (so multi-scale methods need no second forward pass).
    scale_outputs: Mapping[str, np.ndarray] | None = None
    # Whether the client asked for PNG overlays; handlers that render their own (LOVI) skip
    # the work otherwise.
    wants_overlays: bool = False
    wants_raw: bool = False  # handlers may skip building a raw attribution nobody reads

    @property
    def batch(self) -> int:
        return int(self.inputs.shape[0])

    def rng(self) -> np.random.Generator:
        """A generator fixed by the request's seed, so stochastic methods are reproducible."""
        return np.random.default_rng(self.seed)

    def activation_bytes(self, backward: bool = False) -> int:
        """Activation bytes one network input holds in a pass (twice that with a backward
        pass), from the manifest or, without it, 48 copies of the input. A remote model's
        activations live at its predictor: here an input holds only itself and its
        encoded copy."""
        spec = self.model.spec()
        if self.model.remote is not None:
            return REMOTE_COPIES * int(np.prod(self.inputs.shape[1:]) * 4)
        per_item = int(spec.extra.get("activation_bytes", 0)) or 48 * int(
            np.prod(self.inputs.shape[1:]) * 4
        )
        return 2 * per_item if backward else per_item

    @property
    def chunk_memory_bytes(self) -> int:
        return int(self.limits.get("chunk_memory_bytes", DEFAULT_LIMITS["chunk_memory_bytes"]))

    @property
    def max_rows(self) -> int:
        """The most network inputs one chunk takes: ``MAX_CHUNK_ROWS``, or for a remote
        model whole rounds of full calls in flight (a call's inputs, ``max_batch`` or the
        model's fixed batch size as ``RemotePredictor.run`` sends them, × ``concurrency``),
        as few as hold ``MAX_CHUNK_ROWS``: every call is as full as the predictor takes."""
        remote = self.model.remote
        if remote is None:
            return MAX_CHUNK_ROWS
        per_call = self.model.spec().input.batch or remote.spec.max_batch
        round_rows = per_call * remote.spec.concurrency
        return round_rows * -(-MAX_CHUNK_ROWS // round_rows)

    def items_per_chunk(self, backward: bool = False) -> int:
        """How many network inputs fit one chunk under the memory budget (at most
        ``max_rows``)."""
        fitting = self.chunk_memory_bytes // max(self.activation_bytes(backward), 1)
        fixed = self.model.spec().input.batch if backward else 0
        # A graph with a fixed batch k runs its backward passes k inputs at a time.
        return max(1, min(fitting, self.max_rows, fixed or self.max_rows))

    def units_per_chunk(self, rows_each: int = 1, unit_bytes: int = 0,
                        backward: bool = False, reserved_bytes: int = 0) -> int:
        """How many units of work fit one chunk (at least one): a unit is ``rows_each``
        network inputs plus ``unit_bytes`` of the handler's own arrays (masks, perturbed
        copies, noise); ``reserved_bytes`` the request holds throughout (a DE population)
        come off the budget first."""
        per_unit = rows_each * self.activation_bytes(backward) + unit_bytes
        budget = self.chunk_memory_bytes - reserved_bytes
        return max(1, min(budget // max(per_unit, 1), self.max_rows // max(rows_each, 1)))

    def unit_chunks(self, units: int, rows_each: int = 1, unit_bytes: int = 0,
                    backward: bool = False, reserved_bytes: int = 0) -> Iterator[slice]:
        """Slices of range(units) sized by ``units_per_chunk``, through ``checked_chunks``."""
        return self.checked_chunks(
            units, self.units_per_chunk(rows_each, unit_bytes, backward, reserved_bytes))

    def checked_chunks(self, total: int, size: int) -> Iterator[slice]:
        """The chunk loop: slices of range(total) in steps of ``size``, checking the deadline
        and cancellation before each, so that a chunk's arrays are only allocated for a
        request that is still wanted and the first check comes before the first chunk."""
        # A remote model's chunks are cut into full calls; the powers of two are for a local
        # model's few warmed-up shapes.
        for part in (chunks if self.model.remote is None else even_chunks)(total, size):
            self.state.check()
            yield part


@dataclass(frozen=True)
class Attribution:
    """What a method found: the raw attribution, and any diagnostics, truncation or
    overlays it produced itself (LOVI renders its own pictures)."""

    raw: np.ndarray
    diagnostics: Mapping[str, float] = field(default_factory=dict)
    truncated: bool = False
    overlays: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Result:
    """A handler's answer: maps in [0, 1] (N×H×W float32) beside its attribution."""

    maps: np.ndarray
    raw: np.ndarray
    diagnostics: Mapping[str, float] = field(default_factory=dict)
    truncated: bool = False
    overlays: tuple[bytes, ...] = ()
