"""Every per-request limit, refused through the real server with a message naming it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_config
from tests.production_support import tiny_request

LIMITS = {
    "max_message_bytes": 64 * 1024,
    "max_batch": 4,
    "max_pixels": 48 * 48,
    "max_samples": 8,
    "max_steps": 9,
    "max_masks": 10,
    "max_population": 11,
    "max_generations": 12,
    "max_windows": 100,
}

# (method, params oneof field, parameter, limit that bounds it)
PARAMS = [
    (pb.METHOD_SMOOTHGRAD, "smoothgrad", "samples", "max_samples"),
    (pb.METHOD_VARGRAD, "vargrad", "samples", "max_samples"),
    (pb.METHOD_GUIDED_ABSOLUTEGRAD, "guided_absolutegrad", "samples", "max_samples"),
    (pb.METHOD_INTEGRATED_GRADIENTS, "integrated_gradients", "steps", "max_steps"),
    (pb.METHOD_RISE, "rise", "masks", "max_masks"),
    (pb.METHOD_DECAM, "decam", "population", "max_population"),
    (pb.METHOD_DECAM, "decam", "generations", "max_generations"),
]


@pytest.fixture(scope="module")
def limited(repository: Path) -> Iterator[pb_grpc.ExplainerStub]:
    running = RunningServer(make_config(repository, **LIMITS)).start()
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.ExplainerStub(channel)
    running.stop()


def refusal(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30)
    return error.value


def test_message_size_limit(limited: pb_grpc.ExplainerStub) -> None:
    request = tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=3)  # 3×3×32×32 float32 = 36 KiB
    request.input.tensor.shape[0] = 6
    request.input.tensor.data = request.input.tensor.data * 2  # 72 KiB > 64 KiB
    error = refusal(limited.Explain, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMITS["max_message_bytes"]) in error.details()


def test_batch_limit(limited: pb_grpc.ExplainerStub) -> None:
    images = [_png(32, 32, seed) for seed in range(5)]
    for call, request in (
        (limited.Explain, tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=5)),
        (
            limited.Predict,
            pb.PredictRequest(model="tiny", input=pb.Input(images=pb.EncodedImages(images=images))),
        ),
    ):
        error = refusal(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch=4" in error.details()
    assert (
        len(limited.Explain(tiny_request(pb.METHOD_VANILLA_GRADIENT, batch=4), timeout=30).targets)
        == 4
    )


def test_pixel_limit_for_images_and_tensors(limited: pb_grpc.ExplainerStub) -> None:
    image = pb.PredictRequest(
        model="tiny", input=pb.Input(images=pb.EncodedImages(images=[_png(49, 48)]))
    )
    tensor = tiny_request(pb.METHOD_VANILLA_GRADIENT, shape=(3, 64, 64))
    for call, request in ((limited.Predict, image), (limited.Explain, tensor)):
        error = refusal(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"max_pixels={LIMITS['max_pixels']}" in error.details().replace(" is ", "=")
    ok = pb.PredictRequest(
        model="tiny", input=pb.Input(images=pb.EncodedImages(images=[_png(48, 48)]))
    )
    assert len(limited.Predict(ok, timeout=30).predictions) == 1


@pytest.mark.parametrize(
    ("method", "field", "param", "limit"), PARAMS, ids=[f"{p[1]}.{p[2]}" for p in PARAMS]
)
def test_work_limits(
    limited: pb_grpc.ExplainerStub, method: int, field: str, param: str, limit: str
) -> None:
    request = tiny_request(method)
    if field == "decam":  # the default population is above this server's limit
        request.decam.population = 4
    setattr(getattr(request, field), param, LIMITS[limit] + 1)
    error = refusal(limited.Explain, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{limit}={LIMITS[limit]}" in error.details()
    assert f"{field}.{param}={LIMITS[limit] + 1}" in error.details()
    # At the limit the limit check passes (whatever the method then says of the request).
    setattr(getattr(request, field), param, LIMITS[limit])
    try:
        limited.Explain(request, timeout=60)
    except grpc.RpcError as other:
        assert limit not in other.details()
        assert other.code() != grpc.StatusCode.INTERNAL


def test_occlusion_window_count_limit(limited: pb_grpc.ExplainerStub) -> None:
    request = tiny_request(pb.METHOD_OCCLUSION)
    request.occlusion.window = 1
    request.occlusion.stride = 1  # 1024 windows > max_windows
    error = refusal(limited.Explain, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-windows" in error.details() and "stride" in error.details()


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
