"""How each method family's latency grows with image size and with samples/steps.

One image, batch 1, through ``protocol.codec.Core`` in-process (the compute, without the
transport), median of a few runs after a warm-up. Families: fast path (SMOE Scale, one ONNX
Runtime forward), one-pass gradients (vanilla gradient, Grad-CAM), many-pass gradients
(SmoothGrad, Integrated Gradients) and forward-only search (DE-CAM). Prints tables and writes
``results/scaling.json`` and ``results/scaling.png``.

    python -m benchmarks.scaling [--quick]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import (
    base_parser,
    in_process_core,
    png_images,
    sized_repository,
    table,
    write_json,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import method_enum

SIZES = (64, 128, 224, 320)
COUNTS = (4, 8, 16, 32)


def _methods(counts: int | None = None) -> dict[str, tuple[int, Any]]:
    """Method label → (enum, params message) at the default sweep setting."""
    samples = counts or 8
    return {
        "smoe_scale": (pb.METHOD_SMOE_SCALE, None),
        "vanilla_gradient": (pb.METHOD_VANILLA_GRADIENT, None),
        "gradcam": (pb.METHOD_GRADCAM, None),
        f"smoothgrad-{samples}": (pb.METHOD_SMOOTHGRAD, pb.SmoothGradParams(samples=samples)),
        f"integrated_gradients-{samples}": (
            pb.METHOD_INTEGRATED_GRADIENTS,
            pb.IntegratedGradientsParams(steps=samples),
        ),
        "decam-8x4": (pb.METHOD_DECAM, pb.DecamParams(population=8, generations=4, patience=0)),
    }


class InProcess:
    """A Core over one repository, timing Explain calls."""

    def __init__(self, root: Path, model: str) -> None:
        self.model = model
        self.core = in_process_core(root)
        handle = self.core.repository.get(model)
        self.offered = {method_enum(h.name) for h in self.core.methods_for(handle)}
        self.size = handle.spec().input.height

    def time(self, method: int, params: Any, image: bytes, repeats: int) -> float | None:
        """Median milliseconds, or None when the model does not offer the method."""
        import time  # noqa: PLC0415

        from saliency_service.core.request import CostCounter, RequestState  # noqa: PLC0415

        if method not in self.offered:
            return None
        request = pb.ExplainRequest(
            model=self.model,
            method=method,
            seed=1,
            input=pb.Input(images=pb.EncodedImages(images=[image])),
        )
        if params is not None:
            getattr(request, pb.Method.Name(method).removeprefix("METHOD_").lower()).CopyFrom(
                params
            )
        times = []
        warmup = 1  # the first torch call prepares the program and its kernels
        for attempt in range(repeats + warmup):
            started = time.perf_counter()
            self.core.explain(request, RequestState(None), CostCounter())
            if attempt >= warmup:
                times.append((time.perf_counter() - started) * 1000.0)
        return statistics.median(times)


def size_sweep(architecture: str, sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        runner = InProcess(sized_repository(architecture, size), architecture)
        image = png_images(1, size, seed=2)[0]
        row: dict[str, Any] = {"model": architecture, "size": size}
        for label, (method, params) in _methods().items():
            row[label] = runner.time(method, params, image, repeats)
        rows.append(row)
        print(row, flush=True)  # progress, and a record should a time limit cut the run
    return rows


def count_sweep(
    architecture: str, size: int, counts: tuple[int, ...], repeats: int, search: bool = True
) -> list[dict[str, Any]]:
    runner = InProcess(sized_repository(architecture, size), architecture)
    image = png_images(1, size, seed=2)[0]
    rows = []
    for count in counts:
        row: dict[str, Any] = {"model": architecture, "size": size, "samples/steps": count}
        for label, method, params in (
            ("smoothgrad", pb.METHOD_SMOOTHGRAD, pb.SmoothGradParams(samples=count)),
            (
                "integrated_gradients",
                pb.METHOD_INTEGRATED_GRADIENTS,
                pb.IntegratedGradientsParams(steps=count),
            ),
            (
                "decam generations",
                pb.METHOD_DECAM,
                pb.DecamParams(population=8, generations=count, patience=0),
            ),
        ):
            if search or method != pb.METHOD_DECAM:
                row[label] = runner.time(method, params, image, repeats)
        rows.append(row)
        print(row, flush=True)
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (by_size, by_count) = plt.subplots(1, 2, figsize=(12, 4.5))
    for architecture in sorted({r["model"] for r in results["by_size"]}):
        rows = [r for r in results["by_size"] if r["model"] == architecture]
        for label in _methods():
            points = [(r["size"], r[label]) for r in rows if r.get(label) is not None]
            if points:
                by_size.plot(
                    *zip(*points, strict=True), marker="o", label=f"{architecture} {label}"
                )
    by_size.set(
        xlabel="image side (pixels)",
        ylabel="median latency (ms)",
        yscale="log",
        title="latency vs image size (batch 1)",
    )
    by_size.legend(fontsize=6)
    for architecture in sorted({r["model"] for r in results["by_count"]}):
        rows = [r for r in results["by_count"] if r["model"] == architecture]
        for label in ("smoothgrad", "integrated_gradients", "decam generations"):
            points = [(r["samples/steps"], r[label]) for r in rows if r.get(label) is not None]
            if points:
                by_count.plot(
                    *zip(*points, strict=True),
                    marker="o",
                    label=f"{architecture} {rows[0]['size']}² {label}",
                )
    by_count.set(
        xlabel="samples / steps / generations",
        ylabel="median latency (ms)",
        xscale="log",
        yscale="log",
        title="latency vs samples/steps",
    )
    counts = sorted({r["samples/steps"] for r in results["by_count"]})
    by_count.set_xticks(counts, [str(c) for c in counts])
    by_count.minorticks_off()
    by_count.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 2
    by_size = size_sweep("demo", (64, 128) if args.quick else SIZES, repeats)
    by_count = count_sweep("demo", 128, (4, 8) if args.quick else COUNTS, repeats)
    errors = {}
    if not args.quick:
        try:
            by_size += size_sweep("resnet50", (64, 128, 224), 1)
            by_count += count_sweep("resnet50", 224, (4, 16), 1, search=False)
        except Exception as exc:  # noqa: BLE001 - reported in the results, the rest stands
            errors["resnet50"] = f"{type(exc).__name__}: {exc}"
    results = {
        "by_size": by_size,
        "by_count": by_count,
        "quick": args.quick,
        "unit": "median milliseconds, batch 1, in-process Core",
        "errors": errors,
    }
    text = (
        "Latency vs image size (ms, median)\n"
        + table(by_size)
        + "\nLatency vs samples/steps (ms, median)\n"
        + table(by_count)
        + "".join(f"{model}: FAILED: {error}\n" for model, error in errors.items())
    )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "scaling.png")
    print(
        f"wrote {write_json('scaling', {**results, 'report': text}, out)} and {out / 'scaling.png'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
