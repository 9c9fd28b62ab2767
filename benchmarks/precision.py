"""How much faster are the gradient methods under bfloat16 autocast, and do their maps agree?

Side by side in one process: the same package loaded twice, once with ``--precision float32``
and once with ``--precision bfloat16`` (each load's precision is fixed at its first gradient
pass), and for vanilla gradient, Integrated Gradients (15 steps), SmoothGrad (20 samples) and
Grad-CAM the ms/image of each, timed round-robin (``common.time_interleaved``) so load on a
shared machine falls on both alike; the minimum of the repeats is reported. Agreement of the
final maps: Pearson correlation and the overlap of their top 10 % pixels (the fraction of
float32's top 10 % that bfloat16's top 10 % shares). The same seed gives SmoothGrad the same
noise in both. ResNet-50-shaped at 224² (random weights) and the demo model.

The bfloat16 load runs in bfloat16 even where the model fails the server's check (a server
would keep it float32); ``precision_check`` gives that check's verdict beside the figures.

    .venv/bin/python -m benchmarks.precision [--quick]

Writes ``benchmarks/results/precision.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    base_parser,
    demo_repository,
    sized_repository,
    table,
    time_interleaved,
    write_json,
)
from saliency_service.core import devices
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import DEFAULT_LIMITS, Job
from saliency_service.methods import registry
from saliency_service.methods._utils.torch_program import (
    FAST,
    PRECISION_ROWS,
    Precision,
    bfloat16_check,
    prepared_module,
)

METHODS = {  # handler name → its parameters here
    "vanilla_gradient": {},
    "integrated_gradients": {"steps": 15},
    "smoothgrad": {"samples": 20},
    "gradcam": {},
}
PRECISIONS = ("float32", "bfloat16")


def loaded(root: Path, name: str, precision: str) -> ModelHandle:
    """``name`` from ``root``, loaded afresh, its gradient programs in ``precision`` (set
    before the first gradient pass, so the server's check does not run)."""
    repository = Repository(root)
    repository.load_all()
    handle = repository.get(name)
    bfloat16 = precision == "bfloat16"
    handle.derived("precision", lambda _: Precision(bfloat16, precision))
    prepared_module(handle, FAST)
    return handle


def check_verdict(handle: ModelHandle) -> str:
    """What the server's bfloat16 check says of ``handle`` (a float32 load)."""
    spec = handle.spec().input
    inputs = np.random.default_rng(0).normal(
        size=(spec.batch or PRECISION_ROWS, spec.channels, spec.height, spec.width))
    passed, summary = bfloat16_check(prepared_module(handle, FAST),
                                     torch.from_numpy(inputs.astype(np.float32)))
    return f"{'passed' if passed else 'failed'}: {summary}"


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def top_overlap(reference: np.ndarray, other: np.ndarray, fraction: float = 0.1) -> float:
    """Mean over images of |top(reference) ∩ top(other)| / |top(reference)|."""
    shares = []
    for first, second in zip(reference, other, strict=True):
        count = max(1, int(first.size * fraction))
        top_first = set(np.argsort(-first.ravel(), kind="stable")[:count].tolist())
        top_second = set(np.argsort(-second.ravel(), kind="stable")[:count].tolist())
        shares.append(len(top_first & top_second) / count)
    return float(np.mean(shares))


def measure(label: str, root: Path, name: str, batch: int, repeats: int,
            scale: float) -> list[dict[str, Any]]:
    handles = {precision: loaded(root, name, precision) for precision in PRECISIONS}
    verdict = check_verdict(handles["float32"])
    print(f"{label}: the bfloat16 check {verdict}", flush=True)
    spec = handles["float32"].spec().input
    x = np.random.default_rng(7).normal(
        size=(batch, spec.channels, spec.height, spec.width)).astype(np.float32)
    (logits,) = handles["float32"].run(x)
    targets = logits.argmax(axis=1).astype(np.int64)
    rows = []
    for method, counts in METHODS.items():
        handler = registry.get(method)
        scaled = {key: max(2, int(value * scale)) for key, value in counts.items()}
        params = handler.params(**scaled)
        maps: dict[str, np.ndarray] = {}

        def call(precision: str, params: Any = params, handler: Any = handler,
                 maps: dict[str, np.ndarray] = maps) -> None:
            job = Job(model=handles[precision], inputs=x, targets=targets, params=params,
                      base_logits=logits, seed=1, limits=DEFAULT_LIMITS)
            maps[precision] = handler.explain(job).maps

        times = time_interleaved({p: (lambda p=p: call(p)) for p in PRECISIONS},
                                 repeats=repeats, warmup=1)
        per_image = {p: min(times[p]) * 1000 / batch for p in PRECISIONS}
        row = {"model": label, "method": method, "params": scaled, "batch": batch,
               "float32_ms_per_image": per_image["float32"],
               "bfloat16_ms_per_image": per_image["bfloat16"],
               "speedup": per_image["float32"] / per_image["bfloat16"],
               "pearson": pearson(maps["float32"], maps["bfloat16"]),
               "top10_overlap": top_overlap(maps["float32"], maps["bfloat16"]),
               "repeats": repeats, "precision_check": verdict}
        rows.append(row)
        print(f"{label} {method}: float32 {per_image['float32']:.1f} ms/img, bfloat16 "
              f"{per_image['bfloat16']:.1f} ms/img, ×{row['speedup']:.2f}, pearson "
              f"{row['pearson']:.4f}, top-10 % overlap {row['top10_overlap']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--models", default="demo,resnet50", help="demo and/or resnet50")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    repeats = 1 if args.quick else args.repeats
    names = ["demo"] if args.quick else [n for n in args.models.split(",") if n]
    rows: list[dict[str, Any]] = []
    path = Path()
    for name in names:
        root = demo_repository() if name == "demo" else sized_repository(name, 224)
        rows.extend(measure(name, root, name, args.batch, repeats, scale))
        path = write(rows, repeats, args.out)  # what is done survives a stopped run
    return path


def write(rows: list[dict[str, Any]], repeats: int, out: Path) -> Path:
    columns = ["model", "method", "float32_ms_per_image", "bfloat16_ms_per_image", "speedup",
               "pearson", "top10_overlap"]
    report = table(rows, columns)
    bf16_units = devices.cpu_has_bf16()
    summary = (f"threads {torch.get_num_threads()}; CPU bfloat16 units (AMX/AVX-512 BF16): "
               f"{'yes' if bf16_units else 'no'}; min of {repeats} interleaved rounds")
    print(report + "\n" + summary, flush=True)
    return write_json("precision", {"rows": rows, "summary": summary, "report": report,
                                    "cpu_bf16_units": bf16_units}, out)


if __name__ == "__main__":
    main()
