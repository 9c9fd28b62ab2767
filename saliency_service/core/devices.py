"""Where models run: the torch device, ONNX Runtime's execution providers, the engine of
the forward passes and the precision, chosen once at start-up (``--device``,
``--onnx-providers``, ``--forward-engine``, ``--precision``) and read by every session and
torch program of the process. A request may ask for its own precision
(:func:`requested`), within what the server enabled (:func:`bfloat16_refusal`).

What the machine cannot do is refused at start-up with one line naming the flag and what
is installed (:class:`PlacementRefused`), never at the first request.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
PRECISIONS = ("float32", "bfloat16", "auto")
# What a request's ``precision`` field may hold ("" = the server's setting).
REQUEST_PRECISIONS = ("", "float32", "bfloat16")
# Forward passes (prediction, SMOE/FastCAM/LOVI, DE-CAM, RISE, occlusion): ONNX Runtime in
# float32, or OpenVINO's runtime, which executes bfloat16 on the CPU (ONNX Runtime's CPU
# provider has no bfloat16 kernels for these graphs).
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
FORWARD_ENGINES = (ONNXRUNTIME, OPENVINO)
OPENVINO_EXTRA = "saliency-service[openvino]"
# Method families: gradient methods run torch programs, forward methods the forward engine.
GRADIENT = "gradient"
FORWARD = "forward"
# CPU flags of units that compute bfloat16 products natively (Intel AMX, AVX-512 BF16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class PlacementRefused(ValueError):
    """A device, provider or precision this machine or install cannot give (one line)."""


@dataclass(frozen=True)
class Placement:
    """The torch device (``cpu``, ``cuda:N``), ONNX Runtime's providers in order of
    preference, the precision setting (float32, bfloat16, auto) and the engine that runs
    forward passes in bfloat16 (``onnxruntime``: none, they stay float32)."""

    device: str = "cpu"
    providers: tuple[str, ...] = (CPU_PROVIDER,)
    precision: str = "float32"
    forward_engine: str = ONNXRUNTIME

    @property
    def device_type(self) -> str:
        """``cpu`` or ``cuda``: what ``torch.autocast`` takes."""
        return self.device.split(":")[0]

    @property
    def device_index(self) -> int:
        return int(self.device.split(":")[1]) if ":" in self.device else 0

    def session_providers(self) -> list[Any]:
        """The ``providers`` argument of ``onnxruntime.InferenceSession``: GPU providers get
        the device's index."""
        gpu = {"device_id": self.device_index}
        return [(name, gpu) if name in (CUDA_PROVIDER, TENSORRT_PROVIDER) else name
                for name in self.providers]


_current = Placement()


def current() -> Placement:
    """The process's placement (CPU, float32 until :func:`configure` is called)."""
    return _current


def session_providers() -> list[Any]:
    """What every ONNX Runtime session of the process is created with."""
    return _current.session_providers()


def torch_device() -> str:
    """The device gradient programs run on."""
    return _current.device


def configure(device: str = "cpu", providers: str = "", precision: str = "float32",
              forward_engine: str = ONNXRUNTIME) -> Placement:
    """Validates the settings (see :func:`placement`) and makes them the process's."""
    global _current
    _current = placement(device, providers, precision, forward_engine)
    return _current


