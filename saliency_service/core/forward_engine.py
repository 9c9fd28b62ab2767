"""The engine of a package's forward passes (prediction, SMOE/FastCAM/LOVI, DE-CAM, RISE,
occlusion): ONNX Runtime in float32, or OpenVINO's runtime in bfloat16 on the same
``model.onnx`` when the server runs ``--forward-engine openvino`` with ``--precision
bfloat16`` (or ``auto`` on a CPU with bfloat16 units).

:func:`session_for` is the one place a model run picks its session. The bfloat16 session is
built at the model's first run (its warm-up) and kept only when it matches float32 on seeded
inputs (:func:`bfloat16_check`: the same top-1 classes, a small logit error, perturbation maps
and scale outputs that correlate); otherwise the model stays on float32 and ``GetModel`` says
why. A request that asks for "float32" (:func:`devices.requested`) always gets ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from saliency_service.core import devices
from saliency_service.core.errors import InvalidInput

if TYPE_CHECKING:
    from saliency_service.core.repository import ModelHandle

KEY = "forward_precision"  # the handle's derived entry (``ModelHandle.derived``)
GRADIENT_KEY = "precision"  # the gradient programs' entry (``methods._utils.torch_program``)
# The check: seeded rows, each perturbed by random coarse masks (as RISE does).
CHECK_SEED = 0
CHECK_ROWS = 4
CHECK_MASKS = 16
CHECK_GRID = 4
# Passing figures; a manifest's ``verification.bfloat16_max_logit_error`` and
# ``verification.bfloat16_min_pearson`` (shared with the gradient check) override them.
MAX_LOGIT_ERROR = 0.02
MIN_PEARSON = 0.98
_POLL_MS = 50  # how often a bounded run looks at its RunOptions.terminate

_trial: ContextVar[Any] = ContextVar("trial_session", default=None)


@dataclass(frozen=True)
class ForwardPrecision:
    """The precision of a model's forward passes, why (GetModel's metadata), and the
    bfloat16 session when it passed its check."""

    bfloat16: bool
    note: str
    session: OpenVinoSession | None = None


class OpenVinoSession:
    """A model compiled by OpenVINO for the CPU with bfloat16 inference precision, run like an
    ONNX Runtime session: ``run(output names, feeds, run options)``. Each thread keeps its own
    infer request; a run with options stops once ``options.terminate`` is set (the warm-up's
    bound on one run)."""

    def __init__(self, onnx_bytes: bytes, threads: int = 0) -> None:
        import openvino as ov  # noqa: PLC0415 - optional: the [openvino] extra

        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16",
                                  "PERFORMANCE_HINT": "LATENCY",
                                  # Threads pinned to cores would fight torch's and ONNX
                                  # Runtime's pools for the same cores.
                                  "ENABLE_CPU_PINNING": False}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(onnx_bytes), "CPU", config)
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.version = ov.get_version().split("-")[0]
        self._ports = {name: port for port in self.compiled.outputs
                       for name in port.get_names()}
        self._local = threading.local()

    def run(self, names: list[str], feeds: Mapping[str, np.ndarray],
            options: Any = None) -> list[np.ndarray]:
        missing = [name for name in names if name not in self._ports]
        if missing:
            raise ValueError(f"OpenVINO's model has no output {missing[0]!r}; outputs: "
                             f"{sorted(self._ports)}")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.start_async(dict(feeds))
        if options is None:
            request.wait()
        else:
            while not request.wait_for(_POLL_MS):
                if options.terminate:
                    request.cancel()
                    raise RuntimeError("the run was terminated")
        return [request.get_tensor(self._ports[name]).data.copy() for name in names]


def session_for(handle: ModelHandle) -> Any:
    """The session a run of ``handle`` uses: OpenVINO's bfloat16 one when the server enabled
    it, the model passed its check and the request did not ask for float32; else ONNX
    Runtime's."""
    trial = _trial.get()
    if trial is not None:
        return trial
    if (devices.current().forward_engine != devices.OPENVINO
            or devices.requested_precision() == "float32"):
        return handle.session
    choice = forward_precision(handle)
    return choice.session if choice.session is not None else handle.session


