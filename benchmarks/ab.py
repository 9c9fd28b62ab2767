"""Two commits of the server side by side: the same requests alternate between them.

Sequential before/after runs on a shared machine differ by more than most changes do; this
serves the same repository from a worktree of ``--base`` and from this tree, one server
process each, and times every request kind on both in a fresh order each round, so that
load falls on both alike.

    python -m benchmarks.ab --base 0716740 [--models resnet50,demo] [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.common import (
    CACHE,
    ROOT,
    ServerProcess,
    base_parser,
    model_names,
    sized_repository,
    table,
    time_interleaved,
    write_json,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor

# (row, method, params field and values, batch): the headline requests of the suites.
REQUESTS: tuple[tuple[str, int, dict[str, Any], int], ...] = (
    ("Predict", 0, {}, 1),
    ("vanilla gradient", pb.METHOD_VANILLA_GRADIENT, {}, 1),
    ("Integrated Gradients (15 steps)", pb.METHOD_INTEGRATED_GRADIENTS, {"steps": 15}, 1),
    ("SmoothGrad (20 samples)", pb.METHOD_SMOOTHGRAD, {}, 1),
    ("Grad-CAM", pb.METHOD_GRADCAM, {}, 1),
    ("RISE (256 masks)", pb.METHOD_RISE, {"masks": 256}, 1),
    ("FastCAM", pb.METHOD_FASTCAM, {}, 1),
    ("FastCAM, batch 8", pb.METHOD_FASTCAM, {}, 8),
)


def worktree(commit: str) -> Path:
    """A detached worktree of ``commit`` in the benchmark cache (made once)."""
    resolved = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    path = CACHE / f"worktree-{resolved[:12]}"
    if not (path / "service").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), resolved],
                       cwd=ROOT, check=True, capture_output=True)
    return path


def request_calls(stub: pb_grpc.ExplainerStub, model: str, size: int
                  ) -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    calls = {}
    for row, method, params, batch in REQUESTS:
        tensor = array_to_tensor(rng.normal(size=(batch, 3, size, size)).astype(np.float32))
        source = pb.Input(tensor=tensor)
        if not method:
            predict = pb.PredictRequest(model=model, input=source)
            calls[row] = lambda r=predict: stub.Predict(r, timeout=600)
            continue
        request = pb.ExplainRequest(model=model, method=method, input=source)
        if params:
            field = pb.Method.Name(method).removeprefix("METHOD_").lower()
            for key, value in params.items():
                setattr(getattr(request, field), key, value)
        calls[row] = lambda r=request: stub.Explain(r, timeout=600)
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--models", default="resnet50,demo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    base = worktree(args.base)
    rows = []
    for architecture in model_names(parser, args.models):
        size = 224 if architecture == "resnet50" else 128
        models = sized_repository(architecture, size)
        flags = {"intra_op_threads": args.threads, "max_inflight": 1}
        with ServerProcess(models, flags, root=base) as before, \
                ServerProcess(models, flags) as after, \
                grpc.insecure_channel(before.address) as old, \
                grpc.insecure_channel(after.address) as new:
            sides = {"before": request_calls(pb_grpc.ExplainerStub(old), architecture, size),
                     "after": request_calls(pb_grpc.ExplainerStub(new), architecture, size)}
            calls = {(side, row): call for side, kinds in sides.items()
                     for row, call in kinds.items()}
            times = time_interleaved(calls, repeats=3 if args.quick else 15, warmup=2,
                                     min_seconds=0 if args.quick else 30, max_repeats=200,
                                     steady_below=0.05)
        for row, *_ in REQUESTS:
            old_ms = statistics.median(times[("before", row)]) * 1000
            new_ms = statistics.median(times[("after", row)]) * 1000
            rows.append({"model": architecture, "request": row, "before ms": old_ms,
                         "after ms": new_ms, "after ÷ before": new_ms / old_ms,
                         "rounds": len(times[("after", row)])})
            print(f"{architecture} {row}: {old_ms:.2f} → {new_ms:.2f} ms", flush=True)
    text = table(rows)
    print(text)
    write_json("ab", {"base": args.base, "rows": rows}, args.out)
    (args.out / "ab.md").write_text(
        f"# This tree against {args.base}, interleaved "
        f"(`python -m benchmarks.ab --base {args.base}`)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
