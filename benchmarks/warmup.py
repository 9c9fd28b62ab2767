"""Warm at readiness: first request after ready vs steady state, per method, over gRPC; and
export time and package size, for the architecture matrix of the tests.

Each architecture is exported once (timed; package = model.onnx + model.pt2). Then, in one
run, a server that warms every offered method before reporting ready and a server that only
runs a prediction first ("cold"), each on the same packages: per method, the first call's
latency and the p50 of the next ones (one image, the tests' small parameters).

    python -m benchmarks.warmup [--quick] [--repeats 5] [--only resnet,vit_encoder]
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

import service.server as server_module
from benchmarks.common import base_parser, machine_info, percentiles, table, write_json
from kernel.repository import ModelHandle
from saliency.v1 import explainer_pb2 as pb
from saliency.v1 import explainer_pb2_grpc as pb_grpc
from service.background import RunningServer
from service.config import Config
from service.engine import Engine
from service.export import export_package
from service.images import array_to_tensor
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
        size = sum((report.path / f).stat().st_size for f in ("model.onnx", "model.pt2"))
        rows.append({"architecture": architecture.name,
                     "input": "×".join(map(str, architecture.input_shape)),
                     "export_s": round(seconds, 2), "package_mb": round(size / 1e6, 2),
                     "scales": len(report.scale_modules),
                     "tokens": "yes" if report.token_grid else "no"})
    return rows


def _predict_only(engine: Engine, handle: ModelHandle) -> list[str]:
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


def first_and_steady(stub: pb_grpc.ExplainerStub, architecture: Architecture,
                     repeats: int) -> list[dict[str, Any]]:
    info = stub.GetModel(pb.GetModelRequest(model=architecture.name), timeout=60)
    x = np.random.default_rng(1).normal(size=(1, *architecture.input_shape)).astype(np.float32)
    rows = []
    for method in info.methods:
        request = pb.ExplainRequest(model=architecture.name, method=method.method, seed=1,
                                    input=pb.Input(tensor=array_to_tensor(x)))
        if method.name in FAST_PARAMS:
            getattr(request, method.name).CopyFrom(FAST_PARAMS[method.name])
        seconds = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            stub.Explain(request, timeout=600)
            seconds.append(time.perf_counter() - started)
        steady = percentiles(seconds[1:])["p50_ms"]
        rows.append({"architecture": architecture.name, "method": method.name,
                     "first_ms": round(seconds[0] * 1e3, 1),
                     "steady_p50_ms": round(steady, 1),
                     "first_over_steady": round(seconds[0] * 1e3 / steady, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated architecture names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chosen = [a for a in MATRIX if not args.only or a.name in args.only.split(",")]
    if args.quick:
        chosen = [a for a in chosen if a.name in ("resnet", "mobilenetv3", "vit_encoder")]
    repeats = 3 if args.quick else args.repeats
    payload: dict[str, Any] = {"machine": machine_info(), "repeats": repeats}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        payload["export"] = export_all(root, chosen)
        print(table(payload["export"]))
        for warm in (True, False):
            label = "warm" if warm else "cold"
            with serving(root, warm) as (stub, ready_seconds):
                rows = [row for a in chosen for row in first_and_steady(stub, a, repeats)]
            payload[label] = {"ready_seconds": round(ready_seconds, 2), "calls": rows}
            print(f"\n{label} server: ready after {ready_seconds:.1f} s "
                  f"({len(chosen)} models)")
            print(table(rows))
    for label in ("warm", "cold"):
        ratios = [r["first_over_steady"] for r in payload[label]["calls"]]
        payload[label]["worst_first_over_steady"] = max(ratios)
        print(f"{label}: worst first/steady {max(ratios):.2f}, median "
              f"{float(np.median(ratios)):.2f}")
    print("results:", write_json("warmup", payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
