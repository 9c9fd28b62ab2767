"""Malformed requests thrown at the real server: every one gets a proper status.

Random shapes, dtypes, byte lengths, enum values (including ones the proto does not
define), parameters, targets and huge dimensions go through a real gRPC channel.
None may come back INTERNAL or UNKNOWN, and the server must stay healthy. The counts
of requests tried and statuses seen are printed (``pytest -s``).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from saliency.v1 import explainer_pb2 as pb
from saliency.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_config
from tests.production_support import tiny_request

# Small limits keep every fuzzed request cheap: that is what the limits are for.
LIMITS = {
    "max_batch": 4,
    "max_pixels": 96 * 96,
    "max_samples": 8,
    "max_steps": 8,
    "max_masks": 32,
    "max_population": 8,
    "max_generations": 3,
    "max_message_bytes": 4 * 1024 * 1024,
}
EXAMPLES = 500
PROPER = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "OUT_OF_RANGE",
}
ITEM_SIZES = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_UINT8: 1, pb.DTYPE_FLOAT16: 2}
PARAMS_FIELDS = [f.name for f in pb.ExplainRequest.DESCRIPTOR.oneofs_by_name["params"].fields]
METHODS = [value.number for value in pb.Method.DESCRIPTOR.values]
INT32 = (-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def fuzzed(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, **LIMITS)).start()
    yield running
    running.stop()


# ---- strategies --------------------------------------------------------------------------

dims = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 3, 32, 2**31, 2**40, 2**62]))
shapes = st.one_of(
    st.lists(dims, min_size=0, max_size=6),
    st.tuples(
        st.integers(-1, 6),
        st.sampled_from([1, 3, 4]),
        st.sampled_from([16, 32, 33]),
        st.sampled_from([32, 31]),
    ).map(list),
    st.tuples(
        st.integers(1, 5),
        st.sampled_from([32, 8]),
        st.sampled_from([32, 8]),
        st.sampled_from([3, 1]),
    ).map(list),
)
dtypes = st.one_of(st.sampled_from(list(ITEM_SIZES)), st.integers(-3, 9))
special_floats = st.sampled_from([0.0, -0.0, 1e38, -1e38, math.nan, math.inf, -math.inf, 1e-45])


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    shape = draw(shapes)
    dtype = draw(dtypes)
    expected = max(0, math.prod(shape) * ITEM_SIZES.get(dtype, 4)) if shape else 0
    size = draw(
        st.one_of(
            st.just(expected),
            st.integers(0, 64),
            st.just(max(expected - 1, 0)),
            st.just(expected + 1),
        )
    )
    if size > 1 << 20:  # keep within the message limit; the length is still wrong
        size = draw(st.integers(0, 4096))
    data = draw(
        st.one_of(
            st.just(b"\x00" * size),
            st.binary(min_size=size, max_size=size),
            st.just(
                np.random.default_rng(draw(st.integers(0, 9)))
                .normal(size=size // 4)
                .astype("<f4")
                .tobytes()[:size]
                .ljust(size, b"\0")
            ),
        )
    )
    if draw(st.booleans()) and dtype == pb.DTYPE_FLOAT32 and size == expected and size >= 4:
        values = np.frombuffer(data, "<f4").copy()
        values[draw(st.integers(0, values.size - 1))] = draw(special_floats)
        data = values.tobytes()
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


@st.composite
def encoded_images(draw: st.DrawFn) -> pb.EncodedImages:
    images = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            images.append(draw(st.binary(max_size=256)))
            continue
        width, height = draw(st.integers(1, 120)), draw(st.integers(1, 120))
        mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]))
        picture = Image.new(mode, (width, height), color=draw(st.integers(0, 255)))
        out = io.BytesIO()
        picture.save(
            out, format=draw(st.sampled_from(["PNG", "JPEG"])) if mode in ("RGB", "L") else "PNG"
        )
        data = out.getvalue()
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]  # truncated
        images.append(data)
    return pb.EncodedImages(images=images)


def _field_value(draw: st.DrawFn, field: FieldDescriptor) -> object:
    kind = field.type
    if kind == FieldDescriptor.TYPE_ENUM:
        return draw(st.integers(-2, 12))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return draw(st.one_of(special_floats, st.floats(-1e6, 1e6, width=32)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if kind == FieldDescriptor.TYPE_STRING:
        return draw(
            st.one_of(
                st.text(max_size=20),
                st.sampled_from(["best1bin", "rand1bin", "scale_0", "layer3", "fc", "scale_9"]),
            )
        )
    return draw(
        st.one_of(
            st.integers(-5, 70), st.sampled_from([0, 2**31 - 1, -(2**31)]), st.integers(*INT32)
        )
    )


def _fill(draw: st.DrawFn, message: Message) -> None:
    """Sets a random subset of a params message's fields to random values."""
    for field in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.is_repeated:
            getattr(message, field.name).extend(
                [_field_value(draw, field) for _ in range(draw(st.integers(0, 6)))]
            )
        else:
            setattr(message, field.name, _field_value(draw, field))


