"""Encoded images: every PNG bit depth and colour type decodes to the right pixels, JPEG
too, and anything else is refused with a message that names the accepted formats."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from saliency_service.core.errors import InvalidInput
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import decode_image
from tests.conftest import TINY_SHAPE

HEIGHT, WIDTH = TINY_SHAPE[1:]
MAX_PIXELS = 1 << 20


def picture() -> np.ndarray:
    """A 32×32 RGB picture with structure (gradients and a bright square), uint8."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    rgb[8:20, 10:24] = (250, 30, 120)
    return rgb


def png(samples: np.ndarray, bit_depth: int, color_type: int,
        palette: np.ndarray | None = None) -> bytes:
    """A PNG written field by field, so that any bit depth and colour type can be made.

    ``samples`` is H×W×channels (or H×W) of integers below 2**bit_depth."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    height, width = samples.shape[:2]
    flat = samples.reshape(height, -1)
    if bit_depth == 16:
        rows = [flat[y].astype(">u2").tobytes() for y in range(height)]
    elif bit_depth == 8:
        rows = [flat[y].astype("u1").tobytes() for y in range(height)]
    else:
        per_byte = 8 // bit_depth
        rows = []
        for y in range(height):
            values = np.zeros(-(-flat.shape[1] // per_byte) * per_byte, np.uint8)
            values[: flat.shape[1]] = flat[y]
            packed = values.reshape(-1, per_byte)
            shifts = bit_depth * np.arange(per_byte - 1, -1, -1)
            rows.append((packed << shifts).sum(axis=1).astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header)
    if palette is not None:
        body += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    body += chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows)))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def decoded(data: bytes) -> np.ndarray:
    return decode_image(data, 0, MAX_PIXELS)


def test_16_bit_pngs_decode_to_their_8_bit_pixels() -> None:
    rgb = picture()
    wide = rgb.astype(np.uint16) * 257  # 8-bit v as 16-bit: the same intensity
    luma = gray(rgb).astype(np.uint16)
    alpha = np.full((HEIGHT, WIDTH, 1), 200, np.uint16)
    np.testing.assert_array_equal(decoded(png(luma * 257, 16, 0)),
                                  np.repeat(luma[..., None], 3, axis=2))
    np.testing.assert_array_equal(decoded(png(wide, 16, 2)), rgb)
    np.testing.assert_array_equal(
        decoded(png(np.concatenate([luma[..., None] * 257, alpha * 257], axis=2), 16, 4)),
        np.repeat(luma[..., None], 3, axis=2))
    np.testing.assert_array_equal(decoded(png(np.concatenate([wide, alpha * 257], axis=2), 16, 6)),
                                  rgb)


def test_16_bit_gray_keeps_its_high_byte() -> None:
    """Values that are not multiples of 257 map as 16-bit colour does: v >> 8."""
    values = np.arange(HEIGHT * WIDTH, dtype=np.uint16).reshape(HEIGHT, WIDTH) * 63 + 5
    got = decoded(png(values, 16, 0))
    np.testing.assert_array_equal(got[..., 0], (values >> 8).astype(np.uint8))
    wide = np.repeat(values[..., None], 3, axis=2)
    np.testing.assert_array_equal(decoded(png(wide, 16, 2)), got)


@pytest.mark.parametrize("bit_depth", [1, 2, 4, 8])
def test_low_bit_depth_gray_and_palette_pngs_decode(bit_depth: int) -> None:
    levels = 2**bit_depth
    rng = np.random.default_rng(bit_depth)
    samples = rng.integers(0, levels, (HEIGHT, WIDTH), dtype=np.uint8)
    scale = 255 // (levels - 1)
    np.testing.assert_array_equal(decoded(png(samples, bit_depth, 0))[..., 0], samples * scale)
    palette = rng.integers(0, 256, (levels, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decoded(png(samples, bit_depth, 3, palette)), palette[samples])


def test_jpeg_decodes_in_every_colour_mode() -> None:
    rgb = picture()
    for mode in ("RGB", "L", "CMYK"):
        out = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(out, format="JPEG", quality=95)
        got = decoded(out.getvalue())
        assert got.shape == (HEIGHT, WIDTH, 3) and got.dtype == np.uint8
        expected = np.asarray(Image.fromarray(rgb).convert(mode).convert("RGB"), np.float32)
        assert np.abs(got.astype(np.float32) - expected).mean() < 8, mode


def encoded(rgb: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=fmt)
    return out.getvalue()


OTHER_FORMATS = ["BMP", "GIF", "TIFF", "WEBP", "ICO", "PPM"]


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_formats_other_than_png_and_jpeg_are_refused(fmt: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decoded(encoded(picture(), fmt))
    assert "PNG" in str(caught.value) and "JPEG" in str(caught.value)


# ---- through the server ----------------------------------------------------------------------


def predict(stub, images: list[bytes]) -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(model="tiny", input=pb.Input(
        images=pb.EncodedImages(images=images))), timeout=30)


def test_16_bit_png_predicts_as_its_8_bit_version(stub) -> None:
    """The picture as 8-bit RGB, 16-bit RGB and (as gray) 8- and 16-bit gray PNGs: the two
    colour versions give one prediction and the two gray ones another."""
    rgb = picture()
    luma = gray(rgb)
    reply = predict(stub, [
        png(rgb, 8, 2), png(rgb.astype(np.uint16) * 257, 16, 2),
        png(luma, 8, 0), png(luma.astype(np.uint16) * 257, 16, 0),
    ])
    logits = np.frombuffer(reply.logits.data, np.float32).reshape(4, -1)
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(logits[2], logits[3])
    # A white picture predicts otherwise: the 16-bit gray one is not read as white.
    white = predict(stub, [png(np.full((HEIGHT, WIDTH), 255, np.uint8), 8, 0)])
    assert not np.array_equal(np.frombuffer(white.logits.data, np.float32), logits[3])


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_server_refuses_other_formats_naming_the_accepted_ones(stub, fmt: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(stub, [png(picture(), 8, 2), encoded(picture(), fmt)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "image 1" in details and "PNG" in details and "JPEG" in details


@pytest.mark.parametrize("keep", [12, 40, 0.5, 0.9])
def test_truncated_png_is_refused_without_internals(stub, keep: float) -> None:
    """Cut inside the header (12 and 40 bytes), in the pixel data and near its end."""
    data = png(picture(), 8, 2)
    with pytest.raises(grpc.RpcError) as caught:
        predict(stub, [data[: keep if isinstance(keep, int) else int(len(data) * keep)]])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "image 0" in details
    assert "BytesIO" not in details and "0x" not in details, details


def test_garbage_is_refused_without_internals(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(stub, [b"definitely not an image"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "PNG" in details and "BytesIO" not in details and "0x" not in details, details
