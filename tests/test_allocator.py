"""Freed tensor memory is reused instead of mapped afresh (and zeroed by the kernel) on
every pass: page faults of repeated activation-sized allocations in a fresh process, with and
without."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, resource, sys, threading
import numpy as np
from saliency_service.serving.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else {}
faults = []
def one_pass():
    # Like a network's activations: a dozen tensors alive at once, then all freed.
    activations = [np.ones(int(sys.argv[2]) << 18, np.float32) for _ in range(12)]
    del activations
def passes():
    for _ in range(3):  # warm-up: the first passes must map their memory either way
        one_pass()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_pass()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=passes)  # the server's passes run in worker threads
worker.start()
worker.join()
print(json.dumps({"applied": applied, "faults": faults[0]}))
"""


def probe(mode: str, mib: int = 4, **env: str) -> dict:
    """Page faults of 10 passes of 12 tensors of ``mib`` MiB each, in a worker thread."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.update(env, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(mib)], cwd=ROOT,
                          env=environment,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    default, kept = probe("default"), probe("keep")
    assert kept["applied"] == {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30,
                               "M_TOP_PAD": 64 << 20}
    pages = 10 * 12 * (4 << 20) // 4096  # 10 passes of 12,288 pages
    assert default["faults"] > pages // 4  # mapped and zeroed again, pass after pass
    assert kept["faults"] < pages // 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_worker_keeps_the_heaps_that_large_activations_span() -> None:
    """12 × 16 MiB span several of a worker arena's 64 MiB heaps, which glibc unmaps whole
    once free unless the top pad keeps them (ResNet-50's activations at 224² are this big)."""
    unpadded, kept = probe("keep", 16, MALLOC_TOP_PAD_="0"), probe("keep", 16)
    assert "M_TOP_PAD" not in unpadded["applied"]
    pages = 10 * 12 * (16 << 20) // 4096
    assert unpadded["faults"] > pages // 50
    assert kept["faults"] < pages // 500


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_environment_overrides_each_setting() -> None:
    result = probe("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert result["applied"] == {"M_MMAP_THRESHOLD": 32 << 20, "M_TOP_PAD": 64 << 20}
