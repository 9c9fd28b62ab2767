"""A client's mistake costs bounded memory and time: repeated fields are refused by their
length before their values are read, and a stream's unread progress does not pile up."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import MAX_ITEMS
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.calls import check_limits
from saliency_service.protocol.codec import target_of
from saliency_service.protocol.images import MAX_TENSOR_DIMS, array_to_tensor
from saliency_service.serving.config import Config
from tests.conftest import TINY_SHAPE

HUGE = 1_000_000  # values in a refused repeated field: 4 to 8 MB on the wire


def tiny_explain(method: int, batch: int = 2) -> pb.ExplainRequest:
    inputs = np.random.default_rng(0).normal(size=(batch, *TINY_SHAPE)).astype(np.float32)
    return pb.ExplainRequest(model="tiny", method=method,
                             input=pb.Input(tensor=array_to_tensor(inputs)))


def huge_weights() -> pb.ExplainRequest:
    request = tiny_explain(pb.METHOD_FASTCAM)
    request.fastcam.weights.extend(np.ones(HUGE, np.float32))
    return request


def huge_per_item() -> pb.ExplainRequest:
    request = tiny_explain(pb.METHOD_SMOE_SCALE)
    request.target.per_item.indices.extend(np.zeros(HUGE, np.int32))
    return request


def huge_shape() -> pb.ExplainRequest:
    request = tiny_explain(pb.METHOD_SMOE_SCALE)
    request.input.tensor.shape.extend(np.ones(HUGE, np.int64))
    return request


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


def test_weights_beyond_any_scale_count_are_refused_naming_field_length_and_bound(stub) -> None:
    details = refused(lambda: stub.Explain(huge_weights(), timeout=60))
    assert f"fastcam.weights has {HUGE} values; at most {MAX_ITEMS}" in details


def test_per_item_targets_beyond_the_batch_are_refused(stub) -> None:
    details = refused(lambda: stub.Explain(huge_per_item(), timeout=60))
    assert f"target.per_item.indices has {HUGE} values; at most 2" in details
    assert "batch of 2" in details


@pytest.mark.parametrize("rpc", ["Explain", "Predict"])
def test_a_tensor_shape_of_a_million_dimensions_is_refused(stub, rpc: str) -> None:
    explain = huge_shape()
    if rpc == "Explain":
        details = refused(lambda: stub.Explain(explain, timeout=60))
    else:
        predict = pb.PredictRequest(model="tiny", input=explain.input)
        details = refused(lambda: stub.Predict(predict, timeout=60))
    assert f"input.tensor.shape has {HUGE + 4} values; at most {MAX_TENSOR_DIMS}" in details


def test_weights_within_the_bound_still_reach_the_model_check(stub) -> None:
    """A few weights too many get the model's own count in the message."""
    request = tiny_explain(pb.METHOD_FASTCAM)
    request.fastcam.weights.extend([1.0] * 7)
    details = refused(lambda: stub.Explain(request, timeout=60))
    assert "fastcam.weights has 7 values but model 'tiny' has 3 scale outputs" in details
    request.fastcam.ClearField("weights")
    request.fastcam.weights.extend([1.0, 2.0, 1.0])
    assert stub.Explain(request, timeout=60).saliency.shape == [2, 32, 32]


def peak_bytes(call: Callable[[], object]) -> int:
    """Python memory allocated at the peak of ``call`` (which must raise InvalidInput)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("request_of", [huge_weights, huge_per_item, huge_shape])
def test_refusing_a_huge_repeated_field_converts_none_of_its_values(
        request_of: Callable[[], pb.ExplainRequest]) -> None:
    """The check on the event loop reads lengths only: converting a million values to Python
    objects would allocate tens of MB (and hold up every call meanwhile)."""
    request = request_of()
    config = Config(max_batch=8)
    assert peak_bytes(lambda: check_limits(request, config)) < 256 * 1024


def test_the_worker_side_conversions_are_bounded_too() -> None:
    """The engine converts the parameters and targets again off the event loop (for
    transports that call it directly): bounded by length there as well."""
    weights = huge_weights()
    handler = registry.get(pb.METHOD_FASTCAM)
    assert peak_bytes(lambda: handler.params(weights.fastcam, Config().limits())) < 256 * 1024
    per_item = huge_per_item()
    assert peak_bytes(lambda: target_of(per_item.target, 16)) < 256 * 1024
