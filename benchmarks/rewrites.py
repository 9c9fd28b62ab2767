"""What the prepared program's rewrites save, each against itself switched off, in one run.

1. The stem path: Integrated Gradients (15 steps) and SmoothGrad (15 samples) through
   ``Core.explain`` on one image, with the first convolution taken out of the per-row passes
   (``methods._utils.torch_program.linear_stem``) and without (the input-space path).
2. ReLUs and residual adds in place (``methods._utils.torch_program.compute_in_place``) against
   out of place: one forward and input-gradient pass of the trunk over a chunk of rows.
3. Under bfloat16, the weights autocast reads kept in bfloat16 once
   (``methods._utils.torch_program.bfloat16_graph``) against autocast casting the float32
   weights on every pass: Integrated Gradients (15 steps) on one image, the check's verdict
   set aside (the ResNet-50 shape's random weights fail it).

The demo model on 1 thread, the ResNet-50 shape on 2, as ``benchmarks/peers.py`` serves them;
calls interleaved in a fresh order each round; medians.

    python -m benchmarks.rewrites [--quick] [--models demo,resnet50]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    base_parser,
    demo_repository,
    in_process_core,
    model_names,
    resnet50_repository,
    table,
    time_interleaved,
    write_json,
)
from benchmarks.peers import SERVER_CONFIGS
from benchmarks.precision import loaded
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import CostCounter, Job, RequestState
from saliency_service.methods import integrated, noise, registry
from saliency_service.methods._utils import torch_program as tp
from saliency_service.methods._utils.gradient_program import translation
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.allocator import keep_freed_memory

STEPS = 15  # TorchServe's stock Integrated Gradients, and as many SmoothGrad samples


@contextlib.contextmanager
def input_space_path() -> Iterator[None]:
    """Integrated Gradients and SmoothGrad as if the program had no stem to split off."""
    saved = integrated.linear_stem, noise.linear_stem
    integrated.linear_stem = noise.linear_stem = lambda _model: None  # type: ignore[assignment]
    try:
        yield
    finally:
        integrated.linear_stem, noise.linear_stem = saved


def explain_calls(core: Core, name: str, inputs: np.ndarray) -> dict[str, Callable[[], Any]]:
    requests = {
        "integrated_gradients": pb.ExplainRequest(
            model=name, method=pb.METHOD_INTEGRATED_GRADIENTS,
            input=pb.Input(tensor=array_to_tensor(inputs)),
            integrated_gradients=pb.IntegratedGradientsParams(steps=STEPS,
                                                              baseline=pb.BASELINE_ZERO)),
        "smoothgrad": pb.ExplainRequest(
            model=name, method=pb.METHOD_SMOOTHGRAD,
            input=pb.Input(tensor=array_to_tensor(inputs)),
            smoothgrad=pb.SmoothGradParams(samples=STEPS)),
    }

    def through_stem(request: pb.ExplainRequest) -> Callable[[], Any]:
        return lambda: core.explain(request, RequestState(None), CostCounter())

    def input_space(request: pb.ExplainRequest) -> Callable[[], Any]:
        def call() -> Any:
            with input_space_path():
                return core.explain(request, RequestState(None), CostCounter())
        return call

    calls: dict[str, Callable[[], Any]] = {}
    for method, request in requests.items():
        calls[f"{method}: stem path"] = through_stem(request)
        calls[f"{method}: input-space path"] = input_space(request)
    return calls


def pass_calls(handle: ModelHandle, rows: int) -> dict[str, Callable[[], Any]]:
    """One forward and input-gradient pass of the trunk, with and without in-place ops."""
    program = translation(handle).program
    in_place = tp.build_variant(program, tp.TRUNK)
    saved = tp.compute_in_place
    tp.compute_in_place = lambda _graph_module: 0  # type: ignore[assignment]
    try:
        out_of_place = tp.build_variant(program, tp.TRUNK)
    finally:
        tp.compute_in_place = saved
    spec = handle.spec().input
    with torch.no_grad():
        rows_in = in_place.stem(torch.rand(rows, spec.channels, spec.height, spec.width,
                                           generator=torch.Generator().manual_seed(0)))

    def step(module: tp.PreparedModule) -> Callable[[], Any]:
        def call() -> Any:
            source = rows_in.detach().requires_grad_(True)
            return torch.autograd.grad(module(source)[0][:, 0].sum(), source)
        return call

    return {f"trunk pass, {rows} rows: in place": step(in_place),
            f"trunk pass, {rows} rows: out of place": step(out_of_place)}


@contextlib.contextmanager
def casts_on_every_pass(handle: ModelHandle) -> Iterator[None]:
    """The bfloat16 variants of ``handle`` run their float32 weights under autocast, which
    casts them on every pass (what they did before keeping bfloat16 copies)."""
    modules = [m for _, m in handle.derived_items("program:") if m is not None]
    saved = [m.bfloat16_module() for m in modules]
    for module in modules:
        module._bfloat16_graph = module.graph_module
    try:
        yield
    finally:
        for module, graph in zip(modules, saved, strict=True):
            module._bfloat16_graph = graph


def bfloat16_calls(root: Any, model: str, inputs: np.ndarray) -> dict[str, Callable[[], Any]]:
    """Integrated Gradients (15 steps) in bfloat16, weights cast once or on every pass."""
    handle = loaded(root, model, "bfloat16")
    handler = registry.get("integrated_gradients")
    params = handler.params(steps=STEPS, baseline="zero")
    (logits,) = handle.run(inputs)

    def explain() -> Any:
        job = Job(model=handle, inputs=inputs, targets=logits.argmax(axis=1), params=params,
                  base_logits=logits, seed=0)
        return handler.explain(job).maps

    def every_pass() -> Any:
        with casts_on_every_pass(handle):
            return explain()

    explain()  # builds the variants the method uses
    return {"integrated_gradients bfloat16: weights cast once": explain,
            "integrated_gradients bfloat16: weights cast on every pass": every_pass}


def core_rows(core: Core, model: str, inputs: np.ndarray) -> int:
    """How many rows a gradient chunk holds on this server (the in-place pass's batch)."""
    handle = core.repository.get(model)
    job = Job(model=handle, inputs=inputs, targets=np.zeros(1, np.int64), params={},
                     base_logits=None, seed=0, limits=core.limits)
    return min(STEPS, job.items_per_chunk(backward=True))


def measure(model: str, repeats: int) -> list[dict[str, Any]]:
    config = SERVER_CONFIGS[model]
    threads = config["intra_op_threads"]
    root = demo_repository() if model == "demo" else resnet50_repository(224)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        core = in_process_core(root, intra_op_threads=threads,
                               chunk_memory_bytes=config["chunk_memory_bytes"])
        shape = core.repository.get(model).spec().input.shape
        inputs = np.random.default_rng(0).random((1, *shape[1:]), dtype=np.float32)
        rows = core_rows(core, model, inputs)
        calls = {**explain_calls(core, model, inputs),
                 **pass_calls(core.repository.get(model), rows),
                 **bfloat16_calls(root, model, inputs)}
        times = time_interleaved(calls, repeats, warmup=1)
    finally:
        torch.set_num_threads(previous)
    results = []
    for on, off in zip(list(calls)[::2], list(calls)[1::2], strict=True):
        on_ms, off_ms = (float(np.median(times[name])) * 1000 for name in (on, off))
        results.append({"model": model, "threads": threads, "what": on.split(":")[0],
                        "rewrite_ms": on_ms, "without_ms": off_ms,
                        "time_saved": 1.0 - on_ms / off_ms})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="demo,resnet50 (quick: demo)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the server runs
    models = model_names(parser, args.models or ("demo" if args.quick else "demo,resnet50"))
    rows = []
    for model in models:
        rows += measure(model, 3 if args.quick else (20 if model == "demo" else 3))
    text = table(rows, ["model", "threads", "what", "rewrite_ms", "without_ms", "time_saved"])
    text += ("\nrewrite_ms: with the rewrite (stem path, in-place ops, bfloat16 weights cast "
             "once); without_ms: the same work without it; medians of interleaved rounds\n")
    print(text)
    write_json("rewrites", {"rows": rows, "report": text, "quick": args.quick}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
