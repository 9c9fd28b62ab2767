"""Does a method's working memory stay inside the chunk budget, and does it stop at its deadline?

On the demo package in this process (``benchmarks.common.in_process_core``) with
``--chunk-memory-bytes`` 64 MiB and one image, each case runs twice after a small warm-up of
the same method (so ONNX Runtime's arena is already grown to one chunk):

* to completion, for the peak RSS growth over the RSS before the call (the kernel's high-water
  mark, reset before the call) and the peak of numpy's traced allocations (tracemalloc);
* with a deadline ``--deadline`` seconds after the call starts, for how long the call went on
  after the deadline before it raised DEADLINE_EXCEEDED (the time a worker stays busy for a
  client that has given up).

Cases: RISE with ``masks=10240 cells=128`` (the largest legal masks, the finest legal grid on
128×128), and DE-CAM with the largest population on a full batch of 16, on the finest grid
whose search fits the budget (16; 32 is refused with 64 MiB chunks).

    python -m benchmarks.memory [--quick] [--deadline 2]

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    ROOT,
    base_parser,
    demo_repository,
    in_process_core,
    png_images,
    table,
    write_json,
)
from saliency_service.core.errors import DeadlineExceeded
from saliency_service.core.request import CostCounter, RequestState
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core

CHUNK_MEMORY_BYTES = 64 * 1024 * 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One request to measure: a method, its params message and the batch size."""

    name: str
    method: int
    params_field: str
    params: Any
    batch: int
    warm_up: Any  # the same method's params for an untimed call of about one chunk


def cases(quick: bool) -> list[Case]:
    rise_masks = 1024 if quick else 10240
    return [
        Case(f"rise masks={rise_masks} cells=128", pb.METHOD_RISE, "rise",
             pb.RiseParams(masks=rise_masks, cells=128), 1,
             pb.RiseParams(masks=64, cells=128)),
        Case("decam population=256 grid=16 batch=16", pb.METHOD_DECAM, "decam",
             pb.DecamParams(population=256, grid=16, generations=1, refine=False,
                            patience=0), 4 if quick else 16,
             pb.DecamParams(population=8, grid=16, generations=1, refine=False)),
    ]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Peak RSS growth (MiB) over the RSS at entry: the kernel's high-water mark reset at
    entry where /proc/self/clear_refs allows it, else the largest RSS sampled every 2 ms."""
    result: dict[str, float] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        sampler = None
    except OSError:
        sampler = threading.Event()
    start = _status_kib("VmRSS")
    sampled = [start]

    def sample() -> None:
        assert sampler is not None
        while not sampler.wait(0.002):
            sampled.append(_status_kib("VmRSS"))

    thread = threading.Thread(target=sample, daemon=True) if sampler is not None else None
    if thread is not None:
        thread.start()
    try:
        yield result
    finally:
        if sampler is not None and thread is not None:
            sampler.set()
            thread.join()
            peak = max(sampled)
        else:
            peak = _status_kib("VmHWM")
        result["rss_growth_mib"] = (peak - start) / 1024


def request(case: Case, params: Any, image: bytes) -> pb.ExplainRequest:
    message = pb.ExplainRequest(model="demo", method=case.method, seed=3,
                                input=pb.Input(images=pb.EncodedImages(
                                    images=[image] * case.batch)))
    getattr(message, case.params_field).CopyFrom(params)
    return message


def measure(core: Core, case: Case, image: bytes, deadline: float) -> dict[str, Any]:
    core.explain(request(case, case.warm_up, image), RequestState(), CostCounter())
    full = request(case, case.params, image)
    cost = CostCounter()
    tracemalloc.start()
    started = time.perf_counter()
    with peak_rss() as rss:
        core.explain(full, RequestState(), cost)
    seconds = time.perf_counter() - started
    traced_peak = tracemalloc.get_traced_memory()[1] / MIB
    tracemalloc.stop()
    row: dict[str, Any] = {
        "case": case.name, "rss_growth_mib": rss["rss_growth_mib"],
        "traced_peak_mib": traced_peak, "seconds": seconds,
        "forward_passes": cost.forward_passes,
    }
    state = RequestState(time.monotonic() + deadline)
    stopped_by_deadline = False
    with peak_rss() as rss:
        try:
            core.explain(full, state, CostCounter())
        except DeadlineExceeded:
            stopped_by_deadline = True
    assert state.deadline is not None
    row["deadline_s"] = deadline
    row["stopped_by_deadline"] = stopped_by_deadline
    row["busy_after_deadline_s"] = time.monotonic() - state.deadline
    row["deadline_rss_growth_mib"] = rss["rss_growth_mib"]
    return row


def code_version() -> dict[str, Any]:
    """The commit measured and whether the handlers differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "handlers_modified": bool(git("status", "--porcelain", "--", "handlers"))}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, default=2.0,
                        help="seconds from the call's start to its deadline")
    parser.add_argument("--name", default="memory", help="results file name (without .json)")
    args = parser.parse_args(argv)
    core = in_process_core(demo_repository(), chunk_memory_bytes=CHUNK_MEMORY_BYTES)
    size = core.repository.get("demo").spec().input.height
    image = png_images(1, size, seed=0)[0]
    rows = []
    for case in cases(args.quick):
        rows.append(measure(core, case, image, args.deadline))
        print(f"  {case.name}: done", flush=True)
    text = table(rows, ["case", "rss_growth_mib", "traced_peak_mib", "seconds",
                        "forward_passes", "busy_after_deadline_s", "deadline_rss_growth_mib"])
    text += (f"\ndemo model {size}×{size}, chunk_memory_bytes {CHUNK_MEMORY_BYTES // MIB} MiB, "
             f"deadline {args.deadline:g} s after the call starts; RSS growth over the RSS "
             "before the call, after a warm-up call of the same method\n")
    print(text)
    write_json(args.name, {"rows": rows, "report": text, "quick": args.quick,
                           "chunk_memory_bytes": CHUNK_MEMORY_BYTES, "code": code_version(),
                           "numpy": np.__version__}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