def forward_precision(handle: ModelHandle) -> ForwardPrecision:
    """The precision of ``handle``'s forward passes under the server's settings (checked
    once per load, at the first run)."""
    return handle.derived(KEY, _choose)


def _choose(handle: ModelHandle) -> ForwardPrecision:
    refusal = devices.bfloat16_refusal(devices.FORWARD)
    if refusal:
        return ForwardPrecision(False, f"float32 ({refusal})")
    if handle.session is None:
        return ForwardPrecision(False, "float32 (served by a remote predictor)")
    try:
        threads = handle.session.get_session_options().intra_op_num_threads
        session = OpenVinoSession(handle.onnx_model().SerializeToString(), threads)
    except Exception as exc:  # noqa: BLE001 - the model serves on in float32, GetModel says why
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return ForwardPrecision(False, "float32 (OpenVINO could not compile the graph: "
                                f"{type(exc).__name__}: {first})")
    verification = handle.spec().extra.get("verification", {})
    passed, summary = bfloat16_check(
        handle, session,
        float(verification.get("bfloat16_max_logit_error", MAX_LOGIT_ERROR)),
        float(verification.get("bfloat16_min_pearson", MIN_PEARSON)))
    if not passed:
        return ForwardPrecision(False, f"float32 (bfloat16 failed its check: {summary})")
    return ForwardPrecision(True, f"bfloat16 on OpenVINO {session.version} ({summary})",
                            session)


@contextlib.contextmanager
def trying(session: Any) -> Iterator[None]:
    """Within it, ``ModelHandle.run`` on this thread uses ``session`` (the check's runs go
    through the model's own batching, layout and warm-up bound)."""
    token = _trial.set(session)
    try:
        yield
    finally:
        _trial.reset(token)


def bfloat16_check(handle: ModelHandle, session: Any, max_logit_error: float = MAX_LOGIT_ERROR,
                   min_pearson: float = MIN_PEARSON) -> tuple[bool, str]:
    """Whether ``session`` (bfloat16) matches ONNX Runtime's float32 on seeded inputs: the
    same top-1 classes; the largest logit difference at most ``max_logit_error`` of the
    largest float32 logit; per image, the Pearson correlation of a RISE-style map (random
    coarse masks weighted by the top-1 logit) and of each scale output at least
    ``min_pearson``. Returns the verdict and the figures as one phrase."""
    spec = handle.spec()
    rows = spec.input.batch or CHECK_ROWS
    rng = np.random.default_rng(CHECK_SEED)
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    inputs = rng.normal(size=(rows, *shape)).astype(np.float32)
    cells = rng.random((CHECK_MASKS, 1, CHECK_GRID, CHECK_GRID)) < 0.5
    masks = _upsample(cells, spec.input.height, spec.input.width)
    masked = (inputs[:, None] * masks[None]).reshape(rows * CHECK_MASKS, *shape)
    names = [spec.logits_output, *spec.scale_outputs]
    with devices.requested("float32"):
        full = handle.run(inputs, names)
        full_masked = handle.run(masked, [spec.logits_output])[0]
    with trying(session):
        half = handle.run(inputs, names)
        half_masked = handle.run(masked, [spec.logits_output])[0]
    logits_32, logits_16 = full[0].astype(np.float64), half[0].astype(np.float64)
    targets = logits_32.argmax(axis=1)
    agree = int((logits_16.argmax(axis=1) == targets).sum())
    scale = max(float(np.abs(logits_32).max()), 1e-12)
    error = float(np.abs(logits_32 - logits_16).max()) / scale
    maps = [_mask_map(logits.astype(np.float64), targets, masks)
            for logits in (full_masked, half_masked)]
    map_pearson = min(_pearson(a, b) for a, b in zip(*maps, strict=True))
    figures = [f"top-1 {agree}/{rows}", f"logit error {error:.1e}",
               f"map pearson {map_pearson:.3f}"]
    passed = agree == rows and error <= max_logit_error and map_pearson >= min_pearson
    if spec.scale_outputs:
        scale_pearson = min(_pearson(a, b) for out_32, out_16 in zip(full[1:], half[1:],
                                                                     strict=True)
                            for a, b in zip(out_32, out_16, strict=True))
        figures.append(f"scale pearson {scale_pearson:.3f}")
        passed = passed and scale_pearson >= min_pearson
    return passed, ", ".join(figures)


