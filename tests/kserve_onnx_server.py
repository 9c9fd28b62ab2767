"""Serves one ONNX file with KServe's own ``ModelServer`` (run by KServe's interpreter,
``tests.kserve_env``): V1 ``:predict`` and V2 ``/infer`` over REST, and V2 ``ModelInfer``
over gRPC with ``--grpc-port``; ONNX Runtime inside.

Usage: python kserve_onnx_server.py MODEL.onnx NAME HTTP_PORT [--grpc-port P] [--fail-first N]
[--extensions A,B] (``--fail-first N`` answers the first N inference calls with 503, as a
predictor that is starting does; ``--extensions`` is what ``GET /v2`` lists, as Triton
lists ``binary_tensor_data``). A batch whose first value is ``SLOW_SENTINEL`` is answered after
``SLOW_SECONDS``: a slow model, whatever the machine's speed."""

from __future__ import annotations

import argparse
import asyncio

import kserve
import numpy as np
import onnxruntime as ort
from kserve.errors import ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

SLOW_SENTINEL = 1234.5
SLOW_SECONDS = 20.0


class OnnxModel(kserve.Model):
    """ONNX Runtime behind KServe's data plane; the first output holds the class scores."""

    def __init__(self, name: str, path: str, fail_first: int) -> None:
        super().__init__(name)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0]
        self.fail_first = fail_first
        self.ready = True

    def get_input_types(self) -> list[dict]:
        shape = [d if isinstance(d, int) else -1 for d in self.input.shape]
        return [{"name": self.input.name, "datatype": "FP32", "shape": shape}]

    def get_output_types(self) -> list[dict]:
        shape = [d if isinstance(d, int) else -1 for d in self.output.shape]
        return [{"name": self.output.name, "datatype": "FP32", "shape": shape}]

    async def predict(self, payload, headers=None, response_headers=None):  # noqa: ANN001, ANN201
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ServerNotReady("starting")
        v2 = isinstance(payload, InferRequest)
        batch = (payload.inputs[0].as_numpy() if v2 else np.asarray(payload["instances"]))
        batch = batch.astype(np.float32)
        if batch.reshape(-1)[0] == SLOW_SENTINEL:
            await asyncio.sleep(SLOW_SECONDS)
        if v2:
            (scores,) = self.session.run([self.output.name], {self.input.name: batch})
            output = InferOutput(name=self.output.name, shape=list(scores.shape),
                                 datatype="FP32")
            output.set_data_from_numpy(scores, binary_data=False)
            # KServe writes the outputs as the request asks: JSON, or binary_data.
            return InferResponse(response_id=payload.id or "", model_name=self.name,
                                 infer_outputs=[output],
                                 requested_outputs=payload.request_outputs or None,
                                 use_binary_outputs=payload.use_binary_outputs)
        (scores,) = self.session.run([self.output.name], {self.input.name: batch})
        return {"predictions": scores.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("name")
    parser.add_argument("http_port", type=int)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--extensions", default="")
    args = parser.parse_args()
    if args.extensions:
        listed = DataPlane.metadata

        def metadata(self: DataPlane) -> dict:
            return {**listed(self), "extensions": args.extensions.split(",")}

        DataPlane.metadata = metadata
    model = OnnxModel(args.name, args.model, args.fail_first)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port or 8081,
                       enable_grpc=bool(args.grpc_port), workers=1).start([model])


if __name__ == "__main__":
    main()
