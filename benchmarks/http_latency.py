"""What the HTTP/JSON route adds to a 128×128 ``Predict`` over gRPC: the same requests to one
``saliency serve`` subprocess on loopback (demo model), over gRPC and over HTTP, timed
round-robin in one run so load falls on both alike.

A tensor input (one float32 1×3×128×128) goes as protobuf over gRPC and as the proto's JSON
mapping (base64 data) over HTTP; a PNG goes as ``EncodedImages`` over gRPC, and over HTTP as
base64 JSON, as a multipart upload and as a KServe V1 instance. HTTP calls use the standard
library's keep-alive client (the leanest) and httpx (a typical one), gRPC the generated stub.

    python -m benchmarks.http_latency [--quick] [--repeats 300]
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
from google.protobuf import json_format

from benchmarks.common import (
    ServerProcess,
    base_parser,
    demo_repository,
    free_port,
    machine_info,
    percentiles,
    png_images,
    table,
    time_interleaved,
    write_json,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc

SIZE = 128
BOUNDARY = "benchmark-boundary"


def multipart(image: bytes) -> bytes:
    """A form with the model name and one image file, as a browser or curl -F sends it."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndemo\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"cell.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


class StdlibClient:
    """One keep-alive connection; a call posts a prepared body and reads the whole answer."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.connection.connect()
        # http.client sends headers and body in two writes: without this, Nagle's algorithm
        # holds the body until the server's delayed ACK.
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes, content_type: str) -> bytes:
        self.connection.request("POST", path, body, {"content-type": content_type})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:300]!r}")
        return data


def calls(grpc_address: str, http_port: int, httpx_client: httpx.Client
          ) -> dict[str, Callable[[], Any]]:
    stub = pb_grpc.ExplainerStub(grpc.insecure_channel(grpc_address))
    stdlib = StdlibClient(http_port)
    tensor = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    tensor_input = pb.Input(tensor=pb.Tensor(shape=list(tensor.shape), dtype=pb.DTYPE_FLOAT32,
                                             data=tensor.tobytes()))
    image = png_images(1, SIZE, seed=0)[0]
    image_input = pb.Input(images=pb.EncodedImages(images=[image]))
    tensor_request = pb.PredictRequest(model="demo", input=tensor_input)
    image_request = pb.PredictRequest(model="demo", input=image_input)

    def as_json(message: pb.PredictRequest) -> bytes:
        return json.dumps(json_format.MessageToDict(
            message, preserving_proto_field_name=True)).encode()

    tensor_json, image_json = as_json(tensor_request), as_json(image_request)
    form = multipart(image)
    form_type = f"multipart/form-data; boundary={BOUNDARY}"
    kserve = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    json_type = "application/json"

    def httpx_post(path: str, body: bytes) -> None:
        httpx_client.post(path, content=body,
                          headers={"content-type": json_type}).raise_for_status()

    return {
        "tensor gRPC": lambda: stub.Predict(tensor_request, timeout=60),
        "tensor HTTP JSON": lambda: stdlib.post("/api/v1/predict", tensor_json, json_type),
        "tensor HTTP JSON (httpx)": lambda: httpx_post("/api/v1/predict", tensor_json),
        "PNG gRPC": lambda: stub.Predict(image_request, timeout=60),
        "PNG HTTP JSON": lambda: stdlib.post("/api/v1/predict", image_json, json_type),
        "PNG HTTP multipart": lambda: stdlib.post("/api/v1/predict", form, form_type),
        "PNG KServe V1": lambda: stdlib.post("/v1/models/demo:predict", kserve, json_type),
    }


def added(rows: dict[str, dict[str, float]], route: str, base: str) -> dict[str, Any]:
    return {"route": route, "over": base,
            "added_p50_ms": rows[route]["p50_ms"] - rows[base]["p50_ms"],
            "added_p99_ms": rows[route]["p99_ms"] - rows[base]["p99_ms"],
            "ratio_p50": rows[route]["p50_ms"] / rows[base]["p50_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    repeats = 30 if args.quick else args.repeats
    http_port = free_port()
    with ServerProcess(demo_repository(), {"http_port": http_port}) as server, \
            httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client:
        times = time_interleaved(calls(server.address, http_port, client), repeats,
                                 warmup=20, steady_below=0.05)
    stats = {name: percentiles(values) for name, values in times.items()}
    rows = [{"call": name, **values} for name, values in stats.items()]
    extra = [added(stats, route, base) for route, base in (
        ("tensor HTTP JSON", "tensor gRPC"), ("tensor HTTP JSON (httpx)", "tensor gRPC"),
        ("PNG HTTP JSON", "PNG gRPC"), ("PNG HTTP multipart", "PNG gRPC"),
        ("PNG KServe V1", "PNG gRPC"))]
    report = "\n".join([
        f"Predict, demo model, one {SIZE}×{SIZE} input, {repeats} interleaved rounds:",
        table(rows, ["call", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "count"]),
        "",
        "HTTP over gRPC (same input, same server, same run):",
        table(extra, ["route", "over", "added_p50_ms", "added_p99_ms", "ratio_p50"]),
    ])
    print(report)
    path = write_json("http_latency", {"machine": machine_info(), "repeats": repeats,
                                       "rows": rows, "added": extra, "report": report},
                      args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
