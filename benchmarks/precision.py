"""How much faster are the methods in bfloat16, and do their maps agree with float32?

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

Forward passes (``--forward-engine openvino``): ``Predict``, RISE-1000 and DE-CAM (its
defaults) per image on ONNX Runtime float32 and on OpenVINO bfloat16, the same in-process
server answering requests with ``precision`` "float32" and "" (its bfloat16) round-robin; on
the demo model also occlusion, SMOE, FastCAM and LOVI, and every map compared with float32's
on demo cells (Pearson, top-10 % overlap, pointing game and relevance mass of both). Where
the time goes: the share of each request spent in the model's runs, and the runs' own
speed-up; what is left (masks, upsampling, the search) does not change with the precision.

    nice .venv/bin/python -m benchmarks.precision [--quick] [--part gradients|forward]

Writes ``benchmarks/results/precision.json`` (gradients) and
``benchmarks/results/precision_forward.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._cells import cells
from benchmarks.common import (
    base_parser,
    demo_repository,
    in_process_core,
    sized_repository,
    table,
    time_interleaved,
    write_json,
)
from saliency_service.core import devices, forward_engine
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import DEFAULT_LIMITS, CostCounter, Job, RequestState
from saliency_service.evaluation import metrics
from saliency_service.methods import registry
from saliency_service.methods._utils.torch_program import (
    FAST,
    PRECISION_ROWS,
    Precision,
    bfloat16_check,
    prepared_module,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor, tensor_to_array

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
    x, _ = forward_inputs(name, handles["float32"].spec().input, batch)
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
               "pearson_min": float(np.nanmin([pearson(a, b) for a, b in zip(
                   maps["float32"], maps["bfloat16"], strict=True)])),
               "top10_overlap": top_overlap(maps["float32"], maps["bfloat16"]),
               "repeats": repeats, "precision_check": verdict}
        rows.append(row)
        print(f"{label} {method}: float32 {per_image['float32']:.1f} ms/img, bfloat16 "
              f"{per_image['bfloat16']:.1f} ms/img, ×{row['speedup']:.2f}, pearson "
              f"{row['pearson']:.4f} (least per image {row['pearson_min']:.4f}), top-10 % "
              f"overlap {row['top10_overlap']:.3f}", flush=True)
    return rows


# Forward methods: name → (params field, params at full scale, quick scale); None = Predict.
FORWARD: dict[str, tuple[str, dict[str, Any], dict[str, Any]] | None] = {
    "predict": None,
    "rise": ("rise", {"masks": 1000}, {"masks": 100}),
    "decam": ("decam", {}, {"population": 16, "generations": 4}),
    "occlusion": ("occlusion", {}, {}),
    "smoe_scale": ("smoe_scale", {}, {}),
    "fastcam": ("fastcam", {}, {}),
    "lovi": ("lovi", {}, {}),
}
# What the ResNet-50-shaped model is timed on (the goals); the demo model runs all.
RESNET_FORWARD = ("predict", "rise", "decam")
# A request's precision field: ONNX Runtime float32, and the server's bfloat16 (OpenVINO).
REQUESTED = {"float32": "float32", "bfloat16": ""}


class RunTimer:
    """Adds up the seconds a session spends in ``run`` (its method replaced on the object)."""

    def __init__(self, session: Any) -> None:
        self.seconds = 0.0
        real = session.run

        def run(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args)
            finally:
                self.seconds += time.perf_counter() - started

        session.run = run


def forward_core(root: Path, name: str) -> tuple[Any, str]:
    """An in-process server over ``root`` with ``--precision bfloat16 --forward-engine
    openvino``, its model's OpenVINO session in place even where the server's check would
    keep it float32 (the check's verdict is returned beside it)."""
    devices.configure(precision="bfloat16", forward_engine=devices.OPENVINO)
    core = in_process_core(root, max_batch=64)
    handle = core.repository.get(name)
    threads = handle.session.get_session_options().intra_op_num_threads
    session = forward_engine.OpenVinoSession(handle.onnx_model().SerializeToString(), threads)
    passed, summary = forward_engine.bfloat16_check(handle, session)
    verdict = f"{'passed' if passed else 'failed'}: {summary}"
    handle.derived(forward_engine.KEY,
                   lambda _: forward_engine.ForwardPrecision(True, verdict, session))
    return core, verdict


def forward_inputs(name: str, spec: Any, count: int) -> tuple[np.ndarray, Any]:
    """Demo cells as the model takes them (with their ground truth), or seeded noise;
    ``spec`` is the model's input spec."""
    if name != "demo":
        noise = np.random.default_rng(7).normal(size=(count, spec.channels, spec.height,
                                                      spec.width))
        return noise.astype(np.float32), None
    batch = cells(count, spec.height)
    pixels = batch.images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32), batch


