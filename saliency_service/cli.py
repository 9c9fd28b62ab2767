"""``saliency serve | export | import | explain | models | health | demo-model | …`` — the
command line (the client commands are in ``saliency_service.client.commands``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import sys
from pathlib import Path
from typing import Any

from saliency_service.client import commands as cli_client
from saliency_service.serving import config as config_module


class UsageError(ValueError):
    """A flag's value that cannot be used; the message names the flag."""


def read_labels(value: str | None) -> tuple[list[str], str]:
    """``--labels``: a file with one label per line (stripped, blank lines skipped; a label
    may hold spaces), or a comma-separated list; and where they were read from."""
    if not value:
        return [], ""
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--labels: cannot read {path}: {exc}") from exc
        return [line.strip() for line in lines if line.strip()], str(path)
    if "," not in value and (path.suffix or "/" in value):
        raise UsageError(f"--labels: no such file {value!r} (or give the labels "
                         "comma-separated)")
    return [label.strip() for label in value.split(",")], "--labels"


def parse_numbers(value: str | None, flag: str, count: int | None = None) -> list[float] | None:
    """Comma-separated finite numbers (``count`` of them when given), or None when unset."""
    if not value:
        return None
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise UsageError(f"{flag} must be finite numbers, got {value!r}")
    if count is not None and len(numbers) != count:
        raise UsageError(f"{flag} needs {count} numbers, got {value!r}")
    return numbers


def parse_shape(value: str) -> tuple[int, int, int]:
    """``--input-shape C,H,W``: three positive integers."""
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be C,H,W integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape must be three positive integers C,H,W, got {value!r}")
    return shape  # type: ignore[return-value]


def _usage_error(exc: Exception) -> int:
    """One line on stderr, exit status 2 (as argparse does)."""
    print(f"error: {cli_client.printable(exc)}", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from saliency_service.serving.logging_setup import configure  # noqa: PLC0415
    from saliency_service.serving.server import serve  # noqa: PLC0415 - keep `saliency explain` light

    config = config_module.from_sources(args)
    configure(config.log_level, config.log_format)
    from saliency_service.core import devices  # noqa: PLC0415

    try:
        devices.configure(config.device, config.onnx_providers, config.precision,
                          config.forward_engine)
    except devices.PlacementRefused as exc:
        return _usage_error(exc)
    if args.ensure_demo:
        from saliency_service.packaging.shipped import ensure_demo_package  # noqa: PLC0415

        ensure_demo_package(config.models)
    from saliency_service.serving.server import PortUnavailable  # noqa: PLC0415

    try:
        asyncio.run(serve(config))
    except PortUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _load_factory(spec: str) -> object:
    """``package.module:callable`` → the object it returns (or names)."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"--module must look like package.module:factory, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    factory = getattr(importlib.import_module(module_name), attribute)
    return factory() if callable(factory) else factory


def _load_weights(model: Any, path: Path) -> None:
    """Loads weights from ``.npz`` (plain arrays) or a torch file read with ``weights_only``
    (tensors, never arbitrary pickled objects) into ``model``; a file that is neither, or
    weights that do not fit the module, is a UsageError naming the file."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                state = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - whatever the user's file does wrong is a usage error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--state-dict {path}: {first[:300]}") from None


