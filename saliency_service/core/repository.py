"""The model repository: ``models/<name>/<version>/{model.onnx, manifest.json}``.

Loading never runs code from a package: the ONNX file goes to ONNX Runtime (and, for gradient
methods, to the project's own translation into torch), its external data only from files
the manifest lists (``saliency_service.core.onnx_external``). A ``model.pt2`` that older
exports wrote is never read. Every file the manifest names must lie inside the package
folder, and its sha256 is checked on the very bytes that are then loaded. A
package that fails to load is kept with its error (reported by health and
``ListModels``) while the others serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from saliency_service.core import forward_engine
from saliency_service.core.chunking import MAX_CHUNK_ROWS, chunks
from saliency_service.core.dense import DENSE_KINDS, DenseSpec, InvalidDenseSpec
from saliency_service.core.errors import NotFound, Unavailable
from saliency_service.core.onnx_external import (
    ExternalDataRefused,
    check_files,
    external_data,
    inline,
)
from saliency_service.core.onnx_external import session as onnx_session
from saliency_service.core.outputs import LOGITS, OUTPUT_KINDS
from saliency_service.core.remote import InvalidRemote, RemotePredictor, RemoteSpec, RemoteState

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
# Written by earlier exports for gradient methods; never read (they use the ONNX graph).
TORCH_FILE = "model.pt2"
FORMAT_VERSION = 1
# Manifest keys kept verbatim in ``Manifest.extra``.
_EXTRA_KEYS = ("exporter", "verification", "format", "metadata", "activation_bytes",
               "scale_shapes", "scale_nodes")


LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32",)
IMAGE_CHANNELS = (1, 3)
# What a manifest may declare: an image of at most 4096×4096 pixels, a fixed batch of at
# most 1024 and at most 2**28 values (1 GiB of float32) in one batch the model runs.
MAX_INPUT_PIXELS = 1 << 24
MAX_FIXED_BATCH = 1024
MAX_BATCH_VALUES = 1 << 28
MAX_LABELS = 100_000
MAX_TEXT_CHARS = 512
# How encoded images are fitted to the input size (``protocol.inputs``); the first is the default.
RESIZE_MODES = ("stretch", "center_crop", "letterbox")


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: float32 images normalized by mean/std from value_range.

    ``shape`` is the model's own, in ``layout`` order (NCHW or NHWC); its first entry is
    the batch size the model requires, or -1 when any batch goes. Inside the service every
    input is N×C×H×W; ``ModelHandle.run`` puts it in the model's layout and batch size.
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = (0.0, 1.0)
    name: str = "input"
    layout: str = "NCHW"
    dtype: str = "float32"
    resize: str = RESIZE_MODES[0]  # for encoded images a request does not say how to fit

    @property
    def channels(self) -> int:
        return self.shape[3] if self.layout == "NHWC" else self.shape[1]

    @property
    def height(self) -> int:
        return self.shape[1] if self.layout == "NHWC" else self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[2] if self.layout == "NHWC" else self.shape[3]

    @property
    def batch(self) -> int:
        """The batch size the model requires (0 when any batch size goes)."""
        return max(self.shape[0], 0)


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one package."""

    name: str
    version: int
    input: InputSpec
    class_labels: tuple[str, ...]
    logits_output: str  # the class-score output, whatever ``output_kind`` it holds
    scale_outputs: tuple[str, ...]
    scale_modules: tuple[str, ...]
    cam_layer: str
    cam_output: str
    methods: tuple[str, ...]
    files: dict[str, str]
    head: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # A vision transformer's CAM tokens: output, grid [h, w], prefix_tokens, batch_dim.
    token_grid: dict[str, Any] = field(default_factory=dict)
    # A predictor that serves the model instead of a file (``core.remote``).
    remote: RemoteSpec | None = None

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        """The program's and ONNX graph's outputs after the logits, in order."""
        tokens = self.token_grid.get("output")
        return (*self.scale_outputs, *([str(tokens)] if tokens else []))
    output_kind: str = LOGITS  # saliency_service.core.outputs: logits, probabilities or sigmoid
    # A detector's or segmenter's outputs (``core.dense``; output_kind is then its kind).
    dense: DenseSpec | None = None

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """The manifest, every field checked: InvalidManifest names the first field a server
        could not serve (the package is then not ready; the others still load)."""
        if not isinstance(data, dict):
            raise InvalidManifest(f"the manifest must be a JSON object, got {_kind(data)}")
        spec = _field(data, "input", dict, required=True)
        layout = _choice(spec, "input.layout", LAYOUTS)
        resize = _choice(spec, "input.resize", RESIZE_MODES)
        shape = _shape(spec, layout)
        channels = shape[3] if layout == "NHWC" else shape[1]
        mean = _per_channel(spec, "input.mean", channels)
        std = _per_channel(spec, "input.std", channels)
        if min(std) <= 0:
            raise InvalidManifest(f"manifest input.std {list(std)} must be > 0 (inputs are "
                                  "divided by it)")
        value_range = _numbers(spec, "input.value_range", (0.0, 1.0))
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise InvalidManifest(f"manifest input.value_range {list(value_range)} must be "
                                  "[low, high] with low < high")
        outputs = _field(data, "outputs", dict) or {}
        files = _field(data, "files", dict) or {}
        labels = _texts(data, "class_labels")
        if len(labels) > MAX_LABELS:
            raise InvalidManifest(f"manifest class_labels has {len(labels)} entries; at most "
                                  f"{MAX_LABELS}")
        try:
            remote = RemoteSpec.from_json(data["remote"]) if "remote" in data else None
        except InvalidRemote as exc:
            raise InvalidManifest(str(exc)) from exc
        kind = _choice(outputs, "outputs.kind", (*OUTPUT_KINDS, *DENSE_KINDS))
        try:
            dense = DenseSpec.from_outputs(kind, outputs) if kind in DENSE_KINDS else None
        except InvalidDenseSpec as exc:
            raise InvalidManifest(str(exc)) from exc
        if dense is not None and not labels:
            raise InvalidManifest(f"a {kind} model's manifest needs class_labels (the classes "
                                  "its outputs score)")
        if dense is not None and remote is not None:
            raise InvalidManifest(f"a remote model is a classifier; a {kind} model is served "
                                  "from its package's model.onnx")
        return cls(
            name=_text(data, "name", required=True),
            version=_whole(data, "version"),
            input=InputSpec(
                shape=shape,
                mean=mean,
                std=std,
                value_range=(value_range[0], value_range[1]),
                name=_text(spec, "name", "input", where="input.name"),
                layout=layout,
                dtype=_choice(spec, "input.dtype", DTYPES),
                resize=resize,
            ),
            class_labels=labels,
            logits_output=(dense.outputs[0] if dense is not None else
                           _text(outputs, "logits", "logits", where="outputs.logits")),
            scale_outputs=_texts(outputs, "scales", where="outputs.scales"),
            scale_modules=_texts(data, "scale_modules"),
            cam_layer=_text(data, "cam_layer"),
            cam_output=_text(data, "cam_output"),
            methods=_texts(data, "methods"),
            files=_files(files),
            head=_field(data, "head", dict) or {},
            extra={k: v for k, v in data.items() if k in _EXTRA_KEYS},
            output_kind=kind,
            dense=dense,
            token_grid=_field(data, "token_grid", dict) or {},
            remote=remote,
        )


