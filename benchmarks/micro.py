"""Whether each serving-path shortcut moves a figure a client sees by more than the noise.

Every shortcut that adds a branch or a mode is switched on and off between calls to one
in-process server on a loopback port, timed round-robin (``time_interleaved``) with the
shortcut on, off, and on again: the two "on" runs give the noise floor of the comparison.
A shortcut keeps its place only if its effect exceeds that floor.

    python -m benchmarks.micro [--quick]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np

import saliency_service.protocol.predictions as predictions
from benchmarks.common import (
    base_parser,
    demo_repository,
    table,
    time_interleaved,
    write_json,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config


@contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def switched(call: Callable[[], Any], target: Any, name: str, value: Any) -> Callable[[], Any]:
    """``call`` with ``target.name`` set to ``value`` for its duration."""
    def run() -> Any:
        with patched(target, name, value):
            return call()
    return run


def shortcuts(server: RunningServer, stub: pb_grpc.ExplainerStub
              ) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """Each shortcut's user-visible call with it on and with it off."""
    rng = np.random.default_rng(0)
    tensor = array_to_tensor(rng.normal(size=(1, 3, 128, 128)).astype(np.float32))
    predict_tensor = pb.PredictRequest(model="demo", input=pb.Input(tensor=tensor))
    calls = server.server.calls

    def predict() -> Any:
        return stub.Predict(predict_tensor, timeout=30)

    return {
        "inline Predict (1 tensor item)": (
            predict, switched(predict, calls, "_runs_inline", lambda *_: False)),
        "Python top-k ranking (Predict)": (
            predict, switched(predict, predictions, "PYTHON_RANKING_CLASSES", 0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="measure the shortcuts whose name "
                        "contains this text")
    args = parser.parse_args(argv)
    config = Config(models=demo_repository(), host="127.0.0.1", port=0, metrics_port=0)
    running = RunningServer(config).start()
    rows = []
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            for name, (on, off) in shortcuts(running, stub).items():
                if args.only not in name:
                    continue
                times = time_interleaved({"on": on, "on again": on, "off": off},
                                         repeats=30 if args.quick else 200, warmup=5,
                                         min_seconds=2 if args.quick else 20,
                                         max_repeats=2000, steady_below=0.05)
                p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
                noise = abs(p50["on again"] - p50["on"])
                gain = p50["off"] - p50["on"]
                rows.append({"shortcut": name, "on p50 ms": p50["on"],
                             "off p50 ms": p50["off"], "gain ms": gain, "noise ms": noise,
                             "rounds": len(times["on"]),
                             "verdict": "keep" if gain > 2 * noise and gain > 0 else "remove"})
                print(f"{name}: on {p50['on']:.3f} ms, off {p50['off']:.3f} ms, "
                      f"noise {noise:.3f} ms", flush=True)
    finally:
        running.stop()
    text = table(rows)
    print(text)
    write_json("micro", {"rows": rows}, args.out)
    (args.out / "micro.md").write_text(
        "# Serving-path shortcuts, on against off (`python -m benchmarks.micro`)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
