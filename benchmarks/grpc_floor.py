"""The least a Python gRPC service can add to ``Predict``: a bare ``grpc.aio`` server.

It answers ``Predict`` with the logits of one ONNX Runtime call made in a worker thread, as
our server does, and nothing else: no admission, metrics, logging, validation or top-k.
A uint8 N×H×W×C tensor of pixels is normalized first, with the service's own function and
the package manifest's mean and std.
``benchmarks/peers.py`` times it beside our server, so the report separates what gRPC in
Python costs from what our service adds on top.

    python -m benchmarks.grpc_floor --model models/demo/1/model.onnx --port 50070
"""

from __future__ import annotations

import argparse
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from saliency_service.core import devices
from saliency_service.core.repository import InputSpec, Manifest
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.inputs import preprocess_pixels

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class FloorServicer(pb_grpc.ExplainerServicer):
    """``Predict`` = decode the tensor, one session run in a worker thread, encode logits."""

    def __init__(self, session: ort.InferenceSession, spec: InputSpec) -> None:
        self.session = session
        self.spec = spec
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.executor = ThreadPoolExecutor(max_workers=2)

    def _run(self, request: pb.PredictRequest) -> pb.PredictResponse:
        tensor = request.input.tensor
        if tensor.dtype == pb.DTYPE_UINT8:
            pixels = np.frombuffer(tensor.data, np.uint8).reshape(list(tensor.shape))
            inputs = preprocess_pixels(pixels, self.spec)
        else:
            inputs = np.frombuffer(tensor.data, np.float32).reshape(list(tensor.shape))
        (logits,) = self.session.run([self.output_name], {self.input_name: inputs})
        return pb.PredictResponse(logits=pb.Tensor(
            shape=list(logits.shape), dtype=pb.DTYPE_FLOAT32,
            data=logits.astype(np.float32).tobytes()))

    async def Predict(  # noqa: N802 - gRPC method name
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, request)


async def serve(model: str, port: int, threads: int) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=devices.session_providers())
    spec = Manifest.from_json(json.loads((Path(model).parent / "manifest.json").read_text())).input
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_ExplainerServicer_to_server(FloorServicer(session, spec), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="an ONNX file, with its package's manifest.json beside it")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model, args.port, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
