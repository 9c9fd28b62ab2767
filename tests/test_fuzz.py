"""Malformed requests thrown at the real server: every one gets a proper status.

Random shapes, dtypes, byte lengths, enum values (including ones the proto does not
define), parameters (mostly for the method asked for, so they get past the first checks,
with huge repeated fields and long strings among them), targets and huge dimensions go
through a real gRPC channel, and so do request bodies that are random bytes or corrupted
serializations. None may come back INTERNAL or UNKNOWN, no status message may be too long
for its trailer, and the server must stay healthy. The counts of requests tried and
statuses seen are printed (``pytest -s``).
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
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
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
EXAMPLES = 900
RAW_EXAMPLES = 600
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
RPCS = list(pb.DESCRIPTOR.services_by_name["Explainer"].methods)
# Values far beyond anything legal; each is built once (drawing them piece by piece is slow).
LONG_STRINGS = ["x" * 100_000, "é" * 300_000, "L" * 1_000_000]
HUGE_COUNTS = [10_000, 300_000]
MESSAGE_LIMIT = 1024  # the longest status message the server sends, in UTF-8 bytes


def params_field_of(method: int) -> str | None:
    """The ``params`` oneof field that carries ``method``'s parameters, if there is one."""
    name = pb.Method.Name(method).removeprefix("METHOD_").lower() if method in METHODS else ""
    return name if name in PARAMS_FIELDS else None


@pytest.fixture(scope="module")
def fuzzed(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, **LIMITS)).start()
    yield running
    running.stop()


# ---- strategies --------------------------------------------------------------------------

