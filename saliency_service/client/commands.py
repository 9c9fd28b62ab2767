"""The client commands of ``saliency``: ``explain``, ``predict``, ``models`` and ``health``.

A detector's or segmenter's image is explained per target (``--box`` and ``--label``,
``--min-score``, ``--region-class``), one overlay file per target; ``predict`` prints its
detections or the pixels per predicted class.

Ordinary mistakes (an unknown method or parameter, a missing image file) and the server's
refusals are one line on stderr, never a traceback, and the exit code tells a script what
happened:

    0  done (health: ready; models: every model ready)
    1  the server answered with an error (or: not ready, some model failed to load)
    2  a usage mistake caught before or instead of a call: unknown method or parameter,
       unreadable file, bad flag (argparse's own code)
    3  the server could not be reached or was too busy: UNAVAILABLE, DEADLINE_EXCEEDED,
       RESOURCE_EXHAUSTED (retrying later may help)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.method_params import (
    ParamError,
    method_enum,
    params_message,
    parse_assignments,
)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
_TRY_LATER = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
RESIZE_CHOICES = ("stretch", "center_crop", "letterbox")
_DEFAULT_METHOD = pb.Method.Name(pb.METHOD_VANILLA_GRADIENT).removeprefix("METHOD_").lower()


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (an ANSI escape hidden in a model's
    label or name, or in a server's message) are shown as escapes, never sent; line breaks
    and tabs stay."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in str(text))


def _say(*values: object, sep: str = " ", end: str = "\n", file: Any = None) -> None:
    """``print`` for text that may carry a server's strings: see ``printable``."""
    print(printable(sep.join(str(v) for v in values)), end=end, file=file)


