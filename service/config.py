"""Server configuration from command-line flags and ``SALIENCY_*`` environment variables.

Precedence: flag > environment variable > default. Every field is one flag
(``--max-inflight``) and one variable (``SALIENCY_MAX_INFLIGHT``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "SALIENCY_"


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start; immutable once built."""

    models: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    # Requests executing at once (each holds one worker thread), and waiting beyond
    # those; more are refused with RESOURCE_EXHAUSTED.
    max_inflight: int = 2
    max_queue: int = 16
    # Per-request limits.
    max_batch: int = 16
    max_pixels: int = 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    max_samples: int = 256
    max_generations: int = 500
    # Bytes of activations one batched chunk of a handler may hold (memory budget).
    chunk_memory_bytes: int = 512 * 1024 * 1024
    # Threads inside one ONNX Runtime / torch call (0 = library default).
    intra_op_threads: int = 0
    # Seconds in-flight requests get to finish on SIGTERM.
    grace_seconds: float = 20.0
    log_level: str = "INFO"
    extra: dict[str, Any] = field(default_factory=dict)


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
            dest=f.name,
            default=None,
            help=f"default {f.default!s}; env {ENV_PREFIX}{f.name.upper()}",
        )


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
    values.update(overrides)
    return Config(**values)
