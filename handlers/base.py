"""The Handler contract: validation, batching, deadline checks and cost counting.

A method overrides ``_compute`` (and, where its maps need it, ``to_maps``);
everything else — parameter defaults and checks, chunking by a memory budget,
deadline/cancellation between passes, counting forward/backward passes per
image — lives here so that a new method is one small file.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from google.protobuf.message import Message

from kernel.errors import Cancelled, DeadlineExceeded, InvalidInput, ServiceError
from kernel.repository import ModelHandle

ENGINE_TORCH = "torch"
ENGINE_ONNX = "onnxruntime"


@dataclass
class CostCounter:
    """Passes counted per image: a batch of 8 through the network is 8 forward passes."""

    forward_passes: int = 0
    backward_passes: int = 0
    forward_by_engine: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def forward(self, images: int, engine: str) -> None:
        with self._lock:
            self.forward_passes += images
            self.forward_by_engine[engine] = self.forward_by_engine.get(engine, 0) + images

    def backward(self, images: int) -> None:
        with self._lock:
            self.backward_passes += images


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
class Limits:
    """Per-request limits from the server config."""

    max_samples: int = 256
    max_generations: int = 500
    chunk_memory_bytes: int = 512 * 1024 * 1024


@dataclass
class ExplainJob:
    """Everything a handler needs for one request, already validated and decoded."""

    model: ModelHandle
    inputs: np.ndarray  # float32 N×C×H×W, preprocessed per the manifest
    targets: np.ndarray  # int64 N
    params: dict[str, Any]
    # ONNX Runtime logits of ``inputs`` (N×classes), computed once for the prediction.
    base_logits: np.ndarray | None = None
    seed: int = 0
    state: RequestState = field(default_factory=RequestState)
    cost: CostCounter = field(default_factory=CostCounter)
    limits: Limits = field(default_factory=Limits)
    best_effort: bool = False
    on_progress: Callable[[ProgressUpdate], None] | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    # Extra ONNX outputs of the prediction run, by name, for handlers that set
    # ``wants_scale_outputs`` (so multi-scale methods need no second forward pass).
    scale_outputs: dict[str, np.ndarray] | None = None
    # Whether the client asked for PNG overlays; handlers that render their own (LOVI) skip
    # the work otherwise.
    wants_overlays: bool = False
    wants_raw: bool = False  # handlers may skip building a raw attribution nobody reads
    # PNG overlays a handler renders itself (e.g. LOVI); used instead of the default blend.
    overlays: list[bytes] | None = None

    @property
    def batch(self) -> int:
        return int(self.inputs.shape[0])

    def rng(self) -> np.random.Generator:
        """A generator fixed by the request's seed, so stochastic methods are reproducible."""
        return np.random.default_rng(self.seed)

    def activation_bytes(self, backward: bool = False) -> int:
        """Activation bytes one network input holds in a pass (twice that with a backward
        pass), from the manifest or, without it, 48 copies of the input."""
        spec = self.model.spec()
        per_item = int(spec.extra.get("activation_bytes", 0)) or 48 * int(
            np.prod(self.inputs.shape[1:]) * 4
        )
        return 2 * per_item if backward else per_item

    def items_per_chunk(self, backward: bool = False) -> int:
        """How many network inputs fit one chunk under the memory budget."""
        return max(1, self.limits.chunk_memory_bytes // max(self.activation_bytes(backward), 1))

    def units_per_chunk(self, rows_each: int = 1, unit_bytes: int = 0,
                        backward: bool = False, reserved_bytes: int = 0) -> int:
        """How many units of work fit one chunk (at least one): a unit is ``rows_each``
        network inputs plus ``unit_bytes`` of the handler's own arrays (masks, perturbed
        copies, noise); ``reserved_bytes`` the request holds throughout (a DE population)
        come off the budget first."""
        per_unit = rows_each * self.activation_bytes(backward) + unit_bytes
        budget = self.limits.chunk_memory_bytes - reserved_bytes
        return max(1, budget // max(per_unit, 1))

    def unit_chunks(self, units: int, rows_each: int = 1, unit_bytes: int = 0,
                    backward: bool = False, reserved_bytes: int = 0) -> Iterator[slice]:
        """Slices of range(units) sized by ``units_per_chunk``, checking the deadline and
        cancellation before each, so that a chunk's arrays are only allocated for a request
        that is still wanted and the first check comes before the first chunk's work."""
        size = self.units_per_chunk(rows_each, unit_bytes, backward, reserved_bytes)
        for part in chunks(units, size):
            self.state.check()
            yield part


@dataclass
class Attribution:
    """A handler's result: maps in [0, 1] and the raw attribution behind them."""

    maps: np.ndarray  # float32 N×H×W in [0, 1]
    raw: np.ndarray


def normalize_per_image(maps: np.ndarray) -> np.ndarray:
    """Min-max scales each N×H×W map into [0, 1]; a flat map becomes all zeros."""
    maps = maps.astype(np.float32, copy=False)
    low = maps.reshape(maps.shape[0], -1).min(axis=1).reshape(-1, 1, 1)
    high = maps.reshape(maps.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (maps - low) / safe, 0.0).astype(np.float32)


def scale_by_max(maps: np.ndarray) -> np.ndarray:
    """Divides each non-negative N×H×W map by its maximum (0 stays 0, so absence stays absent)."""
    maps = np.maximum(maps.astype(np.float32, copy=False), 0.0)
    high = maps.reshape(maps.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(high > 0, maps / np.where(high > 0, high, 1.0), 0.0).astype(np.float32)


def chunks(total: int, size: int) -> Iterator[slice]:
    """Slices covering range(total) in steps of ``size``."""
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + size))


def _enum_suffix(message: Message, name: str, value: int, label: str) -> str:
    """An enum field's value as its lower-case name without the enum's prefix
    (``BASELINE_BLUR`` → ``blur``); a number the proto does not define is the client's
    mistake, so it is refused naming the field (``label``) and the values it takes."""
    enum = message.DESCRIPTOR.fields_by_name[name].enum_type
    if value not in enum.values_by_number:
        valid = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
        raise InvalidInput(f"{label}={value} is not a {enum.name} value; use one of {valid}")
    full = enum.values_by_number[value].name
    prefix = enum.values[0].name.rsplit("_", 1)[0] + "_"
    return full[len(prefix):].lower() if full.startswith(prefix) else full.lower()


class Handler:
    """One explanation method. Subclasses set the class attributes and ``_compute``."""

    method: ClassVar[int]
    name: ClassVar[str]
    engine: ClassVar[str] = ENGINE_ONNX
    needs_torch: ClassVar[bool] = False
    uses_gradients: ClassVar[bool] = False
    needs_scales: ClassVar[bool] = False
    # Ask the service to return ``scale_outputs_for(model)`` from its prediction run.
    wants_scale_outputs: ClassVar[bool] = False
    # The ExplainRequest ``params`` oneof field that carries this method's parameters.
    params_field: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def available_for(self, model: ModelHandle) -> bool:
        """Whether this package has what the method needs."""
        spec = model.spec()
        if self.needs_torch and not model.has_torch:
            return False
        return not (self.needs_scales and not spec.scale_outputs)

    def scale_outputs_for(self, model: ModelHandle) -> list[str]:
        """ONNX outputs (beside the logits) to fetch in the prediction run."""
        return list(model.spec().scale_outputs)

    def resolve_params(self, message: Message | None) -> dict[str, Any]:
        """Defaults overlaid with the fields the client set; enums become lower-case names."""
        params = dict(self.defaults)
        if message is None:
            return params
        for descriptor in message.DESCRIPTOR.fields:
            name = descriptor.name
            if descriptor.is_repeated:
                values = list(getattr(message, name))
                if values:
                    params[name] = values
            elif descriptor.has_presence:
                if message.HasField(name):
                    params[name] = getattr(message, name)
            else:
                value = getattr(message, name)
                if value:
                    if descriptor.enum_type is not None:
                        value = _enum_suffix(message, name, value,
                                             f"{self.params_field}.{name}")
                    params[name] = value
        return params

    def validate(self, params: dict[str, Any], job: ExplainJob) -> None:
        """Raises InvalidInput for out-of-range parameters; override per method."""

    def explain(self, job: ExplainJob) -> Attribution:
        """Validates, computes and normalizes; the one entry point the service calls."""
        self.validate(job.params, job)
        job.state.check()
        raw = self._compute(job)
        maps = self.to_maps(raw, job)
        if maps.shape != (job.batch, job.inputs.shape[2], job.inputs.shape[3]):
            raise RuntimeError(f"{self.name} produced maps of shape {maps.shape}")
        maps = maps.astype(np.float32, copy=False)
        if not np.isfinite(maps).all():  # cheap check; the copy only when needed
            maps = np.nan_to_num(maps)
        return Attribution(maps=maps, raw=raw)

    def _compute(self, job: ExplainJob) -> np.ndarray:
        raise NotImplementedError

    def to_maps(self, raw: np.ndarray, job: ExplainJob) -> np.ndarray:
        """Default: |attribution| max over channels, scaled by the image's maximum."""
        if raw.ndim == 4:
            raw = np.abs(raw).max(axis=1)
        return scale_by_max(raw)

    # ---- helpers shared by handlers -------------------------------------------------------

    @staticmethod
    def require_positive(params: dict[str, Any], name: str, limit: int | None = None) -> None:
        value = params[name]
        if value <= 0:
            raise InvalidInput(f"{name} must be > 0, got {value}")
        if limit is not None and value > limit:
            raise InvalidInput(f"{name}={value} exceeds the server limit of {limit}")

    @staticmethod
    def require_range(params: dict[str, Any], name: str, low: float, high: float) -> None:
        value = params[name]
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidInput(f"{name} must be in [{low}, {high}], got {value}")

    @staticmethod
    def require_choice(params: dict[str, Any], name: str, choices: tuple[str, ...]) -> None:
        if params[name] not in choices:
            raise InvalidInput(f"{name} must be one of {list(choices)}, got {params[name]!r}")


def run_onnx_batched(
    job: ExplainJob, batch: np.ndarray, outputs: list[str] | None = None,
    chunk_items: int | None = None,
) -> list[np.ndarray]:
    """Runs ``batch`` through ONNX Runtime in memory-bounded chunks, checking the deadline
    between chunks and counting one forward pass per image."""
    size = chunk_items or job.items_per_chunk()
    results: list[list[np.ndarray]] = []
    for part in chunks(batch.shape[0], size):
        job.state.check()
        results.append(job.model.run(batch[part], outputs))
        job.cost.forward(part.stop - part.start, ENGINE_ONNX)
    return [np.concatenate([r[i] for r in results]) for i in range(len(results[0]))]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
