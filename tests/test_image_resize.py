"""How encoded images are fitted to a square model input (``resize``: stretch, center_crop,
letterbox), in the manifest and per request, and the maps and overlays returned in the
images' own geometry; over gRPC, HTTP and the client."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from saliency_service.client.client import SaliencyClient
from saliency_service.client.commands import RESIZE_CHOICES
from saliency_service.core.errors import InvalidInput
from saliency_service.core.repository import RESIZE_MODES, InputSpec, Manifest
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import resize_uint8
from saliency_service.protocol.inputs import (
    ImageGeometry,
    decode_input,
    placement,
    preprocess_pixels,
)
from saliency_service.render.drawing import BACKGROUND
from saliency_service.serving.config import Config
from tests.conftest import RunningServer, make_config

SPEC = InputSpec(shape=(-1, 3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
WIDE = (32, 64)  # height, width: a 2:1 photograph for a 32×32 model


def wide_picture() -> np.ndarray:
    """A 2:1 picture: a white square on the left quarter, a gradient in the middle half."""
    pixels = np.zeros((*WIDE, 3), np.uint8)
    pixels[8:24, 2:14] = 255
    pixels[:, 16:48, 0] = np.arange(32, dtype=np.uint8)[None, :] * 8
    pixels[:, 16:48, 1] = np.arange(32, dtype=np.uint8)[:, None] * 8
    return pixels


def encoded(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def images_input(*pictures: np.ndarray) -> pb.Input:
    return pb.Input(images=pb.EncodedImages(images=[encoded(p) for p in pictures]))


def normalized(pixels: np.ndarray) -> np.ndarray:
    return preprocess_pixels(pixels[None], SPEC)[0]


def test_center_crop_feeds_the_centre_of_the_picture() -> None:
    picture = wide_picture()
    geometry = ImageGeometry()
    inputs = decode_input(images_input(picture), SPEC, Config(), resize="center_crop",
                          geometry=geometry)
    assert inputs.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(inputs[0], normalized(picture[:, 16:48]))
    assert inputs.max() < normalized(np.full((1, 1, 3), 255, np.uint8)).max()  # no square
    (placed,) = geometry.placements
    assert placed.source == (0, 16, 32, 32) and placed.target == (0, 0, 32, 32)


def test_letterbox_pads_with_the_mean_and_keeps_the_whole_picture() -> None:
    picture = wide_picture()
    inputs = decode_input(images_input(picture), SPEC, Config(), resize="letterbox")
    assert np.all(inputs[0, :, :8] == 0.0) and np.all(inputs[0, :, 24:] == 0.0)
    np.testing.assert_array_equal(inputs[0, :, 8:24], normalized(resize_uint8(picture, 16, 32)))
    assert inputs[0, :, 8:24, :8].max() == normalized(np.full((1, 1, 3), 255, np.uint8)).max()


def test_stretch_is_the_default_and_squashes() -> None:
    picture = wide_picture()
    geometry = ImageGeometry()
    inputs = decode_input(images_input(picture), SPEC, Config(), geometry=geometry)
    np.testing.assert_array_equal(inputs[0], normalized(resize_uint8(picture, 32, 32)))
    assert not geometry.follows_images  # maps stay in the model's size


def test_manifest_sets_the_default_and_a_request_overrides_it() -> None:
    manifest = {"name": "m", "version": 1, "input": {
        "shape": [-1, 3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "letterbox"}}
    spec = Manifest.from_json(manifest).input
    assert spec.resize == "letterbox"
    inputs = decode_input(images_input(wide_picture()), spec, Config())
    assert np.all(inputs[0, :, :8] == 0.0)
    inputs = decode_input(images_input(wide_picture()), spec, Config(), resize="stretch")
    assert not np.all(inputs[0, :, :8] == 0.0)
    manifest["input"]["resize"] = "squash"
    with pytest.raises(ValueError, match=r"input\.resize 'squash' must be one of stretch, "
                       r"center_crop, letterbox"):
        Manifest.from_json(manifest)


@pytest.mark.parametrize("size, mode, source, target", [
    ((32, 64), "center_crop", (0, 16, 32, 32), (0, 0, 32, 32)),
    ((64, 32), "center_crop", (16, 0, 32, 32), (0, 0, 32, 32)),
    ((30, 90), "center_crop", (0, 30, 30, 30), (0, 0, 32, 32)),
    ((32, 64), "letterbox", (0, 0, 32, 64), (8, 0, 16, 32)),
    ((90, 30), "letterbox", (0, 0, 90, 30), (0, 10, 32, 11)),
    ((1, 500), "letterbox", (0, 0, 1, 500), (15, 0, 1, 32)),
    ((32, 64), "stretch", (0, 0, 32, 64), (0, 0, 32, 32)),
])
def test_placements(size: tuple[int, int], mode: str, source: tuple[int, ...],
                    target: tuple[int, ...]) -> None:
    placed = placement(size, (32, 32), mode)
    assert (placed.source, placed.target) == (source, target)


def test_maps_are_scaled_back_onto_the_region_the_model_saw() -> None:
    maps = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    crop = ImageGeometry(placements=[placement(WIDE, (32, 32), "center_crop")])
    back = crop.maps(maps)
    assert back.shape == (1, *WIDE)
    np.testing.assert_array_equal(back[0, :, 16:48], maps[0])
    assert not back[0, :, :16].any() and not back[0, :, 48:].any()
    box = ImageGeometry(placements=[placement(WIDE, (32, 32), "letterbox")])
    back = box.maps(maps)
    assert back.shape == (1, *WIDE) and back.min() >= 0.0 and back.max() <= 1.0
    expected = np.asarray(Image.fromarray(maps[0, 8:24]).resize((64, 32), Image.BILINEAR))
    np.testing.assert_allclose(back[0], expected)


def test_invalid_mode_names_the_choices() -> None:
    with pytest.raises(InvalidInput, match="resize='fill' is not a resize mode; valid values: "
                       "stretch, center_crop, letterbox"):
        decode_input(images_input(wide_picture()), SPEC, Config(), resize="fill")
    assert RESIZE_CHOICES == RESIZE_MODES  # the CLI offers what the server takes


def test_mixed_sizes_are_refused_when_maps_follow_the_images() -> None:
    pictures = (wide_picture(), wide_picture()[:, :48])
    with pytest.raises(InvalidInput, match=r"must share one size \(.*image 1 is 48×32"):
        decode_input(images_input(*pictures), SPEC, Config(), resize="letterbox",
                     geometry=ImageGeometry())
    inputs = decode_input(images_input(*pictures), SPEC, Config(), resize="letterbox")
    assert inputs.shape == (2, 3, 32, 32)  # a prediction returns no maps: any sizes go


def test_maps_that_would_not_fit_a_message_are_refused_before_any_work() -> None:
    picture = images_input(wide_picture(), wide_picture())
    small = Config(max_message_bytes=2 * 32 * 64 * 4)
    decode_input(picture, SPEC, small, resize="center_crop", geometry=ImageGeometry())
    with pytest.raises(InvalidInput, match=r"about 28672 bytes with the overlays, over the "
                       r"largest message, max_message_bytes=16384 \(--max-message-bytes\)"):
        decode_input(picture, SPEC, small, resize="center_crop",
                     geometry=ImageGeometry(keep_pixels=True))


# ---- over a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny model, and a copy whose manifest letterboxes by default."""
    root = tmp_path_factory.mktemp("resize-models")
    shutil.copytree(repository / "tiny", root / "tiny")
    shutil.copytree(repository / "tiny", root / "boxed")
    manifest_path = root / "boxed" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "boxed"
    manifest["input"]["resize"] = "letterbox"
    manifest_path.write_text(json.dumps(manifest))
    running = RunningServer(make_config(root, http_port=0)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[SaliencyClient]:
    with SaliencyClient(served.address, timeout=60) as connected:
        yield connected


def picture_size(overlay: bytes) -> tuple[int, int]:
    """Height and width of the picture at the top of an overlay: on a white image, every
    row of it is bright somewhere, and the band under it starts with a background row."""
    rgb = np.asarray(Image.open(io.BytesIO(overlay)).convert("RGB"))
    background = np.all(rgb == np.asarray(BACKGROUND, np.uint8), axis=(1, 2))
    height = int(np.argmax(background))
    columns = np.any(rgb[:height].max(axis=2) > 100, axis=0)
    return height, int(columns.sum())


@pytest.mark.parametrize("mode", ["center_crop", "letterbox"])
def test_maps_and_overlays_follow_the_original_picture(client: SaliencyClient,
                                                      mode: str) -> None:
    white = np.full((*WIDE, 3), 255, np.uint8)
    result = client.explain("tiny", "gradcam", images=[encoded(white)], resize=mode,
                            return_overlay=True)
    assert result.maps.shape == (1, *WIDE)
    height, width = picture_size(result.overlays[0])
    assert width == 2 * height  # the picture's 2:1, not the model's 1:1
    if mode == "center_crop":
        assert not result.maps[0, :, :16].any() and not result.maps[0, :, 48:].any()
    stretched = client.explain("tiny", "gradcam", images=[encoded(white)], return_overlay=True)
    assert stretched.maps.shape == (1, 32, 32)
    height, width = picture_size(stretched.overlays[0])
    assert width == height


def test_manifest_default_and_request_override_over_grpc(client: SaliencyClient) -> None:
    info = client.get_model("boxed")
    assert info.input.resize == "letterbox" and client.get_model("tiny").input.resize == "stretch"
    picture = encoded(wide_picture())
    boxed = client.explain("boxed", "gradcam", images=[picture])
    assert boxed.maps.shape == (1, *WIDE)
    assert client.explain("boxed", "gradcam", images=[picture], resize="stretch").maps.shape \
        == (1, 32, 32)
    crop = client.predict("tiny", images=[picture], resize="center_crop")
    tensor = decode_input(images_input(wide_picture()), SPEC, Config(), resize="center_crop")
    same = client.predict("tiny", tensor=tensor)
    np.testing.assert_allclose(crop.predictions[0].top[0].probability,
                               same.predictions[0].top[0].probability, rtol=1e-6)


@pytest.mark.parametrize("call", ["explain", "predict"])
def test_invalid_resize_is_invalid_argument(client: SaliencyClient, call: str) -> None:
    picture = encoded(wide_picture())
    with pytest.raises(grpc.RpcError) as error:
        if call == "explain":
            client.explain("tiny", "gradcam", images=[picture], resize="crop")
        else:
            client.predict("tiny", images=[picture], resize="crop")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stretch, center_crop, letterbox" in error.value.details()


def test_http_takes_resize_as_json_and_as_a_form_field(served: RunningServer) -> None:
    picture = encoded(wide_picture())
    base = f"http://127.0.0.1:{served.server.http_port}"
    with httpx.Client(base_url=base, timeout=60) as http:
        form = http.post("/api/v1/explain", data={"model": "tiny", "method": "gradcam",
                                                  "resize": "letterbox"},
                         files={"image": ("wide.png", picture, "image/png")})
        assert form.status_code == 200, form.text
        assert form.json()["saliency"]["shape"] == [1, *WIDE]
        body = {"model": "tiny", "method": "gradcam", "resize": "center_crop",
                "input": {"images": {"images": [base64.b64encode(picture).decode()]}}}
        answer = http.post("/api/v1/explain", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["saliency"]["shape"] == [1, *WIDE]
        refused = http.post("/api/v1/explain", json={**body, "resize": "squash"})
        assert refused.status_code == 400
        assert "stretch, center_crop, letterbox" in refused.json()["error"]["message"]


def test_cli_resize_flag(served: RunningServer, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    from saliency_service.cli import main  # noqa: PLC0415 - the server-side CLI

    image = tmp_path / "wide.png"
    image.write_bytes(encoded(wide_picture()))
    out = tmp_path / "map.png"
    argv = ["explain", "--server", served.address, "--model", "tiny", "--image", str(image),
            "--method", "gradcam", "--out", str(out)]
    assert main([*argv, "--resize", "letterbox"]) == 0
    assert f"map: {out} (32×64, mean " in capsys.readouterr().out
    assert main(argv) == 0
    assert f"map: {out} (32×32, mean " in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--resize", "squash"])
    assert usage.value.code == 2
    assert "invalid choice: 'squash'" in capsys.readouterr().err
