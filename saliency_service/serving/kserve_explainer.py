"""KServe's custom explainer contract: the InferenceService's predictor as a remote model.

KServe's controller starts an ``explainer:`` container with ``--model_name <isvc>
--predictor_host <isvc>-predictor.<namespace> --http_port 8080 [--workers N]`` (and the
InferenceService may add ``--predictor_protocol`` and ``--predictor_use_ssl``); KServe's
router then sends ``POST /v1/models/<isvc>:explain`` there. With ``--predictor_host`` set,
the repository holds one more package, made from those flags instead of a folder: a
remote model (``core.remote``) named ``--model_name`` whose input shape, input and output
names come from the flags, a ``--predictor_manifest`` file, or the predictor's V2
metadata, in that order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saliency_service.core.remote import KSERVE_V1, V2_GRPC, V2_REST, RemotePredictor, RemoteSpec
from saliency_service.core.repository import InvalidManifest, Manifest, ModelHandle
from saliency_service.serving.config import Config

log = logging.getLogger(__name__)

# KServe's ``--predictor_protocol`` values → ``core.remote``'s protocols.
PROTOCOLS = {"v1": KSERVE_V1, "v2": V2_REST, "grpc-v2": V2_GRPC}
# The port a predictor host without one is reached on: KServe's Services listen on 80
# (443 with TLS), gRPC included.
DEFAULT_PORTS = {False: 80, True: 443}
VERSION = 1
CHANNELS = (1, 3)


def remote_spec(config: Config, extra: dict[str, Any] | None = None) -> RemoteSpec:
    """Where the predictor is and how to call it: the flags over a manifest's ``remote``."""
    protocol = PROTOCOLS[config.predictor_protocol]
    host = config.predictor_host.split("://", 1)[-1].rstrip("/")
    scheme = "https" if config.predictor_use_ssl else "http"
    if protocol == V2_GRPC and ":" not in host:
        host = f"{host}:{DEFAULT_PORTS[config.predictor_use_ssl]}"
    return RemoteSpec.from_json({
        **(extra or {}), "protocol": protocol, "url": f"{scheme}://{host}",
        "model": (extra or {}).get("model") or config.model_name,
        "max_batch": config.predictor_max_batch,
        "timeout_seconds": config.predictor_request_timeout_seconds,
        "retries": config.predictor_request_retries})


def given_manifest(config: Config) -> dict[str, Any]:
    """The ``--predictor_manifest`` file's object ({} when none is given)."""
    if not config.predictor_manifest:
        return {}
    path = Path(config.predictor_manifest)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidManifest(f"--predictor_manifest {path}: cannot read it as JSON: "
                              f"{exc}") from exc
    if not isinstance(data, dict):
        raise InvalidManifest(f"--predictor_manifest {path} must hold a JSON object")
    return data


def parse_shape(text: str) -> list[int]:
    """``--predictor_input_shape``: C,H,W (or H,W,C) for any batch size, or N,C,H,W for a
    fixed batch size N (-1: any)."""
    try:
        shape = [int(value) for value in text.split(",")]
    except ValueError:
        raise InvalidManifest(f"--predictor_input_shape must be integers C,H,W (or N,C,H,W), "
                              f"got {text!r}") from None
    return [-1, *shape] if len(shape) == 3 else shape


def read_labels(text: str) -> list[str]:
    """``--predictor_labels``: a file with one label per line, or comma-separated."""
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [label.strip() for label in text.split(",")]


def _layout(shape: list[int]) -> str:
    """NHWC when only the last dimension looks like the channels, else NCHW."""
    return "NHWC" if shape[3] in CHANNELS and shape[1] not in CHANNELS else "NCHW"


def manifest_of(config: Config, given: dict[str, Any], metadata: dict[str, Any]) -> Manifest:
    """The package's manifest: the flags, then ``given`` (the ``--predictor_manifest``), then
    the predictor's V2 ``metadata``; InvalidManifest names the flag to add."""
    data = {key: value for key, value in given.items() if key not in ("remote", "files")}
    data.update(name=config.model_name, version=VERSION)
    spec = dict(data.get("input") or {})
    outputs = dict(data.get("outputs") or {})
    inputs_meta = [i for i in metadata.get("inputs") or [] if isinstance(i, dict)]
    outputs_meta = [o for o in metadata.get("outputs") or [] if isinstance(o, dict)]
    if inputs_meta and "name" not in spec:
        spec["name"] = inputs_meta[0].get("name")
    if outputs_meta and "logits" not in outputs:
        outputs["logits"] = outputs_meta[0].get("name")
    if config.predictor_input_shape:
        spec["shape"] = parse_shape(config.predictor_input_shape)
    elif "shape" not in spec and inputs_meta:
        shape = [int(d) for d in inputs_meta[0].get("shape") or []]
        spec["shape"] = [-1, *shape] if len(shape) == 3 else shape
    if len(spec.get("shape") or []) != 4:
        where = (f"its V2 metadata gives {spec.get('shape')}" if inputs_meta
                 else "it publishes none over KServe V1")
        raise InvalidManifest(f"the predictor's input shape is not known ({where}): add "
                              "--predictor_input_shape C,H,W (e.g. 3,224,224)")
    spec.setdefault("layout", _layout(spec["shape"]))
    spec.setdefault("mean", [0.0])
    spec.setdefault("std", [1.0])
    data["input"], data["outputs"] = spec, outputs
    if config.predictor_labels:
        data["class_labels"] = read_labels(config.predictor_labels)
    return Manifest.from_json(data)


class PredictorHandle(ModelHandle):
    """The InferenceService's predictor as a package: no folder, its manifest made from the
    flags and the predictor's metadata at every load (so a reload asks again)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config.model_name, VERSION,
                         Path(f"<predictor {config.predictor_host}>"))
        self.config = config

    def _load(self, intra_op_threads: int) -> None:
        given = given_manifest(self.config)
        spec = remote_spec(self.config, given.get("remote"))
        self._close_remote()
        self.remote = predictor = RemotePredictor(spec, "", "")  # names once known
        manifest = manifest_of(self.config, given, predictor.read_metadata())
        predictor.input_name, predictor.output_name = (manifest.input.name,
                                                       manifest.logits_output)
        predictor.probe()
        self._derived = {}
        self.manifest = manifest


def pinned_models(config: Config) -> Callable[[], list[ModelHandle]] | None:
    """What the repository holds beside its folders: the predictor's package when
    ``--predictor_host`` is set (None otherwise)."""
    ignored = config.extra.get("kserve_ignored")
    if ignored:
        log.info("KServe model server flags with no meaning here, ignored: %s",
                 ", ".join(ignored), extra={"event": "kserve_flags_ignored"})
    if not config.predictor_host:
        return None
    try:  # what the flags alone can show wrong stops the start, naming the flag
        remote_spec(config, given_manifest(config).get("remote"))
        if config.predictor_input_shape:
            parse_shape(config.predictor_input_shape)
    except ValueError as exc:
        raise SystemExit(f"invalid KServe explainer settings: {exc}") from exc
    log.info("explaining the %s predictor at %s as model %r (POST /v1/models/%s:explain)",
             config.predictor_protocol, config.predictor_host, config.model_name,
             config.model_name, extra={"event": "kserve_explainer"})
    return lambda: [PredictorHandle(config)]
