"""Conversions between the wire format and arrays: tensors, encoded images, display pixels.

Decoding validates everything a client can get wrong (shape, dtype, byte
length, NaN/Inf, undecodable images) and says what was expected.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np

from saliency_service.core.errors import InvalidInput, OverLimit
from saliency_service.proto import explainer_pb2 as pb

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}


# More dimensions than any input has (model inputs are 4-D), and below numpy's own limit.
MAX_TENSOR_DIMS = 32


def shape_text(shape: list[int], shown: int = 8) -> str:
    """A shape for a message: in full when short, else its first dimensions and its rank."""
    if len(shape) <= shown:
        return str(list(shape))
    return f"[{', '.join(str(d) for d in shape[:shown])}, … ({len(shape)} dimensions)]"


def tensor_to_array(tensor: pb.Tensor) -> np.ndarray:
    """Decodes a Tensor message, checking dtype, shape and byte length."""
    if tensor.dtype not in _DTYPES:
        names = ", ".join(pb.DType.Name(d) for d in _DTYPES)
        raise InvalidInput(f"tensor dtype {tensor.dtype} is not supported; use one of {names}")
    shape = list(tensor.shape)
    if len(shape) > MAX_TENSOR_DIMS:
        raise InvalidInput(f"tensor shape {shape_text(shape)} has {len(shape)} dimensions; "
                           f"at most {MAX_TENSOR_DIMS} are accepted (model inputs are 4-D)")
    if not shape or any(d <= 0 for d in shape):
        raise InvalidInput(f"tensor shape {shape} must be non-empty with every dimension > 0")
    dtype = _DTYPES[tensor.dtype]
    if math.prod(shape) > (1 << 40):
        raise InvalidInput(f"tensor shape {shape} is absurdly large")
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it: read once
    if len(data) != expected:
        raise InvalidInput(
            f"tensor data has {len(data)} bytes but shape {shape} of "
            f"{pb.DType.Name(tensor.dtype)} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encodes an array as a little-endian float32 (or its own supported dtype) Tensor."""
    array = np.ascontiguousarray(array)
    for code, dtype in _DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return pb.Tensor(
                shape=list(array.shape), dtype=code, data=array.astype(dtype, copy=False).tobytes()
            )
    return array_to_tensor(array.astype(np.float32))


# What the server decodes. Others are refused before any decoder runs: each format Pillow
# reads is more decoder code exposed to client bytes, and the README documents these two.
ACCEPTED_FORMATS = ("PNG", "JPEG")
_SIGNATURES = (
    (re.compile(rb"BM"), "BMP"),
    (re.compile(rb"GIF8[79]a"), "GIF"),
    (re.compile(rb"II\*\0|MM\0\*"), "TIFF"),
    (re.compile(rb"RIFF....WEBP", re.DOTALL), "WebP"),
    (re.compile(rb"\0\0[\1\2]\0"), "ICO"),
    (re.compile(rb"P[1-7]\s"), "PPM/PGM/PBM"),
    (re.compile(rb"\0\0\0\x0cjP  |\xff\x4f\xff\x51"), "JPEG 2000"),
    (re.compile(rb"....ftyp(heic|heix|avif|mif1)", re.DOTALL), "HEIF/AVIF"),
)
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
# Modes holding more than 8 bits per sample: Pillow's 16-bit grayscale. (16-bit colour
# PNGs already arrive as 8-bit RGB(A), their high bytes.)
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def _format_name(data: bytes) -> str | None:
    """The format of an encoded image that is not PNG or JPEG, when it is a known one."""
    for signature, name in _SIGNATURES:
        if signature.match(data):
            return name
    return None


def pillow() -> Any:
    """Pillow's ``Image`` module; a client-only install names the extra that brings it."""
    try:
        from PIL import Image  # noqa: PLC0415 - the client decodes no images
    except ImportError as exc:
        raise ImportError("decoding and drawing images needs Pillow: "
                          "pip install 'saliency-service[draw]'") from exc
    return Image


def _to_rgb(image: Any) -> np.ndarray:
    """Any PNG or JPEG mode → uint8 H×W×3 RGB; 16-bit gray keeps its high byte, as
    Pillow does for 16-bit colour (converting it directly would clip it to white)."""
    if image.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(image).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, index: int, max_pixels: int) -> np.ndarray:
    """Decodes one PNG (any bit depth and colour type) or JPEG into uint8 H×W×3 RGB.

    Anything else is refused with INVALID_ARGUMENT naming the accepted formats."""
    image_module = pillow()
    try:
        image = image_module.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except image_module.UnidentifiedImageError as exc:
        if data.startswith((b"\x89PNG", b"\xff\xd8\xff")):
            kind = "PNG" if data.startswith(b"\x89PNG") else "JPEG"
            raise InvalidInput(f"image {index} is a {kind} whose header is cut short or "
                               "corrupt") from exc
        found = _format_name(data[:16])
        what = f"in {found} format" if found else "neither PNG nor JPEG"
        raise InvalidInput(
            f"image {index} is {what}; the accepted formats are PNG and JPEG") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the decoder meets is in the client's bytes
        raise InvalidInput(f"image {index} could not be decoded: {_clean(exc)}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise OverLimit(
            f"image {index} is {width}×{height} = {width * height} pixels; "
            f"the limit max_pixels is {max_pixels} (--max-pixels)"
        )
    try:
        return _to_rgb(image)
    except Exception as exc:  # noqa: BLE001 - as above: a corrupt or truncated image
        raise InvalidInput(
            f"image {index} could not be decoded as {image.format}: {_clean(exc)}") from exc


def _clean(exc: BaseException) -> str:
    """A decoder's error for a message: without object reprs (``<… at 0x…>``)."""
    text = _OBJECT_REPR.sub("the image", str(exc)).strip()
    return text or type(exc).__name__


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 H×W×3 image (no-op when the size already matches)."""
    if image.shape[:2] == (height, width):
        return image
    image_module = pillow()
    return np.asarray(image_module.fromarray(image).resize((width, height),
                                                          image_module.BILINEAR))


def resize_float(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float H×W plane (a map) to float32 ``height``×``width``; the
    weights are convex, so a map in [0, 1] stays in it."""
    plane = np.ascontiguousarray(plane, dtype=np.float32)
    if plane.shape == (height, width):
        return plane
    image_module = pillow()
    return np.asarray(image_module.fromarray(plane).resize(
        (width, height), image_module.BILINEAR), dtype=np.float32)
