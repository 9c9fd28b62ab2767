"""Warm at readiness: first request after ready vs steady state, per method, over gRPC; and
export time and package size, for the architecture matrix of the tests.

Each architecture is exported once (timed; package = model.onnx + manifest.json). Then a
server that warms every offered method before reporting ready and a server that only runs a
prediction first ("cold"), each on the same packages: per method, the first call's latency
and the p50 and p95 of the next ones, one image, with each method's default parameters and
then with the tests' small ones (other sample counts and so other batch shapes than the
warm-up ran). ``--separate`` gives each architecture a server of its own (a pod's case).

    python -m benchmarks.warmup [--quick] [--repeats 9] [--only resnet,vit_encoder] [--separate]
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

import saliency_service.serving.server as server_module
from benchmarks.common import base_parser, machine_info, percentiles, table, write_json
from saliency_service.core.repository import ModelHandle
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config
from saliency_service.serving.engine import Engine
from tests.architecture_matrix import MATRIX, Architecture, build
from tests.test_architecture_matrix import FAST_PARAMS


def export_all(root: Path, architectures: list[Architecture]) -> list[dict[str, Any]]:
    rows = []
    for architecture in architectures:
        channels = architecture.input_shape[0]
        started = time.perf_counter()
        report = export_package(build(architecture), name=architecture.name, version=1,
                                input_shape=architecture.input_shape, mean=[0.5] * channels,
                                std=[0.25] * channels, class_labels=(), repository=root,
                                head=architecture.head)
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in report.path.iterdir() if f.is_file())
        rows.append({"architecture": architecture.name,
                     "input": "×".join(map(str, architecture.input_shape)),
                     "export_s": round(seconds, 2), "package_mb": round(size / 1e6, 2),
                     "scales": len(report.scale_modules),
                     "tokens": "yes" if report.token_grid else "no"})
    return rows


def repository_of(root: Path, group: list[Architecture]) -> Path:
    """``root`` itself for all architectures, else a folder linking just ``group``'s."""
    names = {a.name for a in group}
    if names == {path.name for path in root.iterdir() if not path.name.startswith("_")}:
        return root
    folder = root / ("_" + "+".join(sorted(names)))
    folder.mkdir(exist_ok=True)
    for name in names:
        if not (folder / name).exists():
            (folder / name).symlink_to(root / name, target_is_directory=True)
    return folder


def _predict_only(engine: Engine, handle: ModelHandle, bound: object = None) -> list[str]:
    spec = handle.spec().input
    zeros = np.zeros((1, spec.channels, spec.height, spec.width), np.float32)
    handle.run(zeros)
    return []


@contextmanager
def serving(root: Path, warm: bool) -> Iterator[tuple[pb_grpc.ExplainerStub, float]]:
    original = server_module.warm_up
    if not warm:
        server_module.warm_up = _predict_only
    try:
        started = time.perf_counter()
        running = RunningServer(Config(models=root, host="127.0.0.1", port=0,
                                       metrics_port=-1)).start(timeout=1200)
        ready_seconds = time.perf_counter() - started
    finally:
        server_module.warm_up = original
    try:
        with grpc.insecure_channel(running.address) as channel:
            yield pb_grpc.ExplainerStub(channel), ready_seconds
    finally:
        running.stop()


PARAMS = ("default", "small")


def first_and_steady(stub: pb_grpc.ExplainerStub, architecture: Architecture,
                     repeats: int) -> list[tuple[dict[str, Any], pb.ExplainRequest]]:
    """Every offered method with its defaults, then every one with the small parameters:
    each row is that method's first call with those parameters and its next ``repeats``,
    beside the request it sent."""
    info = stub.GetModel(pb.GetModelRequest(model=architecture.name), timeout=60)
    x = np.random.default_rng(1).normal(size=(1, *architecture.input_shape)).astype(np.float32)
    rows = []
    for params in PARAMS:
        for method in info.methods:
            if params == "small" and method.name not in FAST_PARAMS:
                continue
            request = pb.ExplainRequest(model=architecture.name, method=method.method,
                                        seed=1, input=pb.Input(tensor=array_to_tensor(x)))
            if params == "small":
                getattr(request, method.name).CopyFrom(FAST_PARAMS[method.name])
            seconds = [timed(stub, request) for _ in range(repeats + 1)]
            steady = percentiles(seconds[1:])
            rows.append(({"architecture": architecture.name, "method": method.name,
                          "params": params, "first_ms": round(seconds[0] * 1e3, 1),
                          "steady_p50_ms": round(steady["p50_ms"], 1),
                          "steady_p95_ms": round(steady["p95_ms"], 1),
                          "first_over_steady": round(seconds[0] * 1e3 / steady["p50_ms"], 2)},
                         request))
    return rows


def timed(stub: pb_grpc.ExplainerStub, request: pb.ExplainRequest) -> float:
    started = time.perf_counter()
    stub.Explain(request, timeout=600)
    return time.perf_counter() - started


def again(stub: pb_grpc.ExplainerStub,
          measured: list[tuple[dict[str, Any], pb.ExplainRequest]]) -> None:
    """The control: once every method has been served, each request once more in the same
    order, so each follows other methods' (and models') calls as a first call did, but
    nothing about it is new. A first call costs what switching costs when its ratio is
    what this one's is."""
    for row, request in measured:
        seconds = timed(stub, request)
        row["again_ms"] = round(seconds * 1e3, 1)
        row["again_over_steady"] = round(seconds * 1e3 / row["steady_p50_ms"], 2)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="", help="comma-separated architecture names")
    parser.add_argument("--separate", action="store_true",
                        help="one server per architecture instead of one for all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chosen = [a for a in MATRIX if not args.only or a.name in args.only.split(",")]
    if args.quick:
        chosen = [a for a in chosen if a.name in ("resnet", "mobilenetv3", "vit_encoder")]
    repeats = 3 if args.quick else args.repeats
    payload: dict[str, Any] = {"machine": machine_info(), "repeats": repeats}
    payload["servers"] = "one per architecture" if args.separate else "one for all"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        payload["export"] = export_all(root, chosen)
        print(table(payload["export"]))
        groups = [[a] for a in chosen] if args.separate else [chosen]
        for warm in (True, False):
            label = "warm" if warm else "cold"
            rows, ready = [], []
            for group in groups:
                with serving(repository_of(root, group), warm) as (stub, ready_seconds):
                    measured = [m for a in group for m in first_and_steady(stub, a, repeats)]
                    again(stub, measured)
                rows += [row for row, _ in measured]
                ready.append(round(ready_seconds, 2))
            payload[label] = {"ready_seconds": ready, "calls": rows}
            print(f"\n{label}: ready after {', '.join(f'{r:.1f}' for r in ready)} s "
                  f"({payload['servers']}, {len(chosen)} models)")
            print(table(rows))
    for label in ("warm", "cold"):
        for params in PARAMS:
            for call in ("first", "again"):
                ratios = [r[f"{call}_over_steady"] for r in payload[label]["calls"]
                          if r["params"] == params]
                summary = {"worst": max(ratios), "median": float(np.median(ratios)),
                           "over_2x": sum(r > 2 for r in ratios), "pairs": len(ratios)}
                payload[label][f"{call}_over_steady_{params}"] = summary
                print(f"{label}, {params} parameters, {call} call ÷ steady p50: worst "
                      f"{summary['worst']:.2f}, median {summary['median']:.2f}, over 2x: "
                      f"{summary['over_2x']} of {summary['pairs']}")
    print("results:", write_json("warmup", payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
