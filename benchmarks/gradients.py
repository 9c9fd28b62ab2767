"""Are our gradient methods at least as fast as Captum's, per image?

Side by side in one run, for every gradient-family method: ms/image of our handler
(in-process ``Handler.explain`` on the exported package, prepared program copy) and of the
Captum equivalent on the source ``nn.Module`` (eval mode, parameter gradients off, the same
inputs, targets, sample/step counts and chunk size as ``internal_batch_size`` /
``nt_samples_batch_size``), and their ratio. The chunk budget (``--chunk-mib``, default
4 GiB) lets a batch of 8 run as one pass like Captum's unchunked single-pass methods; with the
server's default 512 MiB a ResNet-50 at 224² is chunked to one image per pass.
224×224, batch 1 and 8, on ``DemoResNet`` and ``ResNet50Shape`` (random weights).
Calls alternate ours/Captum so load on a shared machine
falls on both alike; the best (minimum) of the repeats is reported, the least disturbed by
other work on a shared machine. Single-pass methods are warmed up and repeated ``--repeats``
times; multi-pass ones (samples/steps) a third as often, as each call already averages over
many passes.

Captum has no Guided AbsoluteGrad and no Grad-CAM++: those rows are timed against the Captum
method with the same passes (NoiseTunnel VarGrad; LayerGradCam) and say so in ``peer``.

    .venv/bin/python -m benchmarks.gradients [--quick]

Writes ``benchmarks/results/gradients.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)

from benchmarks.common import (
    base_parser,
    model_names,
    random_model,
    sized_repository,
    table,
    write_json,
)
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import DEFAULT_LIMITS, Job
from saliency_service.methods import registry
from saliency_service.methods._utils.baselines import make_baseline
from saliency_service.methods.noise import noise_sigmas

SIZE = 224
METHODS = (
    "vanilla_gradient",
    "input_x_gradient",
    "guided_backprop",
    "gradcam",
    "gradcam_plus_plus",
    "smoothgrad",
    "vargrad",
    "guided_absolutegrad",
    "integrated_gradients",
)


def build(name: str) -> tuple[torch.nn.Module, ModelHandle]:
    """The architecture with random weights (seed 0) and its package, the one the other suites
    measure too (``sized_repository``: exported once, cached)."""
    module: torch.nn.Module = random_model(name)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    repository = Repository(sized_repository(name, SIZE))
    repository.load_all()
    return module, repository.get(name)


def captum_call(
    method: str,
    module: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    params: dict[str, Any],
    chunk: int,
    baseline: torch.Tensor,
    sigma: float,
) -> tuple[str, Callable[[], torch.Tensor]]:
    """(peer description, a call computing the Captum equivalent of ``method``)."""
    layer = module.get_submodule(module.cam_layer)  # type: ignore[arg-type]
    if method == "vanilla_gradient":
        return "Saliency(abs=False)", lambda: Saliency(module).attribute(
            x, target=targets, abs=False
        )
    if method == "input_x_gradient":
        return "InputXGradient", lambda: InputXGradient(module).attribute(x, target=targets)
    if method == "guided_backprop":
        return "GuidedBackprop", lambda: GuidedBackprop(module).attribute(x, target=targets)
    if method in ("gradcam", "gradcam_plus_plus"):

        def cam() -> torch.Tensor:
            raw = LayerGradCam(module, layer).attribute(x, target=targets, relu_attributions=True)
            return LayerAttribution.interpolate(raw, (SIZE, SIZE), "bilinear")

        return (
            "LayerGradCam + interpolate"
            if method == "gradcam"
            else "LayerGradCam (same passes; Captum has no Grad-CAM++)"
        ), cam
    if method in ("smoothgrad", "vargrad", "guided_absolutegrad"):
        nt_type = "smoothgrad" if method == "smoothgrad" else "vargrad"
        peer = f"NoiseTunnel({nt_type})"
        if method == "guided_absolutegrad":
            peer += " (same passes; Captum has no Guided AbsoluteGrad)"
        samples = int(params["samples"])
        return peer, lambda: NoiseTunnel(Saliency(module)).attribute(
            x,
            nt_type=nt_type,
            nt_samples=samples,
            stdevs=sigma,
            target=targets,
            abs=False,
            nt_samples_batch_size=max(1, chunk // x.shape[0]),
        )
    if method == "integrated_gradients":
        return "IntegratedGradients(gausslegendre)", lambda: IntegratedGradients(module).attribute(
            x,
            baselines=baseline,
            target=targets,
            n_steps=int(params["steps"]),
            method="gausslegendre",
            internal_batch_size=chunk,
        )
    raise ValueError(method)


def agreement(method: str, ours: np.ndarray, reference: torch.Tensor) -> float | str:
    """max |ours − Captum| / max |Captum| where the two compute the same thing."""
    if method in ("smoothgrad", "vargrad", "guided_absolutegrad", "gradcam_plus_plus"):
        return "-"  # different noise, or a different method
    expected = reference.detach().numpy().astype(np.float64)
    if method == "gradcam":
        return (
            "-"
            if ours.shape != expected.shape
            else float(np.abs(ours - expected).max() / np.abs(expected).max())
        )
    return float(np.abs(ours - expected).max() / max(np.abs(expected).max(), 1e-30))


def measure(
    name: str, batch: int, quick: bool, repeats: int, samples: int = 0,
    limits: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    module, handle = build(name)
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)
    (logits,) = handle.run(x)
    targets = np.argsort(-logits, axis=1)[:, 1].astype(np.int64)  # a non-predicted class
    rows = []
    for method in METHODS:
        handler = registry.get(method)
        counts = {k: samples or 2 for k in ("samples", "steps") if k in handler.defaults}
        params = handler.params(**counts) if quick or samples else handler.params()

        def job() -> Job:
            return Job(
                model=handle,
                inputs=x,
                targets=targets,
                params=params,  # noqa: B023
                base_logits=logits,
                seed=1,
                limits=limits or DEFAULT_LIMITS,
            )

        chunk = job().items_per_chunk(backward=True)
        baseline = make_baseline("black", x, handle.spec().input)
        values = dataclasses.asdict(params)
        sigma = float(noise_sigmas(x, float(values.get("noise_level", 0.15))).mean())
        peer, captum = captum_call(
            method,
            module,
            torch.from_numpy(x),
            torch.from_numpy(targets),
            values,
            chunk,
            torch.from_numpy(baseline),
            sigma,
        )
        results: dict[str, Any] = {}

        def ours(results: dict[str, Any] = results) -> None:
            running = job()
            attribution = handler.explain(running)  # noqa: B023
            results["ours"] = attribution
            results["job"] = running

        def theirs(results: dict[str, Any] = results) -> None:
            results["captum"] = captum()  # noqa: B023

        multi_pass = any(k in values for k in ("samples", "steps"))
        if not multi_pass:  # warm-up; multi-pass calls average over many passes already
            ours()
            theirs()
        count = max(1, repeats // 3) if multi_pass else repeats
        times: dict[str, list[float]] = {"ours": [], "captum": []}
        for repeat in range(count):
            order = (("ours", ours), ("captum", theirs))
            for label, call in order if repeat % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - started)
        ours_ms = min(times["ours"]) * 1000 / batch
        captum_ms = min(times["captum"]) * 1000 / batch
        done = results["job"]
        raw = results["ours"].raw
        if method in ("gradcam", "gradcam_plus_plus"):
            raw = results["ours"].maps  # compare the upsampled map with Captum's
            expected = results["captum"].detach().numpy()[:, 0]
            low = expected.reshape(batch, -1).min(1).reshape(-1, 1, 1)
            span = expected.reshape(batch, -1).max(1).reshape(-1, 1, 1) - low
            results["captum"] = torch.from_numpy((expected - low) / np.where(span > 0, span, 1))
        rows.append(
            {
                "model": name,
                "batch": batch,
                "method": method,
                "peer": peer,
                "params": {k: v for k, v in values.items() if k in ("samples", "steps")},
                "ours_ms_per_image": ours_ms,
                "captum_ms_per_image": captum_ms,
                "ratio": ours_ms / captum_ms,
                "max_rel_diff": agreement(method, raw, results["captum"]),
                "forward_passes": done.cost.forward_passes,
                "backward_passes": done.cost.backward_passes,
                "repeats": repeats,
                "chunk_items": chunk,
            }
        )
        print(
            f"{name} b{batch} {method}: ours {ours_ms:.1f} ms/img, captum "
            f"{captum_ms:.1f} ms/img, ratio {ours_ms / captum_ms:.2f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed calls per single-pass method (default 3)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        help="samples/steps for every multi-pass method (default: the "
        "handler defaults, 20 samples and 32 steps; --quick 2)",
    )
    parser.add_argument("--models", default="demo,resnet50")
    parser.add_argument("--batches", default="1,8", help="batch sizes (--quick: 1,2)")
    parser.add_argument(
        "--chunk-mib",
        type=int,
        default=4096,
        help="memory budget of one chunk (the server's --chunk-memory-bytes); the default lets "
        "a batch of 8 ResNet-50 images run as one pass, as Captum's single-pass methods do",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or 3
    models = ["demo"] if args.quick else model_names(parser, args.models)
    batches = (1, 2) if args.quick else tuple(int(b) for b in args.batches.split(","))
    rows = []
    for name in models:
        for batch in batches:
            limits = {"chunk_memory_bytes": args.chunk_mib * 1024 * 1024}
            rows.extend(measure(name, batch, args.quick, repeats, args.samples, limits))
    columns = [
        "model",
        "batch",
        "method",
        "ours_ms_per_image",
        "captum_ms_per_image",
        "ratio",
        "max_rel_diff",
        "peer",
    ]
    report = table(rows, columns)
    worst = max(r["ratio"] for r in rows)
    summary = (
        f"threads {torch.get_num_threads()}; worst ratio ours/Captum {worst:.2f} (target ≤ 1.0)\n"
    )
    print(report + summary)
    path = write_json(
        "gradients",
        {
            "quick": args.quick,
            "size": SIZE,
            "rows": rows,
            "worst_ratio": worst,
            "report": report + summary,
        },
        args.out,
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
