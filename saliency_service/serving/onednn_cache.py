"""How many compiled oneDNN kernels the process keeps: enough for every model it serves.

Torch runs convolutions through oneDNN, which compiles a kernel per layer and batch shape and
keeps the compiled kernels in one least-recently-used cache for the whole process. Its
default (1024 kernels) holds one small model's, not a repository's: the warm-up of the later
models evicts the kernels of the earlier ones, whose first requests after readiness then
compile them again. Raising the capacity keeps what every warm-up built; a cached kernel
costs little memory, and the set of kernels is bounded because passes run in a few chunk
lengths (``saliency_service.core.chunking``).

oneDNN reads ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` once, when it first builds a kernel, so
this must run before any convolution: the server calls it at start and the exporter before
it traces (a process may export, then serve); an explicit setting in the environment wins.
"""

from __future__ import annotations

import os

VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
CAPACITY = 16384


def reserve_kernel_cache() -> str:
    """Sets the capacity unless the environment does; returns the setting as oneDNN will
    read it (the environment's text, even one oneDNN would not accept)."""
    return os.environ.setdefault(VARIABLE, str(CAPACITY))
