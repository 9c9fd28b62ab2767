"""float64 tensors whose values do not fit in float32, the precision the model runs in."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import TINY_SHAPE


def float64_input(peak: float) -> pb.Input:
    inputs = np.random.default_rng(0).normal(size=(2, *TINY_SHAPE))
    inputs[1, 0, 3, 4] = peak
    return pb.Input(tensor=array_to_tensor(inputs.astype(np.float64)))


@pytest.mark.parametrize("rpc", ["Explain", "Predict"])
def test_values_beyond_float32_range_are_invalid_argument(stub, rpc: str) -> None:
    """1e300 would become inf in the model's float32 input: NaN logits, an empty map, OK."""
    source = float64_input(-1e300)
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "Explain":
            stub.Explain(pb.ExplainRequest(model="tiny", method=pb.METHOD_VANILLA_GRADIENT,
                                           input=source), timeout=60)
        else:
            stub.Predict(pb.PredictRequest(model="tiny", input=source), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input values beyond float32 range" in caught.value.details()


def test_float64_values_within_float32_range_are_served(stub) -> None:
    reply = stub.Predict(pb.PredictRequest(model="tiny", input=float64_input(1e30)),
                         timeout=60)
    assert len(reply.predictions) == 2