def measure_forward(label: str, root: Path, name: str, count: int, repeats: int,
                    quick: bool) -> list[dict[str, Any]]:
    core, verdict = forward_core(root, name)
    print(f"{label}: OpenVINO's bfloat16 check {verdict}", flush=True)
    handle = core.repository.get(name)
    timers = {"float32": RunTimer(handle.session),
              "bfloat16": RunTimer(forward_engine.forward_precision(handle).session)}
    inputs, batch = forward_inputs(name, core.repository.get(name).spec().input, count)
    tensor = pb.Input(tensor=array_to_tensor(inputs))
    methods = list(FORWARD) if name == "demo" else list(RESNET_FORWARD)
    rows = []
    for method in methods:
        spec = FORWARD[method]
        replies: dict[str, Any] = {}
        run_seconds = {precision: [] for precision in REQUESTED}

        def call(precision: str, method: str = method, spec: Any = spec,
                 replies: dict[str, Any] = replies,
                 run_seconds: dict[str, list[float]] = run_seconds) -> None:
            before = timers[precision].seconds
            if spec is None:
                replies[precision] = core.predict(pb.PredictRequest(
                    model=name, input=tensor, precision=REQUESTED[precision]), CostCounter())
            else:
                field, full, small = spec
                request = pb.ExplainRequest(model=name, method=pb.Method.Value(
                    f"METHOD_{method.upper()}"), input=tensor, seed=3,
                    precision=REQUESTED[precision])
                getattr(request, field).CopyFrom(type(getattr(request, field))(
                    **(small if quick else full)))
                replies[precision] = core.explain(request, RequestState(), CostCounter())
            run_seconds[precision].append(timers[precision].seconds - before)

        expensive = spec is not None and method in ("rise", "decam")
        times = time_interleaved({p: (lambda p=p: call(p)) for p in REQUESTED},
                                 repeats=repeats, warmup=0 if expensive else 1)
        best = {p: int(np.argmin(times[p])) for p in REQUESTED}
        per_image = {p: times[p][best[p]] * 1000 / count for p in REQUESTED}
        runs = {p: run_seconds[p][-len(times[p]):][best[p]] * 1000 / count for p in REQUESTED}
        row: dict[str, Any] = {
            "model": label, "method": method, "images": count,
            "params": {} if spec is None else (spec[2] if quick else spec[1]),
            "float32_ms_per_image": per_image["float32"],
            "bfloat16_ms_per_image": per_image["bfloat16"],
            "speedup": per_image["float32"] / per_image["bfloat16"],
            "float32_run_ms_per_image": runs["float32"],
            "bfloat16_run_ms_per_image": runs["bfloat16"],
            "run_speedup": runs["float32"] / max(runs["bfloat16"], 1e-9),
            "float32_run_share": runs["float32"] / per_image["float32"],
            "bfloat16_run_share": runs["bfloat16"] / per_image["bfloat16"],
            "precision": {p: replies[p].cost.precision for p in REQUESTED},
            "repeats": repeats, "precision_check": verdict}
        if spec is None:
            full, half = (tensor_to_array(replies[p].logits).astype(np.float64)
                          for p in REQUESTED)
            row["top1_agreement"] = float((full.argmax(1) == half.argmax(1)).mean())
            row["logit_error"] = float(np.abs(full - half).max() / np.abs(full).max())
        else:
            full, half = (tensor_to_array(replies[p].saliency) for p in REQUESTED)
            row.update(map_agreement(full, half, batch))
        rows.append(row)
        agreement = (f"pearson {row['pearson_min']:.4f} (min)" if "pearson_min" in row else
                     f"top-1 {row['top1_agreement']:.2f}, logit error {row['logit_error']:.1e}")
        print(f"{label} {method}: float32 {per_image['float32']:.1f} ms/img, bfloat16 "
              f"{per_image['bfloat16']:.1f} ms/img, ×{row['speedup']:.2f} (model runs "
              f"×{row['run_speedup']:.2f}, {row['bfloat16_run_share']:.0%} of bfloat16's "
              f"time), {agreement}", flush=True)
    devices.configure()
    return rows