def placement(device: str = "cpu", providers: str = "", precision: str = "float32",
              forward_engine: str = ONNXRUNTIME) -> Placement:
    """The placement for ``--device``, ``--onnx-providers`` (comma list; empty = derived
    from the device), ``--precision`` and ``--forward-engine``; raises
    :class:`PlacementRefused` for what is not installed or not present."""
    device = device.strip().lower() or "cpu"
    found = _DEVICE.match(device)
    if found is None:
        raise PlacementRefused(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if found.group(1) == "cuda":
        _check_cuda(device, int(found.group(2) or 0))
    if precision not in PRECISIONS:
        raise PlacementRefused(f"--precision must be one of {', '.join(PRECISIONS)}, "
                               f"got {precision!r}")
    names = [name.strip() for name in providers.split(",") if name.strip()]
    if not names:
        names = [CUDA_PROVIDER, CPU_PROVIDER] if found.group(1) == "cuda" else [CPU_PROVIDER]
    _check_providers(names, "--onnx-providers" if providers.strip() else "--device")
    _check_forward_engine(forward_engine, found.group(1), precision)
    return Placement(device, tuple(names), precision, forward_engine)


def _check_forward_engine(engine: str, device_type: str, precision: str) -> None:
    if engine not in FORWARD_ENGINES:
        raise PlacementRefused(f"--forward-engine must be one of {', '.join(FORWARD_ENGINES)}, "
                               f"got {engine!r}")
    if engine == ONNXRUNTIME:
        return
    if precision == "float32":
        raise PlacementRefused("--forward-engine openvino runs forward passes in bfloat16: "
                               "use it with --precision bfloat16 or auto (float32 forward "
                               "passes are faster on ONNX Runtime)")
    if device_type != "cpu":
        raise PlacementRefused("--forward-engine openvino runs on the CPU: use it with "
                               "--device cpu (on CUDA, ONNX Runtime's providers serve)")
    try:
        import openvino  # noqa: F401, PLC0415 - optional: the [openvino] extra
    except ImportError:
        raise PlacementRefused("--forward-engine openvino: OpenVINO is not installed; "
                               f"pip install '{OPENVINO_EXTRA}'") from None


_requested: ContextVar[str] = ContextVar("requested_precision", default="")


@contextlib.contextmanager
def requested(precision: str) -> Iterator[None]:
    """Within it, this thread's (or task's) passes follow a request's ``precision``:
    "float32" runs every pass in float32; "" and "bfloat16" follow the server."""
    token = _requested.set(precision)
    try:
        yield
    finally:
        _requested.reset(token)


def requested_precision() -> str:
    """The precision the request being served asked for ("" = the server's)."""
    return _requested.get()


def bfloat16_refusal(family: str, placement: Placement | None = None) -> str:
    """Why the server does not run ``family``'s methods (:data:`GRADIENT` or
    :data:`FORWARD`) in bfloat16, naming the flag to change ("" when it may: the model's
    own check then decides)."""
    placement = placement or _current
    if placement.precision == "float32":
        return "the server runs float32: start it with --precision bfloat16 (or auto)"
    if (placement.precision == "auto" and placement.device_type == "cpu"
            and not cpu_has_bf16()):
        return "--precision auto found no bfloat16 units (AMX, AVX-512 BF16) on this CPU"
    if family == FORWARD and placement.forward_engine != OPENVINO:
        return ("forward passes run float32 on ONNX Runtime: start the server with "
                f"--forward-engine openvino (pip install '{OPENVINO_EXTRA}')")
    return ""


def _check_cuda(device: str, index: int) -> None:
    try:
        import torch  # noqa: PLC0415 - torch is optional for ONNX-only serving
    except ModuleNotFoundError:
        raise PlacementRefused(f"--device {device}: torch is not installed (gradient methods "
                               "need it); see deploy/CUDA.md") from None
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PlacementRefused(f"--device {device}: torch {torch.__version__} ({build}) sees "
                               "no CUDA device; use --device cpu or see deploy/CUDA.md")
    count = torch.cuda.device_count()
    if index >= count:
        raise PlacementRefused(f"--device {device}: torch sees {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")


def _check_providers(names: list[str], flag: str) -> None:
    import onnxruntime as ort  # noqa: PLC0415

    available = ort.get_available_providers()
    for name in names:
        if name not in available:
            known = "" if name in ort.get_all_providers() else " (not a provider name)"
            raise PlacementRefused(
                f"{flag}: ONNX Runtime {ort.__version__} has no {name}{known}; installed: "
                f"{', '.join(available)}")


@functools.cache
def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU has native bfloat16 units (AMX or AVX-512 BF16), read from the
    kernel's CPU flags, else from oneDNN's own check."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return any(flag in flags for flag in BF16_CPU_FLAGS)
    except OSError:
        pass
    try:
        import torch  # noqa: PLC0415

        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ModuleNotFoundError, AttributeError, RuntimeError):
        return False
