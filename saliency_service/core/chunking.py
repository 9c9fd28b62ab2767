"""How work is cut into passes: power-of-two chunks, so a model sees few batch shapes."""

from __future__ import annotations

from collections.abc import Iterator

# The most network inputs one pass takes. Chunks are powers of two up to it, so a model
# only ever sees a handful of batch shapes, and the warm-up runs each of them before the
# model reports ready: a new shape costs a first run several times a steady one (oneDNN
# builds its kernels per shape, ONNX Runtime plans per shape).
MAX_CHUNK_ROWS = 32


def chunks(total: int, size: int) -> Iterator[slice]:
    """Slices covering range(total), each a power of two long: the largest one not above
    ``size`` as often as it fits, then the rest in falling powers of two (20 in chunks of
    at most 32 → 16, 4), so that every chunk has one of a few shapes."""
    step = 1 << (max(1, size).bit_length() - 1)
    start = 0
    while start < total:
        while start + step > total:
            step >>= 1
        yield slice(start, start + step)
        start += step


def even_chunks(total: int, size: int) -> Iterator[slice]:
    """Slices covering range(total), ``size`` long but the last: for a remote model, whose
    chunks become calls of ``size`` inputs and need no few shapes."""
    for start in range(0, total, max(1, size)):
        yield slice(start, min(start + size, total))


def chunk_shapes(largest: int) -> list[int]:
    """The chunk lengths ``chunks`` can yield when no chunk is above ``largest``: 1, 2, 4, …"""
    return [1 << k for k in range(max(1, largest).bit_length())]