def _export(args: argparse.Namespace) -> int:
    from saliency_service.packaging.export import ExportError, export_package  # noqa: PLC0415

    try:
        shape = parse_shape(args.input_shape)
        labels, source = read_labels(args.labels)
        mean = parse_numbers(args.mean, "--mean")
        std = parse_numbers(args.std, "--std")
    except UsageError as exc:
        return _usage_error(exc)
    model = _load_factory(args.module)
    if args.state_dict:
        try:
            _load_weights(model, Path(args.state_dict))
        except UsageError as exc:
            return _usage_error(exc)
    try:
        report = export_package(
            model, name=args.name, version=args.version, input_shape=shape,
            mean=mean, std=std, class_labels=labels,  # type: ignore[arg-type]
            repository=Path(args.models), cam_layer=args.cam_layer, head=args.head,
            overwrite=args.force, kind=args.kind,
            detection={"stride": args.stride, "anchor": args.anchor,
                       "score_threshold": args.score_threshold, "nms_iou": args.nms_iou,
                       "max_detections": args.max_detections},
        )
    except ExportError as exc:
        read = f" ({len(labels)} labels read from {source})" if "class labels" in str(exc) \
            else ""
        print(f"error: {cli_client.printable(exc)}{read}", file=sys.stderr)
        return 2
    print(f"wrote {report.path}")
    grid = report.outputs.get("detection") or {}
    print(f"kind: {report.kind}; outputs: "
          + ", ".join(f"{k} {v}" for k, v in report.outputs.items()
                      if k not in ("kind", "detection"))
          + "".join(f", {k} {v:g}" for k, v in grid.items()))
    print(cli_client.printable(f"classes: {', '.join(report.labels)}"))
    print(cli_client.printable(f"scale outputs: {', '.join(report.scale_modules) or 'none'}"))
    print(f"ONNX Runtime vs PyTorch max abs diff: {report.max_abs_diff:.3g}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from saliency_service.packaging.onnx_import import (  # noqa: PLC0415
        GridHead,
        ImportRefused,
        import_onnx,
    )

    try:
        labels, source = read_labels(args.labels)
        shape = parse_shape(args.input_shape) if args.input_shape else None
        mean = parse_numbers(args.mean, "--mean")
        std = parse_numbers(args.std, "--std")
        value_range = parse_numbers(args.value_range, "--value-range", count=2) or [0.0, 1.0]
        if not math.isfinite(args.timeout) or args.timeout < 0:
            raise UsageError(f"--timeout must be >= 0 seconds, got {args.timeout}")
        report = import_onnx(
            Path(args.model), name=args.name, version=args.version, repository=Path(args.models),
            class_labels=labels, labels_source=source, mean=mean, std=std,
            value_range=(value_range[0], value_range[1]), input_shape=shape,
            layout=args.layout, output=args.output, output_name=args.output_name,
            kind=args.kind, grid=GridHead(args.stride, args.anchor, args.score_threshold,
                                          args.nms_iou, args.max_detections),
            cam_layer=args.cam_layer, overwrite=args.force, timeout=args.timeout)
    except (UsageError, ImportRefused) as exc:
        return _usage_error(exc)
    print(cli_client.printable("\n".join(report.lines())))
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    from saliency_service.evaluation.fashion_mnist import DatasetMissing  # noqa: PLC0415
    from saliency_service.packaging.shipped import ensure_demo_package, ensure_fashion_package  # noqa: PLC0415

    if args.fashion:
        try:
            path = ensure_fashion_package(Path(args.models), force=args.force)
        except DatasetMissing as exc:
            raise SystemExit(f"error: {exc}") from exc
        print(f"Fashion-MNIST model package: {path}")
        return 0
    path = ensure_demo_package(Path(args.models), force=args.force)
    print(f"demo model package: {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.dataset == "groundtruth":
        from saliency_service.evaluation.groundtruth import write_run  # noqa: PLC0415 - torch

        written = write_run(Path(args.out), full=args.full, models=Path(args.models),
                            cache=Path(args.cache) if args.cache else None,
                            images=args.images,
                            progress=not args.no_progress)
        print(f"wrote {written}")
        return 0
    from saliency_service.evaluation.report import Options, run  # noqa: PLC0415 - matplotlib, onnxruntime

    summary = run(Options(
        server=args.server, model=args.model, models=Path(args.models),
        images=200 if args.images is None else args.images,
        size=args.size, config=args.config, methods=args.methods, out=Path(args.out),
        batch=args.batch, seed=args.seed, timeout=args.timeout, target=args.target,
        progress=not args.no_progress, fill=not args.report_only, deadline=args.deadline,
        dataset=args.dataset, road_images=args.road_images, sanity_images=args.sanity_images,
        sanity_methods=args.sanity_methods))
    print(f"wrote {summary} (rows in {summary.parent / 'results.csv'})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """``saliency bench load --quick`` → ``python -m benchmarks.load --quick``."""
    suite = "run_all" if args.suite == "all" else args.suite
    try:
        module = importlib.import_module(f"benchmarks.{suite}")
    except ModuleNotFoundError as exc:
        raise SystemExit(f"no benchmark suite {args.suite!r} ({exc}); run from the "
                         "repository root, where benchmarks/ is") from exc
    return int(module.main(args.suite_args))


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """How the server decodes a raw grid head (``--kind detection_raw``)."""
    parser.add_argument("--stride", type=float,
                        help="detection_raw: pixels per grid cell (default: input size / grid)")
    parser.add_argument("--anchor", type=float,
                        help="detection_raw: the anchor box side in pixels (required)")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="detection_raw: detections kept from this score (default 0.3)")
    parser.add_argument("--nms-iou", type=float, default=0.45,
                        help="detection_raw: NMS overlap threshold (default 0.45)")
    parser.add_argument("--max-detections", type=int, default=100,
                        help="detection_raw: most detections per image (default 100)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saliency", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    config_module.add_arguments(serve)
    serve.add_argument("--ensure-demo", action="store_true",
                       help="build the demo model package first if it is missing")
    serve.set_defaults(run=_serve)

    export = commands.add_parser("export", help="package a PyTorch module as ONNX")
    export.add_argument("--module", required=True, help="package.module:factory returning a Module")
    export.add_argument("--state-dict",
                        help="weights to load: .npz arrays or a torch file of tensors only")
    export.add_argument("--name", required=True)
    export.add_argument("--version", type=int, default=1)
    export.add_argument("--input-shape", required=True, help="C,H,W e.g. 3,224,224")
    export.add_argument("--mean", default="0.485,0.456,0.406")
    export.add_argument("--std", default="0.229,0.224,0.225")
    export.add_argument("--labels", help="file with one label per line (blank lines skipped), "
                        "or comma-separated")
    export.add_argument("--cam-layer", help="module for Grad-CAM (default: last scale)")
    export.add_argument("--head", help="final nn.Linear after global average pooling, if any")
    export.add_argument("--kind", default="classification",
                        choices=("classification", "detection_raw", "detection", "segmentation"),
                        help="what forward returns: logits (default), a grid head, post-NMS "
                        "boxes, scores and classes, or N×K×H×W class scores")
    add_grid_arguments(export)
    export.add_argument("--models", default="models", help="model repository root")
    export.add_argument("--force", action="store_true", help="replace an existing version")
    export.set_defaults(run=_export)

    imported = commands.add_parser(
        "import", help="package any ONNX image classifier, detector or segmenter (inspected "
        "and checked by running it)")
    imported.add_argument("model", help="the .onnx file")
    imported.add_argument("--name", required=True)
    imported.add_argument("--version", type=int, default=1)
    imported.add_argument("--labels", help="file with one label per line (blank lines "
                          "skipped), or comma-separated")
    imported.add_argument("--mean", help="per channel (or one value), default 0")
    imported.add_argument("--std", help="per channel (or one value), default 1")
    imported.add_argument("--value-range", help="pixel range before mean/std, default 0,1")
    imported.add_argument("--input-shape", help="C,H,W where the graph leaves them free")
    imported.add_argument("--layout", default="auto", choices=("auto", "NCHW", "NHWC"))
    imported.add_argument("--output", default="auto",
                          choices=("auto", "logits", "probabilities", "sigmoid"),
                          help="what the class scores are (default: read from the graph)")
    imported.add_argument("--output-name", help="the class-score output, when several fit")
    imported.add_argument("--cam-layer", default="",
                          help="Grad-CAM's default layer: an N×C×H×W tensor, the node making "
                          "it, or a module path (default: the last scale)")
    imported.add_argument("--kind", default="auto",
                          choices=("auto", "classification", "detection_raw", "detection",
                                   "segmentation"),
                          help="what the outputs are (default: read from their shapes)")
    add_grid_arguments(imported)
    imported.add_argument("--models", default="models", help="model repository root")
    imported.add_argument("--force", action="store_true", help="replace an existing version")
    imported.add_argument("--timeout", type=float, default=120.0,
                          help="seconds the model's test runs may take in all (0 = no bound)")
    imported.set_defaults(run=_import)

    cli_client.add_commands(commands)  # explain, predict, models, health

    demo = commands.add_parser("demo-model", help="train and export the demo model package")
    demo.add_argument("--models", default="models")
    demo.add_argument("--force", action="store_true")
    demo.add_argument("--fashion", action="store_true",
                      help="the Fashion-MNIST model (models/fashion/1) instead of the demo")
    demo.set_defaults(run=_demo_model)

    evaluate = commands.add_parser(
        "evaluate", help="score every method on synthetic cells or Fashion-MNIST: ground "
        "truth, faithfulness, sanity checks, cost")
    evaluate.add_argument("--server", default="localhost:50051")
    evaluate.add_argument("--model", default="demo")
    evaluate.add_argument("--models", default="models",
                          help="the repository the server loads (metrics run its model.onnx)")
    evaluate.add_argument("--images", type=int, default=None,
                          help="images (default 200; groundtruth: per model, the plan's)")
    evaluate.add_argument("--size", type=int, help="image side (default: the configuration's)")
    evaluate.add_argument("--config", choices=("test", "held_out"), default="test")
    evaluate.add_argument("--methods", default="all",
                          help="all, or names; parameters as guided_absolutegrad:quantile=0; "
                          "-name drops a method")
    evaluate.add_argument("--out", default="report")
    evaluate.add_argument("--batch", type=int, default=8, help="images per request")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--timeout", type=float, default=600.0)
    evaluate.add_argument("--target", choices=("label", "predicted"), default="label",
                          help="explain the true class (default) or the predicted one")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument("--deadline", type=float, default=0.0,
                          help="stop computing after this many seconds and report what is done "
                          "(a re-run continues)")
    evaluate.add_argument("--report-only", action="store_true",
                          help="write the summary from cached results without computing more")
    evaluate.add_argument("--dataset", choices=("cells", "fashion-mnist", "groundtruth"),
                          default="cells",
                          help="synthetic cells with ground truth, Fashion-MNIST test "
                          "photographs (faithfulness only; Debian's dataset-fashion-mnist), or "
                          "the ground-truth benchmark over many small models trained here "
                          "(in this process, no server; --images per model, --full, --cache)")
    evaluate.add_argument("--full", action="store_true",
                          help="groundtruth: every task and architecture, the demo and "
                          "Fashion-MNIST (default: 2 tasks × 2 architectures)")
    evaluate.add_argument("--cache", default="",
                          help="groundtruth: where trained models are kept (default "
                          "~/.cache/saliency-service/groundtruth)")
    evaluate.add_argument("--road-images", type=int, default=50,
                          help="score ROAD on the first N images (a sparse solve per share)")
    evaluate.add_argument("--sanity-images", type=int, default=16,
                          help="run the randomization and random-logit sanity checks on the "
                          "first N images (0 = off)")
    evaluate.add_argument("--sanity-methods", default="",
                          help="methods for the sanity checks (default: as --methods)")
    evaluate.set_defaults(run=_evaluate)

    bench = commands.add_parser(
        "bench", help="run a benchmark suite: load, peers, scaling, … or all (make bench)")
    bench.add_argument("suite", help="a benchmarks/<suite>.py name, or all")
    bench.add_argument("suite_args", nargs=argparse.REMAINDER,
                       help="passed on, e.g. --quick or --server HOST:PORT")
    bench.set_defaults(run=_bench)
    return parser


# Modules each extra brings, to name the extra when one is missing.
_EXTRAS = {"torch": "torch", "onnxscript": "torch", "PIL": "draw"}
_SERVER_MODULES = ("onnx", "onnxruntime", "scipy", "cv2", "starlette", "uvicorn", "httptools",
                   "multipart", "prometheus_client", "grpc_reflection", "matplotlib", "tqdm")


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that brings the module ``exc`` names, or None when it is not one of ours."""
    top = (exc.name or "").split(".")[0]
    if top in _EXTRAS:
        return _EXTRAS[top]
    return "server" if top in _SERVER_MODULES else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        print(f"saliency {args.command} needs {exc.name}, which this install lacks: "
              f"pip install 'saliency-service[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
