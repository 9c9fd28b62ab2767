"""p50/p95 latency over gRPC of Predict and of every method the demo model offers, one 128×128
image per request, against a `saliency serve` subprocess on loopback; and what gRPC adds to
`Predict` over one in-process ONNX Runtime call (same tensor, one thread each).

    python -m benchmarks.latency [--quick] [--repeats 20]
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import (
    ServerProcess,
    base_parser,
    demo_repository,
    machine_info,
    percentiles,
    png_images,
    table,
    time_calls,
    write_json,
)
from benchmarks.peers import predict_overhead, predict_overhead_text
from saliency_service.client.client import SaliencyClient

# Long methods get fewer repeats so the suite stays bounded.
SLOW = {"decam": 3, "rise": 5, "occlusion": 5, "integrated_gradients": 8, "smoothgrad": 8,
        "vargrad": 8, "guided_absolutegrad": 8}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    image = png_images(1, 128, seed=0)
    rows: list[dict[str, Any]] = []
    with ServerProcess(demo_repository()) as server, SaliencyClient(server.address,
                                                                    timeout=600) as client:
        info = client.get_model("demo")
        predict = percentiles(time_calls(lambda: client.predict("demo", images=image), repeats))
        rows.append({"call": "Predict", "forward": 1, "backward": 0, **predict})
        for method in info.methods:
            count = max(2, min(repeats, SLOW.get(method.name, repeats)))
            last: dict[str, Any] = {}

            def call(name: str = method.name, holder: dict[str, Any] = last) -> None:
                holder["cost"] = client.explain("demo", name, images=image, seed=0).cost

            stats = percentiles(time_calls(call, count))
            cost = last["cost"]
            rows.append({"call": f"Explain {method.name}", "forward": cost.forward_passes,
                         "backward": cost.backward_passes, **stats})
    with ServerProcess(demo_repository(), {"intra_op_threads": 1}) as server:
        overhead = predict_overhead(demo_repository() / "demo" / "1", server.address,
                                    30 if args.quick else 150, threads=1)
    print(table(rows, ["call", "forward", "backward", "p50_ms", "p95_ms", "count"]))
    print(predict_overhead_text(overhead))
    path = write_json("latency", {"machine": machine_info(), "image": "1×128×128 PNG",
                                  "rows": rows, "predict_overhead": overhead}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