class CommandError(Exception):
    """A one-line error for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def add_connection_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """How a client command reaches the server."""
    parser.add_argument("--server", default="localhost:50051")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per call")
    parser.add_argument("--load-balancing", choices=("round_robin", "pick_first"),
                        default="round_robin",
                        help="over the addresses the server resolves to, e.g. "
                        "dns:///saliency-headless:50051 (default round_robin)")
    parser.add_argument("--max-attempts", type=int, choices=range(1, 6), default=5,
                        metavar="1-5", help="attempts of a call refused as UNAVAILABLE or "
                        "RESOURCE_EXHAUSTED, with backoff (1 = no retries; default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print the answer as JSON (the proto's JSON mapping with its field "
                        "names, every field present, 64-bit integers as numbers)")


def add_commands(commands: Any) -> None:
    """Adds ``explain``, ``predict``, ``models`` and ``health`` to the ``saliency``
    subcommands."""
    explain = commands.add_parser(
        "explain", help="explain one image; write its overlay, or a panel of several methods",
        description="Explain one image with one or several methods and write the overlay "
        "(several methods: one side-by-side panel). " + _EXIT_CODES)
    add_connection_arguments(explain, timeout=120.0)
    explain.add_argument("--model", default="demo")
    explain.add_argument("--image", required=True, help="a PNG or JPEG file")
    explain.add_argument("--method", default=_DEFAULT_METHOD,
                         help="a method, or several separated by commas (gradcam,fastcam)")
    explain.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="a method parameter (repeatable), e.g. steps=64 baseline=blur; "
                         "`saliency models NAME` lists each method's")
    explain.add_argument("--target", type=int, help="class index (default: predicted)")
    explain.add_argument("--box", metavar="X1,Y1,X2,Y2",
                         help="a detector's detection to explain (with --label), or a "
                         "segmenter's region (with --region-class); pixels of the model "
                         "input, after resizing")
    explain.add_argument("--label", help="the class of --box's detection (a label, as "
                         "`saliency predict` prints it)")
    explain.add_argument("--min-score", type=float,
                         help="a detector: one map per detection scoring at least this")
    explain.add_argument("--region-class", help="a segmenter: explain this class in --box, "
                         "or where the model predicts it")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--resize", choices=RESIZE_CHOICES, default="",
                         help="fit the image to the model's input: stretch, center_crop or "
                         "letterbox (default: the model's, `saliency models NAME`); under "
                         "center_crop and letterbox the map has the image's own size")
    explain.add_argument("--out", default="saliency.png",
                         help="the overlay PNG; a detector's or segmenter's several targets "
                         "get one file each, numbered (saliency-1.png, saliency-2.png, …)")
    explain.set_defaults(run=_guarded(_explain))

    predict = commands.add_parser(
        "predict", help="run the model on one image: top classes, detections or class areas",
        description="Prints a classifier's top classes, a detector's detections (box, label, "
        "score) or a segmenter's pixels per predicted class. " + _EXIT_CODES)
    add_connection_arguments(predict, timeout=60.0)
    predict.add_argument("--model", default="demo")
    predict.add_argument("--image", required=True, help="a PNG or JPEG file")
    predict.add_argument("--top-k", type=int, default=5, help="a classifier's classes shown")
    predict.add_argument("--resize", choices=RESIZE_CHOICES, default="",
                         help="fit the image to the model's input (default: the model's)")
    predict.set_defaults(run=_guarded(_predict))

    models = commands.add_parser(
        "models", help="list the models with readiness and load errors, or one model's methods",
        description="Without NAME: every package, ready or with its load error. With NAME: its "
        "input, classes and methods with their parameter defaults. " + _EXIT_CODES)
    add_connection_arguments(models, timeout=10.0)
    models.add_argument("name", nargs="?", help="a model to describe")
    models.set_defaults(run=_guarded(_models))

    health = commands.add_parser(
        "health", help="is the server live and ready (models loaded)?",
        description="Checks the gRPC health service: live (\"\") and ready "
        "(saliency.v1.Explainer). " + _EXIT_CODES)
    add_connection_arguments(health, timeout=5.0)
    health.set_defaults(run=_guarded(_health))


_EXIT_CODES = ("Exit codes: 0 done, 1 the server refused (or not ready), 2 usage mistake, "
               "3 unreachable or busy (retry later).")


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Runs a command, turning its errors and the server's refusals into one stderr line."""

    def run(args: argparse.Namespace) -> int:
        import grpc  # noqa: PLC0415 - keep `saliency --help` light

        try:
            return command(args)
        except CommandError as exc:
            _say(f"error: {exc}", file=sys.stderr)
            return exc.code
        except ParamError as exc:
            _say(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except grpc.RpcError as exc:
            code = exc.code()
            _say(f"error: {code.name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return EXIT_UNREACHABLE if code.name in _TRY_LATER else EXIT_REFUSED

    return run


def _connect(args: argparse.Namespace) -> Any:
    from saliency_service.client.client import SaliencyClient  # noqa: PLC0415 - grpc only when calling

    return SaliencyClient(args.server, timeout=args.timeout,
                          load_balancing=args.load_balancing, max_attempts=args.max_attempts)


def _read_image(path: str) -> bytes:
    file = Path(path)
    if not file.exists():
        raise CommandError(f"image file {path!r} not found")
    if not file.is_file():
        raise CommandError(f"{path!r} is not a file; give a PNG or JPEG file")
    try:
        return file.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path!r}: {exc.strerror}") from exc


def _method_list(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise CommandError("--method is empty; give a method such as gradcam")
    for name in names:
        method_enum(name)  # an unknown name is a ParamError listing the valid ones
    return names


def _method_params(info: pb.ModelInfo, methods: list[str],
                   assignments: dict[str, str]) -> dict[str, Any]:
    """Each method's params message from ``--param`` values, checked against the defaults
    ``GetModel`` reports: a name no chosen method takes is refused with what they take."""
    offered = {m.name: m for m in info.methods}
    missing = [m for m in methods if m not in offered]
    if missing:
        raise CommandError(f"model {info.status.name!r} does not offer {missing[0]}; it "
                           f"offers: {', '.join(offered)}")
    taken = {name for m in methods for name in offered[m].defaults}
    unknown = [name for name in assignments if name not in taken]
    if unknown:
        takes = "; ".join(
            f"{m} takes " + (", ".join(f"{k} (default {v or '“”'})"
                                       for k, v in sorted(offered[m].defaults.items()))
                             or "none") for m in methods)
        raise CommandError(f"no parameter {unknown[0]!r} for {', '.join(methods)}: {takes}")
    return {m: params_message(m, {k: v for k, v in assignments.items()
                                  if k in offered[m].defaults}) for m in methods}


def _summary(response: pb.ExplainResponse) -> dict[str, Any]:
    """The response in the proto's JSON mapping, without the map's bytes and the PNGs."""
    from saliency_service.protocol.json_messages import to_json  # noqa: PLC0415

    light = pb.ExplainResponse()
    light.CopyFrom(response)
    light.saliency.ClearField("data")
    light.ClearField("overlays")
    light.ClearField("raw")
    summary = to_json(light)
    summary["saliency"].pop("data", None)
    for bulky in ("overlays", "raw"):
        summary.pop(bulky, None)
    return summary


def _box(text: str | None) -> list[float] | None:
    """``--box X1,Y1,X2,Y2``: four finite numbers."""
    if text is None:
        return None
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or not all(np.isfinite(numbers)):
        raise CommandError(f"--box must be X1,Y1,X2,Y2 (four numbers, pixels of the model "
                           f"input), got {text!r}")
    return numbers


def _dense_target(args: argparse.Namespace) -> dict[str, Any]:
    """The explain call's target arguments from ``--box``, ``--label``, ``--min-score`` and
    ``--region-class``, checked for a combination that names one target."""
    box = _box(args.box)
    given = [flag for flag, value in (("--label", args.label), ("--min-score", args.min_score),
                                      ("--region-class", args.region_class)) if value is not None]
    if args.target is not None and (given or box is not None):
        raise CommandError("--target is a classifier's class; a detector's or segmenter's "
                           f"target is {' and '.join(given) or '--box'} alone")
    if len(given) > 1:
        raise CommandError(f"give one target: {' or '.join(given)}")
    if box is not None and not given:
        raise CommandError("--box needs --label (a detection) or --region-class (a region)")
    if args.label is not None and box is None:
        raise CommandError("--label names the class of a detection: give its --box "
                           "X1,Y1,X2,Y2 too (as `saliency predict` prints it)")
    if args.min_score is not None and box is not None:
        raise CommandError("--min-score explains every detection above a score; --box "
                           "with --label names one")
    return {"box": box, "label": args.label, "min_score": args.min_score,
            "region_class": args.region_class}


def _explain(args: argparse.Namespace) -> int:
    from saliency_service.render.overlays import panel_png  # noqa: PLC0415

    methods = _method_list(args.method)
    assignments = parse_assignments(args.param)
    targets = _dense_target(args)
    image = _read_image(args.image)
    with _connect(args) as client:
        params: dict[str, Any] = {m: None for m in methods}
        if assignments:
            params = _method_params(client.get_model(args.model), methods, assignments)
        results = [client.explain(args.model, m, images=[image], seed=args.seed,
                                  target=args.target, return_overlay=True, params=params[m],
                                  resize=args.resize, **targets)
                   for m in methods]
    if results[0].explained:
        return _explained_targets(args, results, panel_png)
    top = results[0].response.predictions[0].top
    if len(results) == 1:
        Path(args.out).write_bytes(results[0].overlays[0])
    else:
        best = f"{top[0].label} {top[0].probability:.3f}" if top else ""
        Path(args.out).write_bytes(panel_png([r.overlays[0] for r in results],
                                             f"{args.model} · {best} · {args.image}"))
    if args.json:
        print(json.dumps({"out": args.out, "explanations": [
            {**_summary(r.response), "map_mean": float(np.mean(r.maps))} for r in results]},
            indent=2))
        return EXIT_OK
    _say("prediction: " + ", ".join(f"{c.label} {c.probability:.3f}" for c in top[:3]))
    for result in results:
        cost = result.cost
        name = pb.Method.Name(cost.method).removeprefix("METHOD_").lower()
        _say(f"explained class: {result.targets[0]}" if len(results) == 1 else
              f"{name}: explained class {result.targets[0]}")
        _say(f"cost: method {name} forward {cost.forward_passes} backward "
              f"{cost.backward_passes} wall {cost.wall_seconds * 1000:.1f} ms cpu "
              f"{cost.cpu_seconds * 1000:.1f} ms")
    maps = results[0].maps
    what = "map" if len(results) == 1 else f"panel of {len(results)}"
    _say(f"{what}: {args.out} ({maps.shape[1]}×{maps.shape[2]}, "
          f"mean {float(np.mean(maps)):.3f})")
    return EXIT_OK


def _explained_targets(args: argparse.Namespace, results: list[Any],
                       panel_png: Callable[[list[bytes], str], bytes]) -> int:
    """A detector's or segmenter's answer: one overlay file per target (a panel of the
    methods when several), and a line per target saying what it explains."""
    explained = results[0].explained
    out = Path(args.out)
    paths = [out] if len(explained) == 1 else [
        out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}")
        for index in range(1, len(explained) + 1)]
    for index, (path, target) in enumerate(zip(paths, explained, strict=True)):
        overlays = [r.overlays[index] for r in results]
        path.write_bytes(overlays[0] if len(results) == 1 else panel_png(
            overlays, f"{args.model} · {_what(target)} · {args.image}"))
    if args.json:
        print(json.dumps({"out": [str(p) for p in paths], "explanations": [
            {**_summary(r.response), "map_mean": float(np.mean(r.maps))} for r in results]},
            indent=2))
        return EXIT_OK
    for path, target in zip(paths, explained, strict=True):
        _say(f"{path}: {_what(target)}")
    for result in results:
        cost = result.cost
        name = pb.Method.Name(cost.method).removeprefix("METHOD_").lower()
        _say(f"cost: method {name} forward {cost.forward_passes} backward "
              f"{cost.backward_passes} wall {cost.wall_seconds * 1000:.1f} ms cpu "
              f"{cost.cpu_seconds * 1000:.1f} ms ({len(explained)} "
              f"map{'s' if len(explained) != 1 else ''})")
    return EXIT_OK


def _what(target: pb.ExplainedTarget) -> str:
    """What one map explains: the class, the box (a detection's, or a region's bounds) and
    the score, with a region's size."""
    box = target.box
    where = f"[{box.x1:.1f}, {box.y1:.1f}, {box.x2:.1f}, {box.y2:.1f}]"
    if target.region_pixels:
        return (f"{target.label} region of {target.region_pixels} pixels in {where}, mean "
                f"probability {target.score:.3f}")
    return f"{target.label} {where} score {target.score:.3f}"


def _predict(args: argparse.Namespace) -> int:
    from saliency_service.client.client import class_counts, detections_of  # noqa: PLC0415
    from saliency_service.protocol.json_messages import to_json  # noqa: PLC0415

    image = _read_image(args.image)
    with _connect(args) as client:
        response = client.predict(args.model, images=[image], top_k=args.top_k,
                                  resize=args.resize)
        labels = (list(client.get_model(args.model).class_labels)
                  if response.HasField("class_map") else [])
    if args.json:
        summary = to_json(response)
        if response.HasField("class_map"):
            summary["class_map"].pop("data", None)
            summary["class_counts"] = class_counts(response, labels)
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    if response.detections:
        (found,) = detections_of(response)
        _say(f"{len(found)} detection{'s' if len(found) != 1 else ''}" + (":" if found else ""))
        for detection in found:
            x1, y1, x2, y2 = detection.box
            _say(f"  {detection.label} [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}] score "
                  f"{detection.score:.3f}")
    elif response.HasField("class_map"):
        (counts,) = class_counts(response, labels)
        total = sum(counts.values())
        _say("pixels per class:")
        for label, pixels in counts.items():
            _say(f"  {label}: {pixels} ({pixels / total:.1%})")
    else:
        _say("prediction: " + ", ".join(f"{c.label} {c.probability:.3f}"
                                         for c in response.predictions[0].top))
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from saliency_service.protocol.json_messages import to_json  # noqa: PLC0415

    with _connect(args) as client:
        if args.name:
            info = client.get_model(args.name)
            if args.json:
                print(json.dumps(to_json(info), indent=2))
            else:
                _print_model(info)
            return EXIT_OK if info.status.ready else EXIT_REFUSED
        listing = client.list_models()
    if args.json:
        print(json.dumps(to_json(listing), indent=2))
    else:
        for status in listing.models:
            state = "ready" if status.ready else f"NOT READY: {status.error}"
            _say(f"{status.name} {status.version}: {state}")
        if not listing.models:
            _say("no models")
    return EXIT_OK if all(s.ready for s in listing.models) else EXIT_REFUSED


def _print_model(info: pb.ModelInfo) -> None:
    status = info.status
    _say(f"{status.name} {status.version}: "
          + ("ready" if status.ready else f"NOT READY: {status.error}"))
    if info.input.shape:
        _say(f"input: {list(info.input.shape)} {info.input.layout}, mean "
              f"{[round(v, 4) for v in info.input.mean]} std "
              f"{[round(v, 4) for v in info.input.std]}, images resized by "
              f"{info.input.resize or 'stretch'}")
    if info.class_labels:
        _say(f"classes: {', '.join(info.class_labels)}")
    for method in info.methods:
        defaults = ", ".join(f"{k}={v}" for k, v in sorted(method.defaults.items()))
        _say(f"  {method.name} ({method.engine}){': ' + defaults if defaults else ''}")


def _health(args: argparse.Namespace) -> int:
    from saliency_service.client.connections import SERVICE_NAME  # noqa: PLC0415

    with _connect(args) as client:
        live = client.health("")
        ready = client.health(SERVICE_NAME)
    if args.json:
        print(json.dumps({"live": live, "ready": ready}))
    else:
        _say(f"live: {live}, ready: {ready}")
    return EXIT_OK if ready == "SERVING" else EXIT_REFUSED