dims = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 3, 32, 2**31, 2**40, 2**62]))
shapes = st.one_of(
    st.lists(dims, min_size=0, max_size=6),
    st.sampled_from([[2] * 300_000, [1] * 300_000, [1, 3, 32, 32, *([1] * 60)]]),
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
    # (A product over 300,000 dimensions takes a second: such shapes get any byte length.)
    expected = max(0, math.prod(shape) * ITEM_SIZES.get(dtype, 4)) if 0 < len(shape) < 64 else 0
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
        return draw(st.one_of(
            st.sampled_from([value.number for value in field.enum_type.values]),
            st.integers(-2, 12),
            st.sampled_from([99, 2**31 - 1, -(2**31)]),
        ))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return draw(st.one_of(special_floats, st.floats(-1e6, 1e6, width=32)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if kind == FieldDescriptor.TYPE_STRING:
        return draw(
            st.one_of(
                st.text(max_size=20),
                st.sampled_from(["best1bin", "rand1bin", "scale_0", "layer3", "fc", "scale_9"]),
                st.sampled_from(LONG_STRINGS),
            )
        )
    return draw(
        st.one_of(
            st.integers(-5, 70), st.sampled_from([0, 2**31 - 1, -(2**31)]), st.integers(*INT32)
        )
    )


def _fill(draw: st.DrawFn, message: Message) -> None:
    """Sets a random subset of a params message's fields to random values; a repeated field
    is now and then huge."""
    for field in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.is_repeated:
            values = getattr(message, field.name)
            if draw(st.integers(0, 5)) == 0:
                values.extend([_field_value(draw, field)] * draw(st.sampled_from(HUGE_COUNTS)))
            else:
                values.extend([_field_value(draw, field) for _ in range(draw(st.integers(0, 6)))])
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
        model=draw(st.sampled_from(["tiny"] * 12 + ["", "broken", "TINY", "x" * 300,
                                                    LONG_STRINGS[0]])),
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
        own = params_field_of(request.method)
        field = draw(st.one_of(st.sampled_from(PARAMS_FIELDS),
                               *([st.just(own)] * 2 if own else [])))
        params = getattr(request, field)
        params.SetInParent()
        _fill(draw, params)
    if draw(st.booleans()):
        request.budget.max_latency_ms = draw(st.one_of(special_floats, st.floats(0, 1e5)))
        request.budget.best_effort = draw(st.booleans())
    return request


@st.composite
def params_requests(draw: st.DrawFn) -> pb.ExplainRequest:
    """A valid request to the tiny model but for its method's params, which are fuzzed: so
    that the params, not an earlier check, decide the status."""
    method = draw(st.sampled_from([m for m in METHODS if params_field_of(m)]))
    request = tiny_request(method, batch=draw(st.integers(1, 2)), seed=draw(st.integers(0, 9)))
    params = getattr(request, params_field_of(method) or "")
    params.SetInParent()
    _fill(draw, params)
    return request


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, Message]:
    request = draw(st.one_of(explain_requests(), params_requests()))
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


def valid_body(rpc: MethodDescriptor, seed: int) -> bytes:
    """A well-formed serialized request for ``rpc`` that the tiny model would serve."""
    explain = tiny_request(pb.METHOD_VANILLA_GRADIENT, seed=seed)
    request: Message = {
        "ExplainRequest": explain,
        "PredictRequest": pb.PredictRequest(model="tiny", input=explain.input),
        "GetModelRequest": pb.GetModelRequest(model="tiny"),
        "ListModelsRequest": pb.ListModelsRequest(),
    }[rpc.input_type.name]
    return request.SerializeToString()


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[MethodDescriptor, bytes]:
    """A request body for one RPC: random bytes, or a valid body truncated, with bytes
    overwritten, or with random bytes spliced in."""
    rpc = draw(st.sampled_from(RPCS))
    kind = draw(st.sampled_from(["random", "truncated", "overwritten", "spliced"]))
    if kind == "random":
        return rpc, draw(st.binary(max_size=512))
    body = bytearray(valid_body(rpc, draw(st.integers(0, 9))))
    if kind == "truncated":
        return rpc, bytes(body[: draw(st.integers(0, max(len(body) - 1, 0)))])
    if kind == "overwritten" and body:
        for _ in range(draw(st.integers(1, 8))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        return rpc, bytes(body)
    at = draw(st.integers(0, len(body)))
    return rpc, bytes(body[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(body[at:])


def raw_caller(channel: grpc.Channel, rpc: MethodDescriptor) -> Callable[[bytes], object]:
    """Calls ``rpc`` with a body sent as is (no serializer on either side)."""
    path = f"/{rpc.containing_service.full_name}/{rpc.name}"
    if rpc.server_streaming:
        stream = channel.unary_stream(path)
        return lambda body: list(stream(body, timeout=60))
    unary = channel.unary_unary(path)
    return lambda body: unary(body, timeout=60)


def check_status(rpc: str, code: str, details: str, describe: Callable[[], str]) -> None:
    """A documented status with a message that fits its trailer (a longer one reaches the
    client as RESOURCE_EXHAUSTED "received metadata size exceeds …" instead)."""
    assert code in PROPER, f"{rpc} → {code}: {details[:2000]}\n{describe()}"
    if code != "OK":
        assert details, f"{code} without a message"
        assert "metadata size" not in details, f"{rpc} → {code}: {details}\n{describe()}"
        assert len(details.encode()) <= MESSAGE_LIMIT, f"{rpc} → {code}: {details[:2000]}"


# ---- the tests ---------------------------------------------------------------------------


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
            check_status(rpc, code, details, lambda: str(request)[:2000])

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


def test_undecodable_request_bodies_get_proper_statuses(fuzzed: RunningServer) -> None:
    statuses: Counter[str] = Counter()
    with grpc.insecure_channel(fuzzed.address) as channel:
        callers = {rpc.name: raw_caller(channel, rpc) for rpc in RPCS}

        @settings(
            max_examples=RAW_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(call=raw_bodies())
        def one(call: tuple[MethodDescriptor, bytes]) -> None:
            rpc, body = call
            try:
                callers[rpc.name](body)
                code, details = "OK", ""
            except grpc.RpcError as error:
                code, details = error.code().name, error.details()
            statuses[code] += 1
            check_status(rpc.name, code, details, lambda: body[:200].hex())

        one()
        print(f"\nraw bodies: {sum(statuses.values())} tried; statuses seen: "
              f"{dict(statuses.most_common())}")
        assert statuses["INVALID_ARGUMENT"] > 0
        assert health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="saliency.v1.Explainer"), timeout=10
        ).status == health_pb2.HealthCheckResponse.SERVING
    admission = fuzzed.server.admission
    assert admission.inflight == 0 and admission.waiting == 0
