"""float32 arrays as JSON numbers, written by numpy instead of one Python float at a time.

Nine significant digits name a float32 exactly: the decimal is within 5e-9 of the value
(relative), while a float32's neighbours are at least 6e-8 away, so a parser that reads it
to float32 directly or through float64 (as JSON libraries do) gets the same float32 back.
Each number is a fixed-width record, ``-123456789e-09,`` (a space for the sign of a
positive number; a zero is ``0.0`` and spaces), so the whole text is one byte array; JSON allows
the spaces between tokens.
"""

from __future__ import annotations

import json

import numpy as np

DIGITS = 9
# sign, DIGITS digits, "e", exponent sign, two exponent digits, ","
RECORD = 1 + DIGITS + 4 + 1
SPACE, MINUS, PLUS, COMMA, ZERO = (ord(c) for c in " -+,0")


def json_array(values: np.ndarray, nested: bool = True) -> bytes:
    """The JSON text of float32 ``values``: nested lists in their shape, or one flat list.

    Values that are not finite (NaN and infinities, which JSON has no numbers for) are
    written as Python's ``json`` writes them.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0 or values.ndim == 0 or not np.isfinite(values).all():
        return json.dumps(values.tolist() if nested else values.reshape(-1).tolist()).encode()
    records = _records(values.reshape(-1))
    if not nested or values.ndim == 1:
        return b"[" + records.tobytes()[:-1] + b"]"
    return _nested(records, values.shape)


def _records(flat: np.ndarray) -> np.ndarray:
    """One RECORD-byte row per value (count × RECORD), each ending in a comma."""
    count = flat.size
    magnitude = np.abs(flat).astype(np.float64)
    zero = magnitude == 0
    exponent = np.floor(np.log10(np.where(zero, 1.0, magnitude).astype(np.float32)))
    exponent = exponent.astype(np.int16)
    mantissa = _mantissa(magnitude, exponent)
    # log10 in float32 may miss by one next to a power of ten: the mantissa shows it.
    low = ~zero & (mantissa < 10 ** (DIGITS - 1))
    high = mantissa >= 10 ** DIGITS
    if low.any() or high.any():
        exponent += high.astype(np.int16) - low.astype(np.int16)
        mantissa = _mantissa(magnitude, exponent)
    mantissa = mantissa.astype(np.uint32)  # at most DIGITS digits now: faster division
    text = np.empty((RECORD, count), np.uint8)
    text[0] = np.where(np.signbit(flat), MINUS, SPACE)
    for position in range(DIGITS, 0, -1):
        mantissa, digit = np.divmod(mantissa, 10)
        np.add(digit, ZERO, out=text[position], casting="unsafe")
    power = exponent - (DIGITS - 1)
    text[DIGITS + 1] = ord("e")
    text[DIGITS + 2] = np.where(power < 0, MINUS, PLUS)
    tens, units = np.divmod(np.abs(power), 10)
    np.add(tens, ZERO, out=text[DIGITS + 3], casting="unsafe")
    np.add(units, ZERO, out=text[DIGITS + 4], casting="unsafe")
    text[RECORD - 1] = COMMA
    if zero.any():
        text[1:4, zero] = np.frombuffer(b"0.0", np.uint8)[:, None]  # -0.0 keeps its sign
        text[4:RECORD - 1, zero] = SPACE
    return np.ascontiguousarray(text.T)


def _mantissa(magnitude: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """The DIGITS-digit integer of each value at its decimal exponent (rounded)."""
    scale = np.power(10.0, (DIGITS - 1) - exponent.astype(np.float64))
    return np.rint(magnitude * scale).astype(np.int64)


def _nested(records: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """The records as nested lists: each innermost row, then its closing and the next
    row's opening brackets (padded with spaces to a fixed width)."""
    depth = len(shape)
    row = shape[-1]
    rows = records.shape[0] // row
    width = row * RECORD
    lines = np.empty((rows, width + 2 * depth), np.uint8)
    lines[:, :width] = records.reshape(rows, width)
    lines[:, width - 1] = ord("]")
    # How many lists end with each row: its own, and each outer one it completes.
    ending = np.ones(rows, np.int64)
    index = np.arange(1, rows + 1)
    stride = 1
    for size in reversed(shape[:-1]):
        stride *= size
        ending += index % stride == 0
    tail = lines[:, width:]
    for slot in range(depth - 1):
        tail[:, slot] = np.where(ending > slot + 1, ord("]"), SPACE)
    tail[:, depth - 1] = COMMA
    for slot in range(depth):
        tail[:, depth + slot] = np.where(ending > slot, ord("["), SPACE)
    text = lines.tobytes()
    return b"[" * depth + text[:len(text) - depth - 1]
