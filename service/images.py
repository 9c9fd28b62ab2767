"""Conversions between the wire format and arrays: tensors, encoded images, overlays.

Decoding validates everything a client can get wrong (shape, dtype, byte
length, NaN/Inf, undecodable images) and says what was expected.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from saliency.v1 import explainer_pb2 as pb
from service.errors import InvalidInput

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


def decode_image(data: bytes, index: int, max_pixels: int) -> np.ndarray:
    """Decodes one PNG/JPEG into uint8 H×W×3 RGB."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidInput(
                f"image {index} is {width}×{height} = {width * height} pixels; "
                f"the limit max_pixels is {max_pixels}"
            )
        rgb = image.convert("RGB")
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"image {index} could not be decoded as PNG or JPEG: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 H×W×3 image (no-op when the size already matches)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def to_uint8_rgb(model_input: np.ndarray, mean: list[float], std: list[float],
                 value_range: tuple[float, float]) -> np.ndarray:
    """Inverts normalization: N×C×H×W model input → uint8 N×H×W×3 for display."""
    mean_a = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    raw = model_input * std_a + mean_a
    low, high = value_range
    unit = np.clip((raw - low) / max(high - low, 1e-12), 0.0, 1.0)
    if unit.shape[1] == 1:
        unit = np.repeat(unit, 3, axis=1)
    return (unit[:, :3].transpose(0, 2, 3, 1) * 255.0 + 0.5).astype(np.uint8)


def _jet(values: np.ndarray) -> np.ndarray:
    """A dependency-free jet-like colormap: [0,1] → uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255.0).astype(np.uint8)


def overlay_png(image: np.ndarray, saliency: np.ndarray, caption: str = "",
                alpha: float = 0.5) -> bytes:
    """Blends a [0,1] map over a uint8 H×W×3 image, adds a colour bar and caption; PNG bytes."""
    heat = _jet(saliency)
    blended = (image.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha)
    canvas = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    if caption:
        width, height = canvas.size
        bar_height = 14
        legend = np.zeros((bar_height * 2, width, 3), np.uint8)
        legend[:bar_height] = _jet(np.linspace(0.0, 1.0, width))[None]
        framed = Image.new("RGB", (width, height + 2 * bar_height))
        framed.paste(canvas, (0, 0))
        framed.paste(Image.fromarray(legend), (0, height))
        ImageDraw.Draw(framed).text((2, height + bar_height), caption, fill=(255, 255, 255))
        canvas = framed
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
