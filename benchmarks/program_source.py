"""Does taking gradients from the ONNX graph cost anything against a ``torch.export`` program?

Side by side in one run, on the same package and inputs: ms/image of each gradient method's
handler when the program comes from the package's ``model.onnx`` (translated, what the server
does) and when it comes from ``torch.export`` of the source module with the same outputs (what
packages carried as ``model.pt2`` before). Both go through the same variant rewrites
(BatchNorm folding, channels-last, stem split). Calls alternate in a fresh order each round
(``time_interleaved``); the minimum of the repeats is reported.

    .venv/bin/python -m benchmarks.program_source [--quick] [--models resnet50,demo]
        [--batches 1,8] [--repeats 6] [--threads 1]

``--threads 1`` keeps both sides on one torch thread, so a machine shared with other work
changes both alike.

Writes ``benchmarks/results/program_source.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import (
    base_parser,
    model_names,
    random_model,
    sized_repository,
    table,
    time_interleaved,
    write_json,
)
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import DEFAULT_LIMITS, Job
from saliency_service.methods import registry
from saliency_service.methods._utils.gradient_program import Translation
from saliency_service.packaging import export

SIZE = 224
# (method, its sample/step parameters): the four.
METHODS = (("vanilla_gradient", {}), ("integrated_gradients", {"steps": 15}),
           ("gradcam", {}), ("smoothgrad", {"samples": 20}))


def exported_program_handle(name: str, package_root: Any) -> ModelHandle:
    """The package loaded again, its program replaced by ``torch.export`` of the source
    module with the package's outputs (logits, then the scale outputs)."""
    repository = Repository(package_root)
    repository.load_all()
    handle = repository.get(name)
    module = random_model(name)
    example = np.random.default_rng(0).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    import torch  # noqa: PLC0415

    graph_module, graph = export.graph_of(module, torch.from_numpy(example))
    scales = [point.node for point in graph.scale_ends()]
    program = export.trace_program(export.with_outputs(graph_module, scales),
                                   torch.from_numpy(example))
    handle.derived("translation", lambda _handle: Translation(program))
    return handle


def measure(name: str, batch: int, repeats: int, quick: bool) -> list[dict[str, Any]]:
    root = sized_repository(name, SIZE)
    repository = Repository(root)
    repository.load_all()
    handles = {"onnx": repository.get(name), "torch.export": exported_program_handle(name, root)}
    x = np.random.default_rng(batch).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)
    (logits,) = handles["onnx"].run(x)
    targets = np.argsort(-logits, axis=1)[:, 1].astype(np.int64)
    rows = []
    for method, counts in METHODS:
        handler = registry.get(method)
        params = handler.params(**({k: 2 for k in counts} if quick else counts))
        maps: dict[str, np.ndarray] = {}

        def call(source: str, params: Any = params, handler: Any = handler,
                 maps: dict[str, np.ndarray] = maps) -> Callable[[], None]:
            def run() -> None:
                job = Job(model=handles[source], inputs=x, targets=targets, params=params,
                          base_logits=logits, seed=1, limits=DEFAULT_LIMITS)
                maps[source] = handler.explain(job).maps
            return run

        times = time_interleaved({source: call(source) for source in handles},
                                 repeats=repeats if not counts else max(1, repeats // 3),
                                 warmup=1)
        onnx_ms, export_ms = (min(times[s]) * 1000 / batch for s in ("onnx", "torch.export"))
        rows.append({"model": name, "batch": batch, "method": method, **counts,
                     "onnx_ms_per_image": onnx_ms, "torch_export_ms_per_image": export_ms,
                     "ratio_onnx_to_export": onnx_ms / export_ms,
                     "max_map_difference": float(np.abs(maps["onnx"] - maps["torch.export"])
                                                 .max())})
        print(table([rows[-1]]), flush=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,demo")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both sides (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    rows = []
    for name in model_names(parser, args.models):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.extend(measure(name, batch, repeats, args.quick))
    print(table(rows))
    write_json("program_source", {"rows": rows, "size": SIZE, "quick": args.quick,
                                  "threads": args.threads or None}, args.out)


if __name__ == "__main__":
    main()