def map_agreement(full: np.ndarray, half: np.ndarray, batch: Any) -> dict[str, Any]:
    """Per-image Pearson of bfloat16's maps with float32's (mean, min), their top-10 %
    overlap, and on cells the pointing game and relevance mass of each."""
    pearsons = [pearson(a, b) for a, b in zip(full, half, strict=True)
                if a.std() > 0 or b.std() > 0]
    found: dict[str, Any] = {"pearson_mean": float(np.mean(pearsons)) if pearsons else 1.0,
                             "pearson_min": float(np.min(pearsons)) if pearsons else 1.0,
                             "top10_overlap": top_overlap(full, half)}
    if batch is not None and getattr(batch, "masks", None) is not None:
        has_object = batch.masks.reshape(len(batch.masks), -1).any(axis=1)
        for precision, maps in (("float32", full), ("bfloat16", half)):
            found[f"{precision}_pointing"] = float(np.nanmean(np.where(
                has_object, metrics.pointing_game(maps, batch.masks), np.nan)))
            found[f"{precision}_relevance_mass"] = float(np.nanmean(np.where(
                has_object, metrics.relevance_mass(maps, batch.masks), np.nan)))
    return found


def main(argv: list[str] | None = None) -> Path:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--models", default="demo,resnet50", help="demo and/or resnet50")
    parser.add_argument("--part", choices=("all", "gradients", "forward"), default="all",
                        help="gradient methods (torch autocast), forward passes (OpenVINO)")
    parser.add_argument("--cells", type=int, default=8, help="demo cells for forward methods")
    args = parser.parse_args(argv)
    os.nice(10)  # a benchmark on a shared machine yields to the work around it
    scale = 0.2 if args.quick else 1.0
    repeats = 1 if args.quick else args.repeats
    names = ["demo"] if args.quick else [n for n in args.models.split(",") if n]
    path = Path()
    if args.part in ("all", "forward"):
        path = forward(names, args, repeats)
    if args.part == "forward":
        return path
    rows: list[dict[str, Any]] = []
    for name in names:
        root = demo_repository() if name == "demo" else sized_repository(name, 224)
        rows.extend(measure(name, root, name, args.batch, repeats, scale))
        path = write(rows, repeats, args.out)  # what is done survives a stopped run
    return path


def forward(names: list[str], args: Any, repeats: int) -> Path:
    """The forward passes' side of the suite: ONNX Runtime float32 vs OpenVINO bfloat16."""
    try:
        import openvino  # noqa: F401, PLC0415
    except ImportError:
        print(f"forward passes skipped: OpenVINO is not installed (pip install "
              f"'{devices.OPENVINO_EXTRA}')", flush=True)
        return Path()
    rows: list[dict[str, Any]] = []
    path = Path()
    for name in names:
        root = demo_repository() if name == "demo" else sized_repository(name, 224)
        count = (2 if args.quick else args.cells) if name == "demo" else 1
        rows.extend(measure_forward(name, root, name, count, repeats, args.quick))
        path = write_forward(rows, repeats, args.out)
    return path


def write_forward(rows: list[dict[str, Any]], repeats: int, out: Path) -> Path:
    columns = ["model", "method", "float32_ms_per_image", "bfloat16_ms_per_image", "speedup",
               "run_speedup", "bfloat16_run_share", "pearson_min", "pearson_mean",
               "top10_overlap", "float32_pointing", "bfloat16_pointing"]
    report = table(rows, columns)
    import openvino as ov  # noqa: PLC0415

    summary = (f"ONNX Runtime float32 vs OpenVINO {ov.get_version().split('-')[0]} bfloat16 "
               f"(one in-process server, requests with precision 'float32' and ''); CPU "
               f"bfloat16 units: {'yes' if devices.cpu_has_bf16() else 'no'}; min of "
               f"{repeats} interleaved rounds; run_speedup and bfloat16_run_share: the model "
               "runs alone, and their share of a bfloat16 request")
    print(report + "\n" + summary, flush=True)
    return write_json("precision_forward", {"rows": rows, "summary": summary,
                                            "report": report}, out)


def write(rows: list[dict[str, Any]], repeats: int, out: Path) -> Path:
    columns = ["model", "method", "float32_ms_per_image", "bfloat16_ms_per_image", "speedup",
               "pearson", "pearson_min", "top10_overlap"]
    report = table(rows, columns)
    bf16_units = devices.cpu_has_bf16()
    summary = (f"threads {torch.get_num_threads()}; CPU bfloat16 units (AMX/AVX-512 BF16): "
               f"{'yes' if bf16_units else 'no'}; min of {repeats} interleaved rounds")
    print(report + "\n" + summary, flush=True)
    return write_json("precision", {"rows": rows, "summary": summary, "report": report,
                                    "cpu_bf16_units": bf16_units}, out)


if __name__ == "__main__":
    main()