class InvalidManifest(ValueError):
    """A manifest field the server cannot serve; the message names the field and the rule."""


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _field(data: dict[str, Any], key: str, kind: type, required: bool = False,
           where: str = "") -> Any:
    """``data[key]`` when it is a ``kind`` (None when absent or null and not required)."""
    name = where or key
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidManifest(f"manifest lacks {name}")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
        raise InvalidManifest(f"manifest {name} must be {expected.get(kind, kind.__name__)}, "
                              f"got {_kind(value)}")
    return value


def _text(data: dict[str, Any], key: str, default: str = "", required: bool = False,
          where: str = "") -> str:
    value = _field(data, key, str, required, where)
    if value is None:
        return default
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidManifest(f"manifest {where or key} has {len(value)} characters; at most "
                              f"{MAX_TEXT_CHARS}")
    return value


def _texts(data: dict[str, Any], key: str, where: str = "") -> tuple[str, ...]:
    name = where or key
    values = _field(data, key, list, where=name) or []
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidManifest(f"manifest {name}[{index}] must be a string, got "
                                  f"{_kind(value)}")
        if len(value) > MAX_TEXT_CHARS:
            raise InvalidManifest(f"manifest {name}[{index}] has {len(value)} characters; at "
                                  f"most {MAX_TEXT_CHARS}")
    return tuple(values)


