"""Every bad request gets a clear status, and the server keeps serving after each one."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import TINY_SHAPE


def good_tensor(batch: int = 1) -> pb.Tensor:
    return array_to_tensor(np.zeros((batch, *TINY_SHAPE), np.float32))


def explain(**fields: object) -> pb.ExplainRequest:
    values: dict[str, object] = {"model": "tiny", "method": pb.METHOD_VANILLA_GRADIENT,
                                 "input": pb.Input(tensor=good_tensor())}
    values.update(fields)
    return pb.ExplainRequest(**values)


def raw_tensor(shape: list[int], dtype: int, data: bytes) -> pb.Input:
    return pb.Input(tensor=pb.Tensor(shape=shape, dtype=dtype, data=data))


def big_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def occlusion(**params: int) -> pb.ExplainRequest:
    request = explain(method=pb.METHOD_OCCLUSION)
    for name, value in params.items():
        setattr(request.occlusion, name, value)
    return request


nan = np.zeros((1, *TINY_SHAPE), np.float32)
nan[0, 0, 0, 0] = np.nan
inf = np.zeros((1, *TINY_SHAPE), np.float32)
inf[0, 1, 2, 3] = np.inf

CASES = [
    ("unknown model", explain(model="nope"), grpc.StatusCode.NOT_FOUND, "available models"),
    ("unknown version", explain(version=7), grpc.StatusCode.NOT_FOUND, "available versions"),
    ("unknown method", explain(method=999),
     grpc.StatusCode.NOT_FOUND, "available methods"),
    ("method unset", explain(method=pb.METHOD_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT,
     "method is unset"),
    ("broken package", explain(model="broken"), grpc.StatusCode.UNAVAILABLE, "not ready"),
    ("no input", explain(input=pb.Input()), grpc.StatusCode.INVALID_ARGUMENT, "input is empty"),
    ("wrong shape", explain(input=pb.Input(tensor=array_to_tensor(
        np.zeros((1, 3, 16, 16), np.float32)))), grpc.StatusCode.INVALID_ARGUMENT,
     "does not match the model input"),
    ("3-D tensor", explain(input=pb.Input(tensor=array_to_tensor(
        np.zeros(TINY_SHAPE, np.float32)))), grpc.StatusCode.INVALID_ARGUMENT, "must be 4-D"),
    ("unset dtype", explain(input=raw_tensor([1, *TINY_SHAPE], pb.DTYPE_UNSPECIFIED, b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("unknown dtype", explain(input=raw_tensor([1, *TINY_SHAPE], 77, b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("short data", explain(input=raw_tensor([1, *TINY_SHAPE], pb.DTYPE_FLOAT32, b"\0" * 100)),
     grpc.StatusCode.INVALID_ARGUMENT, "needs 12288"),
    ("zero dimension", explain(input=raw_tensor([0, *TINY_SHAPE], pb.DTYPE_FLOAT32, b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "every dimension > 0"),
    ("NaN", explain(input=pb.Input(tensor=array_to_tensor(nan))),
     grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ("Inf", explain(input=pb.Input(tensor=array_to_tensor(inf))),
     grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ("undecodable image", explain(input=pb.Input(images=pb.EncodedImages(images=[b"JFIF"]))),
     grpc.StatusCode.INVALID_ARGUMENT, "neither PNG nor JPEG"),
    ("GIF image", explain(input=pb.Input(images=pb.EncodedImages(images=[b"GIF89a"]))),
     grpc.StatusCode.INVALID_ARGUMENT, "the accepted formats are PNG and JPEG"),
    ("no images", explain(input=pb.Input(images=pb.EncodedImages())),
     grpc.StatusCode.INVALID_ARGUMENT, "holds no images"),
    ("batch over limit", explain(input=pb.Input(tensor=good_tensor(9))),
     grpc.StatusCode.INVALID_ARGUMENT, "max_batch=8"),
    ("image over limit", explain(input=pb.Input(images=pb.EncodedImages(
        images=[big_png(1100, 1000)]))), grpc.StatusCode.INVALID_ARGUMENT, "max_pixels"),
    ("params for another method", pb.ExplainRequest(
        model="tiny", method=pb.METHOD_VANILLA_GRADIENT, input=pb.Input(tensor=good_tensor()),
        occlusion=pb.OcclusionParams(window=4)),
     grpc.StatusCode.INVALID_ARGUMENT, "were given for method vanilla_gradient"),
    ("negative window", occlusion(window=-3), grpc.StatusCode.INVALID_ARGUMENT,
     "window must be >= 1"),
    ("zero stride", occlusion(stride=0), grpc.StatusCode.INVALID_ARGUMENT, "stride must be >= 1"),
    ("window larger than image", occlusion(window=64), grpc.StatusCode.INVALID_ARGUMENT,
     "exceeds the input size"),
    ("target out of range", explain(target=pb.Target(class_index=4)),
     grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    ("per-item target count", explain(target=pb.Target(per_item=pb.ClassIndices(indices=[0, 1]))),
     grpc.StatusCode.INVALID_ARGUMENT, "2 indices for a batch of 1"),
]


@pytest.mark.parametrize(("request_", "code", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_status(stub, request_: pb.ExplainRequest,
                                         code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request_, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert message in caught.value.details()
    # The server keeps serving after every one.
    reply = stub.Predict(pb.PredictRequest(model="tiny", input=pb.Input(tensor=good_tensor())),
                         timeout=30)
    assert len(reply.predictions) == 1


def test_predict_errors_match_explain_errors(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(model="tiny", input=pb.Input(tensor=good_tensor(9))),
                     timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(pb.GetModelRequest(model="missing"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tiny" in caught.value.details()


# ---- enum values the proto does not define -------------------------------------------------

def with_params(method: int, field: str, **values: int) -> pb.ExplainRequest:
    request = explain(method=method)
    params = getattr(request, field)
    params.SetInParent()
    for name, value in values.items():
        setattr(params, name, value)
    return request


UNKNOWN_ENUMS = [
    ("integrated_gradients.baseline", with_params(
        pb.METHOD_INTEGRATED_GRADIENTS, "integrated_gradients", baseline=99), "BASELINE_BLACK"),
    ("integrated_gradients.rule", with_params(
        pb.METHOD_INTEGRATED_GRADIENTS, "integrated_gradients", rule=42),
     "QUADRATURE_RIEMANN_LEFT"),
    ("smoe_scale.normalization", with_params(
        pb.METHOD_SMOE_SCALE, "smoe_scale", normalization=9), "NORMALIZATION_GAMMA_CDF"),
    ("fastcam.normalization", with_params(
        pb.METHOD_FASTCAM, "fastcam", normalization=-1), "NORMALIZATION_GAUSSIAN_CDF"),
    ("occlusion.baseline", with_params(pb.METHOD_OCCLUSION, "occlusion", baseline=99),
     "BASELINE_ZERO"),
    ("decam.baseline", with_params(pb.METHOD_DECAM, "decam", baseline=2**31 - 1),
     "BASELINE_MEAN"),
]


@pytest.mark.parametrize(("request_", "valid"), [c[1:] for c in UNKNOWN_ENUMS],
                         ids=[c[0] for c in UNKNOWN_ENUMS])
def test_unknown_enum_value_in_params_names_the_field_and_the_valid_values(
        stub, request_: pb.ExplainRequest, valid: str, request: pytest.FixtureRequest) -> None:
    field = request.node.callspec.id
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request_, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in caught.value.details()
    assert valid in caught.value.details()


# ---- request bytes that are not a message ----------------------------------------------------

# Each is refused by protobuf: wire type 7, a truncated varint, a length past the end, an
# end-group tag with no group open.
CORRUPT = [b"\x0f", b"\x08\x80", b"\x0a\x05ab", b"\x0c"]
RPCS = list(pb.DESCRIPTOR.services_by_name["Explainer"].methods)


@pytest.mark.parametrize("body", CORRUPT, ids=[b.hex()[:12] for b in CORRUPT])
@pytest.mark.parametrize("rpc", RPCS, ids=[m.name for m in RPCS])
def test_undecodable_request_bytes_are_invalid_argument(channel: grpc.Channel, rpc,
                                                        body: bytes) -> None:
    request_class = getattr(pb, rpc.input_type.name)
    with pytest.raises(Exception):  # noqa: B017, PT011 - any protobuf decode error
        request_class.FromString(body)
    path = f"/{rpc.containing_service.full_name}/{rpc.name}"
    with pytest.raises(grpc.RpcError) as caught:
        if rpc.server_streaming:
            list(channel.unary_stream(path)(body, timeout=30))
        else:
            channel.unary_unary(path)(body, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert f"not a valid {rpc.input_type.full_name}" in caught.value.details()
    # The service still answers a well-formed call.
    reply = channel.unary_unary("/saliency.v1.Explainer/ListModels")(b"", timeout=30)
    assert pb.ListModelsResponse.FromString(reply).models


# ---- very long values echoed into messages ---------------------------------------------------

MESSAGE_LIMIT = 1024  # UTF-8 bytes
LONG_VALUES = [
    ("100 KB model name", "Explain", explain(model="m" * 100_000), grpc.StatusCode.NOT_FOUND,
     "available models"),
    ("100 KB model name, GetModel", "GetModel", pb.GetModelRequest(model="m" * 100_000),
     grpc.StatusCode.NOT_FOUND, "available models"),
    ("non-ASCII model name", "Predict", pb.PredictRequest(model="😀" * 20_000),
     grpc.StatusCode.NOT_FOUND, "available models"),
    ("300k-dim shape", "Explain", explain(input=raw_tensor([2] * 300_000, pb.DTYPE_FLOAT32, b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "300000 dimensions"),
    ("300k-dim shape of ones", "Explain",
     explain(input=raw_tensor([1] * 300_000, pb.DTYPE_FLOAT32, b"\0" * 4)),
     grpc.StatusCode.INVALID_ARGUMENT, "300000 dimensions"),
    ("1 MB layer name", "Explain", pb.ExplainRequest(
        model="tiny", method=pb.METHOD_GRADCAM, input=pb.Input(tensor=good_tensor()),
        gradcam=pb.GradCamParams(layer="L" * 1_000_000)), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 1024"),
]


@pytest.mark.parametrize(("rpc", "request_", "code", "message"), [c[1:] for c in LONG_VALUES],
                         ids=[c[0] for c in LONG_VALUES])
def test_long_values_are_shortened_in_status_messages(
        stub, rpc: str, request_: object, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, rpc)(request_, timeout=30)
    assert caught.value.code() == code, caught.value.details()[:300]
    details = caught.value.details()
    assert len(details.encode()) <= MESSAGE_LIMIT
    assert message in details