@st.composite
def inputs(draw: st.DrawFn) -> pb.Input:
    choice = draw(st.sampled_from(["tensor", "valid", "images", "empty"]))
    if choice == "tensor":
        return pb.Input(tensor=draw(tensors()))
    if choice == "valid":
        batch = draw(st.integers(1, 3))
        return tiny_request(pb.METHOD_UNSPECIFIED, batch=batch, seed=draw(st.integers(0, 99))).input
    if choice == "images":
        return pb.Input(images=draw(encoded_images()))
    return pb.Input()


@st.composite
def explain_requests(draw: st.DrawFn) -> pb.ExplainRequest:
    request = pb.ExplainRequest(
        # Mostly a real model, version and method, so requests get past the first checks.
        model=draw(st.sampled_from(["tiny"] * 12 + ["", "broken", "TINY", "x" * 300])),
        version=draw(st.sampled_from([0] * 12 + [1, 2, -1, 2**62])),
        method=draw(st.one_of(*[st.sampled_from(METHODS)] * 6, st.integers(-3, 60))),
        seed=draw(st.integers(0, 2**64 - 1)),
        return_raw=draw(st.booleans()),
        return_overlay=draw(st.booleans()),
        top_k=draw(st.integers(*INT32)),
    )
    request.input.CopyFrom(draw(inputs()))
    target = draw(st.sampled_from(["none", "predicted", "class", "items"]))
    if target == "predicted":
        request.target.predicted = draw(st.booleans())
    elif target == "class":
        request.target.class_index = draw(st.one_of(st.integers(-2, 6), st.integers(*INT32)))
    elif target == "items":
        request.target.per_item.indices.extend(draw(st.lists(st.integers(-2, 6), max_size=5)))
    if draw(st.booleans()):
        field = draw(st.sampled_from(PARAMS_FIELDS))
        params = getattr(request, field)
        params.SetInParent()
        _fill(draw, params)
    if draw(st.booleans()):
        request.budget.max_latency_ms = draw(st.one_of(special_floats, st.floats(0, 1e5)))
        request.budget.best_effort = draw(st.booleans())
    return request


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, Message]:
    request = draw(explain_requests())
    rpc = draw(
        st.sampled_from(["Explain", "Explain", "Explain", "ExplainStream", "Predict", "GetModel"])
    )
    if rpc == "Predict":
        return rpc, pb.PredictRequest(
            model=request.model, version=request.version, input=request.input, top_k=request.top_k
        )
    if rpc == "GetModel":
        return rpc, pb.GetModelRequest(model=request.model, version=request.version)
    return rpc, request


# ---- the test ----------------------------------------------------------------------------


def test_malformed_requests_get_proper_statuses(fuzzed: RunningServer) -> None:
    statuses: Counter[str] = Counter()
    by_rpc: Counter[str] = Counter()
    with grpc.insecure_channel(
        fuzzed.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        rpcs: dict[str, Callable[[Message], object]] = {
            "Explain": lambda r: stub.Explain(r, timeout=60),
            "ExplainStream": lambda r: list(stub.ExplainStream(r, timeout=60)),
            "Predict": lambda r: stub.Predict(r, timeout=60),
            "GetModel": lambda r: stub.GetModel(r, timeout=60),
        }

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(call=calls())
        def one(call: tuple[str, Message]) -> None:
            rpc, request = call
            by_rpc[rpc] += 1
            try:
                rpcs[rpc](request)
                code, details = "OK", ""
            except grpc.RpcError as error:
                code, details = error.code().name, error.details()
            statuses[code] += 1
            assert code in PROPER, f"{rpc} → {code}: {details}\n{str(request)[:2000]}"
            if code != "OK":
                assert details, f"{code} without a message"

        one()
        tried = sum(statuses.values())
        print(
            f"\nfuzz: {tried} requests tried ({dict(sorted(by_rpc.items()))}); statuses seen: "
            f"{dict(statuses.most_common())}"
        )
        assert tried >= EXAMPLES
        assert len(statuses) >= 3  # the strategies reach past the first checks
        # Still healthy, and still right.
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(
                health_pb2.HealthCheckRequest(service="saliency.v1.Explainer"), timeout=10
            ).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        reply = stub.Explain(tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=2), timeout=30)
        assert reply.cost.backward_passes == 2
    admission = fuzzed.server.admission
    assert admission.inflight == 0 and admission.waiting == 0
