"""A client's mistake costs bounded memory and time: a request of more values than any
request needs is refused before it is parsed, and repeated fields are refused by their
length before their values are read."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from saliency_service.core.errors import InvalidInput
from saliency_service.core.params import MAX_ITEMS
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.calls import check_limits
from saliency_service.protocol.codec import params_values, target_of
from saliency_service.protocol.grpc_wire import (
    MAX_WIRE_FIELDS,
    MAX_WIRE_VALUES,
    Undecodable,
    lenient_deserializer,
)
from saliency_service.protocol.images import MAX_TENSOR_DIMS, array_to_tensor
from saliency_service.serving.config import Config
from tests.conftest import TINY_SHAPE

HUGE = 2_000_000  # values in a refused repeated field: 2 to 8 MB on the wire
COUNTED = 10_000  # values that pass the count on the wire, for the checks by field


def tiny_explain(method: int, batch: int = 2) -> pb.ExplainRequest:
    inputs = np.random.default_rng(0).normal(size=(batch, *TINY_SHAPE)).astype(np.float32)
    return pb.ExplainRequest(model="tiny", method=method,
                             input=pb.Input(tensor=array_to_tensor(inputs)))


def many_weights(count: int = HUGE) -> pb.ExplainRequest:
    request = tiny_explain(pb.METHOD_FASTCAM)
    request.fastcam.weights.extend(np.ones(count, np.float32))
    return request


def many_per_item(count: int = HUGE) -> pb.ExplainRequest:
    request = tiny_explain(pb.METHOD_SMOE_SCALE)
    request.target.per_item.indices.extend(np.zeros(count, np.int32))
    return request


def many_shape(count: int = HUGE) -> pb.ExplainRequest:
    request = tiny_explain(pb.METHOD_SMOE_SCALE)
    request.input.tensor.shape.extend(np.ones(count, np.int64))
    return request


def many_images(count: int = HUGE) -> pb.ExplainRequest:
    request = pb.ExplainRequest(model="tiny", method=pb.METHOD_SMOE_SCALE)
    request.input.images.images.extend([b""] * count)
    return request


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


@pytest.mark.parametrize(("request_of", "field"), [
    (many_weights, "fastcam.weights"), (many_per_item, "target.per_item.indices"),
    (many_shape, "input.tensor.shape"), (many_images, "input.images.images")])
def test_a_million_values_are_refused_before_the_request_is_parsed(
        stub, request_of: Callable[[int], pb.ExplainRequest], field: str) -> None:
    """Parsed, a million one-byte values would take 4 to 16 MB each; the count on the wire
    refuses them first."""
    details = refused(lambda: stub.Explain(request_of(HUGE), timeout=60))
    assert f"({field} alone at least" in details
    assert f"more than {MAX_WIRE_VALUES} packed values" in details or (
        f"more than {MAX_WIRE_FIELDS} fields" in details)


@pytest.mark.parametrize("request_of", [many_weights, many_per_item, many_shape, many_images])
def test_the_wire_count_refuses_without_parsing(
        request_of: Callable[[int], pb.ExplainRequest]) -> None:
    data = request_of(HUGE).SerializeToString()
    refusal = lenient_deserializer(pb.ExplainRequest)(data)
    assert isinstance(refusal, Undecodable) and "more than" in refusal.reason
    ordinary = tiny_explain(pb.METHOD_FASTCAM).SerializeToString()
    assert isinstance(lenient_deserializer(pb.ExplainRequest)(ordinary), pb.ExplainRequest)


def test_weights_beyond_any_scale_count_are_refused_naming_field_length_and_bound(stub) -> None:
    details = refused(lambda: stub.Explain(many_weights(COUNTED), timeout=60))
    assert f"fastcam.weights has {COUNTED} values; at most {MAX_ITEMS}" in details


def test_per_item_targets_beyond_the_batch_are_refused(stub) -> None:
    details = refused(lambda: stub.Explain(many_per_item(COUNTED), timeout=60))
    assert f"target.per_item has {COUNTED} indices for a batch of 2" in details


@pytest.mark.parametrize("rpc", ["Explain", "Predict"])
def test_a_tensor_shape_of_thousands_of_dimensions_is_refused(stub, rpc: str) -> None:
    explain = many_shape(COUNTED)
    if rpc == "Explain":
        details = refused(lambda: stub.Explain(explain, timeout=60))
    else:
        predict = pb.PredictRequest(model="tiny", input=explain.input)
        details = refused(lambda: stub.Predict(predict, timeout=60))
    assert f"input.tensor.shape has {COUNTED + 4} dimensions; at most {MAX_TENSOR_DIMS}" in details


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


def pre_admission_check(request: pb.ExplainRequest, config: Config) -> None:
    """What runs on the event loop before a request takes a slot: the limits, then the
    conversion of its parameters and targets to plain values (``Core.prepare``'s part
    that reads the message)."""
    check_limits(request, config)
    which = request.WhichOneof("params")
    if which:
        params_values(getattr(request, which), which)
    target_of(request.target, config.max_batch)


@pytest.mark.parametrize("request_of", [many_weights, many_per_item, many_shape])
def test_refusing_a_huge_repeated_field_converts_none_of_its_values(
        request_of: Callable[[], pb.ExplainRequest]) -> None:
    """The checks on the event loop read lengths only: converting a million values to Python
    objects would allocate tens of MB (and hold up every call meanwhile)."""
    request = request_of()
    config = Config(max_batch=8)
    assert peak_bytes(lambda: pre_admission_check(request, config)) < 256 * 1024


def test_the_conversions_are_bounded_for_in_process_callers_too() -> None:
    """Transports that call the codec directly (TorchServe's handler, benchmarks) convert
    the parameters and targets through the same bounded functions."""
    weights = many_weights()
    assert peak_bytes(lambda: params_values(weights.fastcam, "fastcam")) < 256 * 1024
    per_item = many_per_item()
    assert peak_bytes(lambda: target_of(per_item.target, 16)) < 256 * 1024