def _whole(data: dict[str, Any], key: str) -> int:
    value = _field(data, key, int, required=True)
    if value < 0:
        raise InvalidManifest(f"manifest {key} {value} must be >= 0")
    return int(value)


def _choice(data: dict[str, Any], where: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when absent)."""
    value = _field(data, where.rpartition(".")[2], str, where=where)
    if value is None:
        return choices[0]
    if value not in choices:
        raise InvalidManifest(f"manifest {where} {value[:40]!r} must be one of "
                              f"{', '.join(choices)}")
    return value


def _numbers(data: dict[str, Any], where: str,
             default: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """A list of finite numbers."""
    values = _field(data, where.rpartition(".")[2], list, required=default is None,
                    where=where)
    if values is None:
        return default or ()
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise InvalidManifest(f"manifest {where} {values[:8]} must hold finite numbers")
        numbers.append(float(value))
    return tuple(numbers)


def _per_channel(data: dict[str, Any], where: str, channels: int) -> tuple[float, ...]:
    """One finite number per channel; a single value stands for every channel."""
    values = _numbers(data, where)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise InvalidManifest(f"manifest {where} has {len(values)} values for {channels} "
                              "channels (give one per channel, or one for all)")
    return values


def _shape(spec: dict[str, Any], layout: str) -> tuple[int, ...]:
    """The model's input shape: four positive integers, the batch one -1 when free, the
    image of at most ``MAX_INPUT_PIXELS`` and 1 or 3 channels."""
    dims = _field(spec, "shape", list, required=True, where="input.shape")
    shown = str(dims[:8])[:120]
    if len(dims) != 4 or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise InvalidManifest(f"manifest input.shape {shown} must be 4 integers ({layout}, "
                              "the batch -1 when free)")
    batch, *image = dims
    if batch != -1 and not 1 <= batch <= MAX_FIXED_BATCH:
        raise InvalidManifest(f"manifest input.shape {shown}: the batch size must be -1 "
                              f"(free) or within [1, {MAX_FIXED_BATCH}]")
    channels, height, width = (image[2], image[0], image[1]) if layout == "NHWC" else image
    if height < 1 or width < 1 or height * width > MAX_INPUT_PIXELS:
        raise InvalidManifest(f"manifest input.shape {shown}: height and width must be "
                              f"positive, with at most {MAX_INPUT_PIXELS} pixels (4096×4096)")
    if channels not in IMAGE_CHANNELS:
        raise InvalidManifest(f"manifest input.shape {shown}: {channels} channels; images "
                              "have 1 (grey) or 3 (RGB)")
    if max(batch, 1) * channels * height * width > MAX_BATCH_VALUES:
        raise InvalidManifest(f"manifest input.shape {shown}: one batch would hold more than "
                              f"{MAX_BATCH_VALUES} values; use a smaller fixed batch size")
    return tuple(dims)


def _files(files: dict[str, Any]) -> dict[str, str]:
    """File name → the sha256 (64 hex digits) it must have."""
    hashes = {}
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise InvalidManifest(f"manifest files[{name[:120]!r}].sha256 must be 64 "
                                  "lowercase hex digits")
        hashes[name] = digest
    return hashes

def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelHandle:
    """One loaded package: an ONNX Runtime session (or a remote predictor), the manifest,
    what methods derive."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.manifest: Manifest | None = None
        self.session: ort.InferenceSession | None = None
        self.remote: RemotePredictor | None = None
        self.error = ""
        self._derived: dict[str, Any] = {}
        self._derived_lock = threading.RLock()
        # Passed to every ONNX Runtime run: the warm-up's, whose ``terminate`` stops a run that
        # outlasts its bound, while the package is not yet served.
        self.run_options: ort.RunOptions | None = None
        # When the ONNX Runtime run in progress started (time.monotonic()), for the warm-up's
        # bound on one run; None between runs.
        self.run_started: float | None = None

    @property
    def ready(self) -> bool:
        return ((self.session is not None or self.remote is not None)
                and self.manifest is not None and not self.error)

    def load(self, intra_op_threads: int = 0) -> None:
        """Loads and verifies the package; on failure records the error instead of raising."""
        try:
            self._load(intra_op_threads)
            self.error = ""
        except Exception as exc:  # noqa: BLE001 - any failure marks this package broken only
            self.session = None
            self._close_remote()
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model %s/%s failed to load: %s", self.name, self.version, self.error)

    def derived(self, key: str, build: Callable[[ModelHandle], Any]) -> Any:
        """What ``build(self)`` makes of this package (prepared programs, head weights,
        baseline logits), built once per load and shared by every request."""
        with self._derived_lock:
            if key not in self._derived:
                self._derived[key] = build(self)
            return self._derived[key]

    def derived_items(self, prefix: str) -> list[tuple[str, Any]]:
        """What ``derived`` has built so far under keys starting with ``prefix``."""
        with self._derived_lock:
            return [(key, value) for key, value in self._derived.items()
                    if key.startswith(prefix)]

    def fail(self, reason: str) -> None:
        """Marks a loaded package not ready (e.g. its warm-up failed), keeping the reason."""
        self.error = reason
        log.error("model %s/%s is not ready: %s", self.name, self.version, reason)

    def _load(self, intra_op_threads: int) -> None:
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} is missing")
        manifest = Manifest.from_json(json.loads(manifest_path.read_text()))
        if manifest.remote is not None:
            self._close_remote()
            self.remote = RemotePredictor(manifest.remote, manifest.input.name,
                                          manifest.logits_output)
            self.remote.probe()
            self._derived = {}
            self.manifest = manifest
            return
        if ONNX_FILE not in manifest.files:
            raise ValueError(f"manifest lists no {ONNX_FILE}")
        for file_name in manifest.files:  # also those never read (an old model.pt2)
            self._inside(file_name)
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        # ONNX Runtime's pool threads spin during a run (fast) and, by default, for a while
        # after it, which starves the torch passes a gradient method runs next.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        model_bytes, files = self._model_files(manifest)
        self.session = onnx_session(model_bytes, files, options)
        self._derived = {}
        self.manifest = manifest

    def _close_remote(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    def _inside(self, file_name: str) -> Path:
        """The path of a file the manifest lists, once its name (and any link it is) is
        shown to stay inside the package folder; nothing is opened."""
        folder = self.path.resolve()
        shown = file_name[:120]
        relative = PurePosixPath(file_name)
        if (not file_name or relative.is_absolute() or "\\" in file_name
                or any(part in ("..", "") for part in relative.parts)):
            raise ValueError(f"manifest file {shown!r} must be a path inside the package "
                             "folder (no absolute paths, no '..')")
        file_path = (folder / relative).resolve()
        if not file_path.is_relative_to(folder):
            raise ValueError(f"manifest file {shown!r} leads outside the package folder")
        return file_path

    def _verified_bytes(self, file_name: str, expected: str) -> bytes:
        """The bytes of a file the manifest lists, once its name is shown to stay inside
        the package folder and its sha256 to match."""
        shown = file_name[:120]
        file_path = self._inside(file_name)
        if not file_path.is_file():
            raise FileNotFoundError(f"{shown} is listed in the manifest but missing")
        data = file_path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ValueError(f"{shown}: sha256 does not match the manifest's "
                             f"{expected[:12]}… (the file changed after export)")
        return data

    def spec(self) -> Manifest:
        if self.manifest is None:
            raise Unavailable(f"model {self.name} version {self.version} is not loaded")
        return self.manifest

    def run(self, inputs: np.ndarray, outputs: list[str] | None = None,
            state: RemoteState | None = None,
            count_remote: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """ONNX Runtime on float32 N×C×H×W ``inputs``; outputs default to the class scores.

        This is where the service's convention meets the model's: an NHWC model gets its
        inputs transposed; a free batch runs in the power-of-two chunks of
        ``saliency_service.core.chunking`` (the shapes the warm-up ran), and a fixed batch size k in
        chunks of k (the last one padded by repeating its final item, the padding's
        outputs dropped), so every method and prediction works unchanged on any model.
        A remote model's batch goes to its predictor (``core.remote``), bounded by
        ``state``'s deadline, each call reported to ``count_remote(calls, bytes)``."""
        if self.remote is not None:
            return [self._remote_run(inputs, outputs, state, count_remote)]
        if self.session is None:
            raise Unavailable(f"model {self.name} version {self.version} is not loaded")
        spec = self.spec().input
        names = outputs or [self.spec().logits_output]
        if spec.layout == "NHWC":
            inputs = inputs.transpose(0, 2, 3, 1)
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        size, total = spec.batch, inputs.shape[0]
        pieces = (list(chunks(total, MAX_CHUNK_ROWS)) if not size
                  else [slice(start, start + size) for start in range(0, total, size)])
        if len(pieces) <= 1 and (not size or total == size):
            return self._session_run(names, {spec.name: inputs})
        parts = []
        for part in pieces:
            piece = inputs[part]
            kept = piece.shape[0]
            if size and kept < size:
                piece = np.concatenate([piece, np.repeat(piece[-1:], size - kept, axis=0)])
            parts.append([out[:kept] for out in self._session_run(names, {spec.name: piece})])
        return [np.concatenate([part[i] for part in parts]) for i in range(len(names))]

    def _remote_run(self, inputs: np.ndarray, outputs: list[str] | None,
                    state: RemoteState | None,
                    count_remote: Callable[[int, int], None] | None) -> np.ndarray:
        spec = self.spec()
        if outputs and list(outputs) != [spec.logits_output]:
            raise Unavailable(f"model {self.name!r} is served remotely; only its class scores "
                              f"({spec.logits_output!r}) can be read, not {list(outputs)}")
        if spec.input.layout == "NHWC":
            inputs = inputs.transpose(0, 2, 3, 1)
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        return self.remote.run(inputs, state, count_remote,  # type: ignore[union-attr]
                               spec.input.batch)

    def _session_run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = forward_engine.session_for(self)  # ONNX Runtime, or OpenVINO in bfloat16
        if self.run_options is None:  # serving: no bound to keep
            return session.run(names, feeds)
        self.run_started = time.monotonic()
        try:
            return session.run(names, feeds, self.run_options)
        finally:
            self.run_started = None

    def onnx_model(self) -> onnx.ModelProto:
        """The package's ONNX model with its external data in memory, read again from its
        verified files (for the methods that translate the graph; nothing is kept)."""
        if self.remote is not None:
            raise Unavailable(f"model {self.name!r} is served remotely: it has no graph")
        model_bytes, files = self._model_files(self.spec())
        return inline(_parse_onnx(model_bytes), files)

    def _model_files(self, manifest: Manifest) -> tuple[bytes, dict[str, bytes]]:
        """``model.onnx`` and the external-data files it reads, each verified against the
        manifest; a location the manifest does not list is refused."""
        model_bytes = self._verified_bytes(ONNX_FILE, manifest.files[ONNX_FILE])
        model = _parse_onnx(model_bytes)
        try:
            listed = {location: self._verified_bytes(location, manifest.files[location])
                      for location in external_data(model) if location in manifest.files}
            return model_bytes, check_files(model, listed)
        except ExternalDataRefused as exc:
            raise ExternalDataRefused(f"{ONNX_FILE} refused: {exc}") from exc


def _parse_onnx(model_bytes: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_model_from_string(model_bytes)
    except Exception as exc:  # noqa: BLE001 - a file protobuf cannot parse
        raise ValueError(f"{ONNX_FILE} is not an ONNX model ({type(exc).__name__})") from exc


class Repository:
    """All packages under one root, loaded once and reloadable."""

    def __init__(self, root: Path, intra_op_threads: int = 0,
                 pinned: Callable[[], list[ModelHandle]] | None = None) -> None:
        self.root = Path(root)
        self.intra_op_threads = intra_op_threads
        # Packages that live in no folder (a KServe explainer's predictor), made anew by
        # every scan so that a reload asks their predictor again.
        self.pinned = pinned
        self._models: dict[str, dict[int, ModelHandle]] = {}
        # Packages of a scan in progress: named to clients (UNAVAILABLE until installed),
        # found by the thread that prepares them.
        self._pending: dict[str, dict[int, ModelHandle]] = {}
        self._scanned = False
        self._preparing = threading.local()
        self._lock = threading.Lock()

    def load_all(self, prepare: Callable[[ModelHandle], None] | None = None) -> None:
        """Scans ``root/<name>/<version>/`` and loads every package found.

        ``prepare`` (the server's warm-up) runs on each package that loaded, on this thread,
        before the new set replaces the old one, which serves meanwhile: a package only in
        the new set is UNAVAILABLE until then, not NOT_FOUND."""
        found: dict[str, dict[int, ModelHandle]] = {}
        if self.root.is_dir():
            for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                    if version_dir.name.isdigit():
                        handle = ModelHandle(model_dir.name, int(version_dir.name), version_dir)
                        found.setdefault(model_dir.name, {})[handle.version] = handle
        elif self.pinned is None:
            log.warning("model repository %s does not exist", self.root)
        for handle in self.pinned() if self.pinned is not None else ():
            found.setdefault(handle.name, {})[handle.version] = handle
        with self._lock:
            self._pending, self._scanned = found, True
        self._preparing.models = found
        try:
            for versions in found.values():
                for handle in versions.values():
                    handle.load(self.intra_op_threads)
                    if handle.ready and prepare is not None:
                        prepare(handle)
        finally:
            self._preparing.models = None
            with self._lock:
                self._models, self._pending = found, {}
        for handle in self.handles():
            state = "ready" if handle.ready else f"NOT READY ({handle.error})"
            log.info("model %s version %d: %s", handle.name, handle.version, state)

    def replace(self, handle: ModelHandle,
                prepare: Callable[[ModelHandle], None] | None = None) -> None:
        """Installs ``handle``, loaded again on its own (a remote package once its predictor
        answers), in place of the package of its name and version, once ``prepare`` (the
        warm-up) ran on it, if it is still ready then; meanwhile the old one serves."""
        if prepare is not None:
            with self._lock:
                models = {name: dict(versions) for name, versions in self._models.items()}
            models.setdefault(handle.name, {})[handle.version] = handle
            self._preparing.models = models  # ``find`` answers it on this thread
            try:
                prepare(handle)
            finally:
                self._preparing.models = None
        with self._lock:
            versions = self._models.get(handle.name, {})
            if handle.ready and handle.version in versions:
                versions[handle.version] = handle

    def handles(self) -> list[ModelHandle]:
        with self._lock:
            return [h for versions in self._models.values() for h in versions.values()]

    def all_ready(self) -> bool:
        handles = self.handles()
        return bool(handles) and all(h.ready for h in handles)

    def any_ready(self) -> bool:
        return any(h.ready for h in self.handles())

    def find(self, name: str, version: int = 0) -> ModelHandle:
        """The package by name and version (0 = newest); NOT_FOUND names what exists,
        UNAVAILABLE what a scan in progress has found but not yet installed."""
        preparing = getattr(self._preparing, "models", None)
        with self._lock:
            versions = (preparing or self._models).get(name)
            pending = {} if preparing else self._pending.get(name, {})
            names = sorted({*(preparing or self._models), *self._pending})
            scanned = self._scanned
        if not scanned:
            raise Unavailable("models are loading: the repository has not been scanned yet; "
                              "retry shortly")
        if not name:
            raise NotFound(f"no model named in the request; available models: {names}")
        if pending and (versions is None or (version in pending and version not in versions)):
            raise Unavailable(f"model {name!r} is loading and warming up; retry shortly")
        if versions is None:
            raise NotFound(f"model {name!r} not found; available models: {names}")
        if version == 0:
            ready = [v for v, h in versions.items() if h.ready]
            version = max(ready) if ready else max(versions)
        if version not in versions:
            raise NotFound(
                f"model {name!r} has no version {version}; available versions: {sorted(versions)}"
            )
        return versions[version]

    def get(self, name: str, version: int = 0) -> ModelHandle:
        """Like ``find`` but the package must be ready (else UNAVAILABLE with the reason)."""
        handle = self.find(name, version)
        if not handle.ready:
            raise Unavailable(
                f"model {name!r} version {handle.version} is not ready: {handle.error}"
            )
        return handle
