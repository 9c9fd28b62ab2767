"""Server configuration from command-line flags and ``SALIENCY_*`` environment variables.

Precedence: flag > environment variable > default. Every field is one flag
(``--max-inflight``) and one variable (``SALIENCY_MAX_INFLIGHT``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "SALIENCY_"
# A request run on the event loop holds up every other call for its duration.
MAX_INLINE_MS = 20.0

# One line per setting, shown by ``saliency serve --help`` (and in the README).
HELP = {
    "models": "model repository root: <models>/<name>/<version>/",
    "host": "address to bind (0.0.0.0 in containers)",
    "port": "gRPC port (0 picks a free one)",
    "metrics_port": "Prometheus /metrics port (0 picks a free one, -1 turns it off)",
    "http_port": "HTTP/JSON API, KServe V1 routes and the web explorer at /explorer/ (0 picks "
    "a free one, -1 turns it off); same limits, tokens and TLS as gRPC",
    "http_header_timeout_seconds": "seconds an HTTP connection gets to send a complete request "
    "head, from its opening or its previous response; slower ones are closed, so idle or "
    "half-open sockets cannot hold the port",
    "http_max_connections": "HTTP connections open at once; a new one beyond it is answered "
    "503 and closed",
    "http_max_connections_per_client": "HTTP connections open at once from one client "
    "address (behind a proxy: the proxy's); a new one beyond it is answered 503 and closed, so "
    "one client cannot take them all",
    "max_inflight": "requests executing at once (one worker thread each)",
    "max_queue": "requests waiting for a worker; beyond that RESOURCE_EXHAUSTED at once",
    "max_queue_wait_ms": "bound on the wait for a worker (0 = off): a request is refused at "
    "once (RESOURCE_EXHAUSTED) when its expected wait, from the measured cost of the work ahead "
    "of it, exceeds this, or when it would run longer than this and take the last worker that "
    "frees within it while shorter requests arrive; one still waiting after this long is "
    "refused then",
    "max_concurrent_rpcs": "calls of any kind the gRPC server holds at once, refused by gRPC "
    "itself beyond that, bounding the request bytes in memory (0 = max_inflight + "
    "max_queue + 64)",
    "inline_below_ms": "a one-item tensor Predict, or a method on ONNX Runtime alone, that "
    "recently ran in under this many ms runs on the event loop when nothing else is executing "
    "or waiting, sparing the ~0.1 ms hand-off to a worker thread (0 = always hand off)",
    "max_batch": "images per request",
    "max_pixels": "pixels (height × width) per image, decoded or tensor",
    "max_message_bytes": "largest gRPC message received or sent, and largest HTTP request body "
    "(or KServe tensor) the HTTP API takes (413 beyond it)",
    "max_samples": "noise samples per image (SmoothGrad, VarGrad, Guided AbsoluteGrad)",
    "max_steps": "Integrated Gradients steps",
    "max_masks": "RISE masks",
    "max_population": "DE-CAM population",
    "max_generations": "DE-CAM generations",
    "max_windows": "occlusion windows per image (set by window and stride)",
    "chunk_memory_bytes": "memory one batched chunk of a method may hold: activations, and "
    "masks and perturbed copies",
    "intra_op_threads": "threads inside one ONNX Runtime / torch call (0 = library default)",
    "grace_seconds": "on SIGTERM, seconds admitted requests get to finish; queued ones that "
    "would not are refused at once, and what still runs when it ends is answered UNAVAILABLE",
    "drain_notice_seconds": "on SIGTERM, at most this many seconds (within the grace period) "
    "the port stays open answering new calls UNAVAILABLE, until calls pause for 0.1 s; then "
    "every connection gets a GOAWAY and the port closes",
    "warmup_timeout_seconds": "bound on each model run of a package's warm-up at start-up "
    "and reload; a package with a run that outlasts it (e.g. a graph that never ends) is not "
    "ready, with the reason (0 = no bound)",
    "reload_interval_seconds": "seconds between repository scans for changed packages "
    "(0 = off; SIGHUP always reloads)",
    "max_connection_age_seconds": "seconds after which a client connection is sent a GOAWAY "
    "(±10 %), so clients reconnect, re-resolve and spread over replicas added since "
    "(0 = never)",
    "max_connection_age_grace_seconds": "seconds calls in flight on an aged connection get to "
    "finish before it is closed (0 = as long as they take)",
    "keepalive_time_seconds": "seconds between the server's pings on an idle connection, "
    "dropping clients that vanished (0 = gRPC's default, 2 hours)",
    "keepalive_timeout_seconds": "seconds a ping (the server's or a client's) may go "
    "unanswered before the connection is closed",
    "keepalive_min_ping_interval_seconds": "shortest interval between a client's keepalive "
    "pings the server accepts; more often is answered with GOAWAY too_many_pings",
    "tls_cert": "server certificate chain (PEM); with tls_key turns TLS on",
    "tls_key": "server private key (PEM)",
    "tls_client_ca": "CA bundle (PEM) that client certificates must chain to (mutual TLS)",
    "auth_token": "bearer token required in 'authorization' metadata (health stays open)",
    "auth_token_file": "file with one accepted bearer token per line (e.g. a mounted secret)",
    "device": "where gradient methods' torch programs run: cpu, cuda or cuda:N (refused at "
    "start-up when torch sees no such device)",
    "onnx_providers": "ONNX Runtime execution providers, comma-separated in order of preference "
    "(e.g. OpenVINOExecutionProvider,CPUExecutionProvider); empty = CPUExecutionProvider, or "
    "CUDAExecutionProvider,CPUExecutionProvider with --device cuda; one this onnxruntime lacks "
    "is refused at start-up",
    "precision": "gradient methods' arithmetic: float32, bfloat16 (torch autocast; inputs, sums "
    "and maps stay float32) or auto (bfloat16 where the CPU has AMX/AVX-512 BF16 units); a model "
    "whose bfloat16 gradients do not match float32 at load stays float32 and GetModel says so",
    "forward_engine": "what runs forward passes (prediction, SMOE/FastCAM/LOVI, DE-CAM, RISE, "
    "occlusion): onnxruntime (float32) or openvino (bfloat16 under --precision bfloat16 or auto, "
    "checked against float32 per model at warm-up; needs saliency-service[openvino])",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json (one object per line) or text",
    "model_name": "KServe explainer: the name the predictor's model is explained under "
    "(POST /v1/models/{name}:explain) and served under on the predictor; with predictor_host",
    "predictor_host": "KServe explainer: host[:port] of the InferenceService's predictor (as "
    "KServe's controller passes it); the server then explains that predictor's model, "
    "served remotely (docs/remote-models.md), as model_name",
    "predictor_protocol": "KServe explainer: how to call the predictor: v1 (KServe V1 REST), "
    "v2 (Open Inference Protocol REST) or grpc-v2",
    "predictor_use_ssl": "KServe explainer: call the predictor over https (TLS for grpc-v2)",
    "predictor_request_timeout_seconds": "KServe explainer: bound on one call to the "
    "predictor (a request's deadline bounds it further)",
    "predictor_request_retries": "KServe explainer: how often a call the predictor answers "
    "502/503/504 (UNAVAILABLE) is tried again",
    "predictor_max_batch": "KServe explainer: inputs per call to the predictor (its max batch "
    "size)",
    "predictor_input_shape": "KServe explainer: the predictor's input shape C,H,W (or H,W,C), "
    "any batch size, or N,C,H,W with a fixed batch size N; needed with v1, read from the "
    "predictor's V2 metadata otherwise",
    "predictor_labels": "KServe explainer: the class labels: a file with one per line, or "
    "comma-separated",
    "predictor_manifest": "KServe explainer: a manifest.json describing the predictor's model "
    "(input name, layout, mean, std, outputs, class_labels, remote options such as "
    "binary_data or headers); the flags above take precedence",
}

# KServe's controller starts a custom explainer container with its model server's flags
# (``--model_name``, ``--predictor_host``, ``--http_port``, ``--workers``): the same settings
# under those spellings. ``--workers`` is the pod's container concurrency.
KSERVE_FLAGS = {
    "http_port": ("--http_port",),
    "port": ("--grpc_port",),
    "max_inflight": ("--workers",),
    "model_name": ("--model_name",),
    "predictor_host": ("--predictor_host",),
    "predictor_protocol": ("--predictor_protocol", "--protocol"),
    "predictor_use_ssl": ("--predictor_use_ssl",),
    "predictor_request_timeout_seconds": ("--predictor_request_timeout_seconds",),
    "predictor_request_retries": ("--predictor_request_retries",),
    "predictor_max_batch": ("--predictor_max_batch",),
    "predictor_input_shape": ("--predictor_input_shape",),
    "predictor_labels": ("--predictor_labels",),
    "predictor_manifest": ("--predictor_manifest",),
}
# KServe model server flags that have no meaning here: accepted, so a container spec written
# for KServe's own servers starts, and named in the log.
KSERVE_IGNORED = ("--max_threads", "--max_asyncio_workers", "--enable_grpc",
                  "--enable_docs_url", "--enable_latency_logging", "--configure_logging",
                  "--log_config_file", "--access_log_format", "--event-loop",
                  "--timeout-keep-alive", "--grpc_max_send_message_length",
                  "--grpc_max_receive_message_length", "--enable_predictor_health_check")
PREDICTOR_PROTOCOLS = ("v1", "v2", "grpc-v2")


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start; immutable once built."""

    models: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    # The HTTP/JSON API and explorer beside gRPC (-1 = off).
    http_port: int = -1
    # HTTP connections: the time to send a request head, and how many may be open at once,
    # in all and from one client address.
    http_header_timeout_seconds: float = 10.0
    http_max_connections: int = 1000
    http_max_connections_per_client: int = 100
    # Requests executing at once (each holds one worker thread), and waiting beyond
    # those; more are refused with RESOURCE_EXHAUSTED.
    max_inflight: int = 2
    max_queue: int = 16
    # Bound on the queueing delay (ms) on top of the count; 0 = count only.
    max_queue_wait_ms: float = 0.0
    max_concurrent_rpcs: int = 0
    # Cheap one-item tensor requests on an idle server run on the event loop (ms; 0 = off).
    inline_below_ms: float = 2.0
    # Per-request limits.
    max_batch: int = 16
    max_pixels: int = 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    # Per-request work: SmoothGrad/VarGrad/AbsoluteGrad samples, Integrated Gradients
    # steps, RISE masks, DE-CAM population and generations.
    max_samples: int = 256
    max_steps: int = 256
    max_masks: int = 10240
    max_population: int = 256
    max_generations: int = 500
    max_windows: int = 4096
    # Bytes one batched chunk of a handler may hold: activations, masks, perturbed copies.
    chunk_memory_bytes: int = 512 * 1024 * 1024
    # Threads inside one ONNX Runtime / torch call (0 = library default).
    intra_op_threads: int = 0
    # Seconds in-flight requests get to finish on SIGTERM; the process exits within a second
    # after.
    grace_seconds: float = 20.0
    # Seconds, within the grace period, the port stays open after SIGTERM (new calls answered
    # UNAVAILABLE) until calls pause, before the GOAWAY.
    drain_notice_seconds: float = 1.0
    # Bound on one package's warm-up (0 = none); a package that outlasts it is not ready.
    warmup_timeout_seconds: float = 120.0
    # Seconds between scans of the model repository for changed packages (0 = off;
    # SIGHUP always rescans).
    reload_interval_seconds: float = 0.0
    # Connections: a GOAWAY after this age (0 = never) so clients spread over new replicas, and
    # how long calls in flight then get (0 = unbounded); keepalive pings sent and accepted.
    max_connection_age_seconds: float = 0.0
    max_connection_age_grace_seconds: float = 0.0
    keepalive_time_seconds: float = 0.0
    keepalive_timeout_seconds: float = 20.0
    keepalive_min_ping_interval_seconds: float = 10.0
    # TLS: server certificate and key (PEM); with a client CA, clients must present a
    # certificate it signed (mutual TLS). Empty = plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer tokens required in the ``authorization`` metadata (health stays open):
    # one token, and/or a file with one token per line (e.g. a mounted secret).
    auth_token: str = ""
    auth_token_file: str = ""
    # Where models run (validated at start-up by ``core.devices``).
    device: str = "cpu"
    onnx_providers: str = ""
    precision: str = "float32"
    forward_engine: str = "onnxruntime"
    log_level: str = "INFO"
    # "json" (one object per line) or "text".
    log_format: str = "json"
    # KServe's custom explainer contract (``serving.kserve_explainer``): the InferenceService's
    # predictor, explained as a remote model named ``model_name``.
    model_name: str = ""
    predictor_host: str = ""
    predictor_protocol: str = "v1"
    predictor_use_ssl: bool = False
    predictor_request_timeout_seconds: float = 600.0
    predictor_request_retries: int = 2
    predictor_max_batch: int = 32
    predictor_input_shape: str = ""
    predictor_labels: str = ""
    predictor_manifest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def limits(self) -> dict[str, float]:
        """Every per-request limit by name, for the method parameters that declare one
        (``saliency_service.core.params``) and for the chunk memory budget."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if (f.name.startswith("max_") or f.name == "chunk_memory_bytes")
                and isinstance(getattr(self, f.name), int | float)}

    def __post_init__(self) -> None:
        problems = []
        if self.max_inflight < 1:
            problems.append(f"max_inflight (--max-inflight; KServe's --workers, from "
                            f"containerConcurrency) must be >= 1, got {self.max_inflight}")
        if self.max_concurrent_rpcs < 0:
            problems.append(f"max_concurrent_rpcs must be >= 0, got {self.max_concurrent_rpcs}")
        if self.max_queue < 0:
            problems.append(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.http_header_timeout_seconds > 0:
            problems.append("http_header_timeout_seconds must be > 0, got "
                            f"{self.http_header_timeout_seconds}")
        if not 1 <= self.http_max_connections_per_client <= self.http_max_connections:
            problems.append("http_max_connections_per_client must be within [1, "
                            f"http_max_connections={self.http_max_connections}], got "
                            f"{self.http_max_connections_per_client}")
        if not self.max_queue_wait_ms >= 0:
            problems.append(f"max_queue_wait_ms must be >= 0, got {self.max_queue_wait_ms}")
        if not 0 <= self.inline_below_ms <= MAX_INLINE_MS:
            problems.append(f"inline_below_ms must be within [0, {MAX_INLINE_MS:g}] (it "
                            f"blocks the event loop that long), got {self.inline_below_ms}")
        for name in ("drain_notice_seconds", "warmup_timeout_seconds",
                     "max_connection_age_seconds", "max_connection_age_grace_seconds",
                     "keepalive_time_seconds", "keepalive_timeout_seconds",
                     "keepalive_min_ping_interval_seconds"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.precision not in ("float32", "bfloat16", "auto"):
            problems.append("precision must be 'float32', 'bfloat16' or 'auto', got "
                            f"{self.precision!r}")
        if self.log_format not in ("json", "text"):
            problems.append(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        problems.extend(self._predictor_problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _predictor_problems(self) -> list[str]:
        """What keeps the KServe explainer settings from describing a predictor."""
        problems = []
        if self.predictor_protocol not in PREDICTOR_PROTOCOLS:
            problems.append(f"predictor_protocol must be one of {', '.join(PREDICTOR_PROTOCOLS)}"
                            f", got {self.predictor_protocol!r}")
        if not self.predictor_host:
            return problems
        if not self.model_name:
            problems.append("predictor_host needs model_name (--model_name), the name the "
                            "predictor serves the model under")
        if (self.predictor_protocol == "v1" and not self.predictor_input_shape
                and not self.predictor_manifest):
            problems.append("a v1 predictor publishes no input shape: add --predictor_input_shape"
                            " C,H,W (e.g. 3,224,224), or use --predictor_protocol v2, whose "
                            "metadata has it")
        return problems

    @property
    def concurrent_rpcs(self) -> int:
        """The gRPC server's bound on calls held at once (health and discovery calls
        get 64 beyond the admitted requests)."""
        return self.max_concurrent_rpcs or self.max_inflight + self.max_queue + 64

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


def _fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Config) if f.name != "extra"]


def _convert(kind: Any, text: str) -> Any:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if kind_name in ("int", int):
        return int(text)
    if kind_name in ("float", float):
        return float(text)
    if kind_name in ("Path", Path):
        return Path(text)
    if kind_name in ("bool", bool):
        return text.lower() in ("1", "true", "yes", "on")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one ``--flag`` per config field; unset flags fall back to env/defaults."""
    for f in _fields():
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            *KSERVE_FLAGS.get(f.name, ()),
            dest=f.name,
            default=None,
            # argparse formats help with %: a literal one is doubled.
            help=f"{HELP.get(f.name, '').replace('%', '%%')} (default {f.default!s}; env "
            f"{ENV_PREFIX}{f.name.upper()})",
        )
    for flag in KSERVE_IGNORED:
        parser.add_argument(flag, dest="kserve_ignored", action=_Ignored, nargs="?",
                            help=argparse.SUPPRESS)


class _Ignored(argparse.Action):
    """Notes a KServe flag (and its value) that has no meaning here."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        noted = [*(getattr(namespace, self.dest, None) or []),
                 f"{option_string} {values or ''}".strip()]
        setattr(namespace, self.dest, noted)


def from_sources(
    args: argparse.Namespace | None = None, environ: dict[str, str] | None = None, **overrides: Any
) -> Config:
    """Builds a Config from flags, then environment, then defaults (first set wins)."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for f in _fields():
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            try:
                values[f.name] = _convert(f.type, str(raw))
            except ValueError as exc:
                raise SystemExit(f"invalid value {raw!r} for {f.name}: {exc}") from exc
    ignored = getattr(args, "kserve_ignored", None)
    if ignored:
        values["extra"] = {"kserve_ignored": list(ignored)}
    values.update(overrides)
    try:
        return Config(**values)
    except ValueError as exc:
        raise SystemExit(f"invalid configuration: {exc}") from exc