def _upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Coarse boolean cells (M×1×g×g) as float32 masks of the input size (nearest)."""
    rows = np.minimum(np.arange(height) * cells.shape[2] // height, cells.shape[2] - 1)
    cols = np.minimum(np.arange(width) * cells.shape[3] // width, cells.shape[3] - 1)
    return cells[:, :, rows][:, :, :, cols].astype(np.float32)


def _mask_map(logits: np.ndarray, targets: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the masks weighted by the target's logit minus its mean over the masks
    (``logits``: images × masks rows, in that order)."""
    rows = len(targets)
    per_image = logits.reshape(rows, masks.shape[0], -1)
    chosen = per_image[np.arange(rows)[:, None], np.arange(masks.shape[0])[None],
                       targets[:, None]]  # images × masks
    weights = chosen - chosen.mean(axis=1, keepdims=True)
    return np.einsum("rm,mhw->rhw", weights, masks[:, 0].astype(np.float64))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denominator == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    value = float(a @ b) / denominator
    return value if math.isfinite(value) else 0.0


def precision_used(handle: ModelHandle, family: str) -> str:
    """"bfloat16" or "float32": what ran ``family``'s passes (:data:`devices.GRADIENT` or
    :data:`devices.FORWARD`) on ``handle`` for the request being served."""
    if devices.requested_precision() == "float32":
        return "float32"
    if family == devices.FORWARD and devices.current().forward_engine != devices.OPENVINO:
        return "float32"
    checked = handle.derived_items(KEY if family == devices.FORWARD else GRADIENT_KEY)
    return "bfloat16" if checked and checked[0][1].bfloat16 else "float32"


def logit_tolerance(handle: ModelHandle) -> float:
    """How far, relative to the largest logit, a computation from a forward run's outputs may
    stray from its logits: float32 rounding, or the bfloat16 check's bound."""
    if precision_used(handle, devices.FORWARD) == "float32":
        return 1e-3
    verification = handle.spec().extra.get("verification", {})
    return max(1e-3, float(verification.get("bfloat16_max_logit_error", MAX_LOGIT_ERROR)))


def precision_note(handle: ModelHandle) -> str:
    """The forward passes' precision and why, once the model ran (GetModel's metadata)."""
    checked = handle.derived_items(KEY)
    return checked[0][1].note if checked else "float32"


def check_requested(precision: str, handle: ModelHandle, family: str | None,
                    gradient_note: Callable[[ModelHandle], str] | None = None) -> None:
    """Refuses a request's ``precision`` (INVALID_ARGUMENT) that is not a known value, or
    "bfloat16" where the server or the model's check does not run ``family`` in bfloat16
    (None: a method not yet chosen, refused only when neither family may).
    ``gradient_note(handle)`` is the gradient programs' precision note ("bfloat16 …" or
    why not), from the methods layer this one does not import."""
    if precision not in devices.REQUEST_PRECISIONS:
        raise InvalidInput(f"precision {precision[:40]!r} must be 'float32', 'bfloat16' or "
                           "empty (the server's --precision)")
    if precision != "bfloat16":
        return
    families = (family,) if family else (devices.GRADIENT, devices.FORWARD)
    refusals = [_refusal(handle, each, gradient_note) for each in families]
    if all(refusals):
        raise InvalidInput(f"precision 'bfloat16' is not available: {'; '.join(refusals)}; "
                           "ask for 'float32' or leave precision empty")


def _refusal(handle: ModelHandle, family: str,
             gradient_note: Callable[[ModelHandle], str] | None) -> str:
    """Why ``family``'s passes on ``handle`` do not run in bfloat16 ("" when they do)."""
    what = "gradient methods" if family == devices.GRADIENT else "forward passes"
    refusal = devices.bfloat16_refusal(family)
    if refusal:
        return f"{what}: {refusal}"
    if family == devices.FORWARD:
        note = forward_precision(handle).note
    elif gradient_note is None:
        return f"{what}: this server cannot tell their precision"
    else:
        note = gradient_note(handle)
        if not note.startswith(("bfloat16", "float32")):
            return f"{what}: {note}"
    return "" if note.startswith("bfloat16") else f"{what}: model {handle.name!r} stays {note}"
