"""float32 arrays written as JSON numbers by numpy (``core.json_numbers``): every float32
reads back bit for bit through Python's json and through orjson (KServe's parser), in the
array's nesting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from saliency_service.core.json_numbers import json_array
from tests.kserve_env import run_in_kserve


def hard_values() -> np.ndarray:
    """Random bit patterns (subnormals included), the powers of ten and their neighbours,
    both zeros and the extremes."""
    bits = np.random.default_rng(5).integers(0, 2 ** 32, size=400_000, dtype=np.uint64)
    random = bits.astype(np.uint32).view(np.float32)
    tens = np.array([10.0 ** k for k in range(-45, 39)], np.float32)
    tens = tens[(tens > 0) & np.isfinite(tens)]
    edges = np.array([0.0, -0.0, 1.0, -1.0, np.finfo(np.float32).max, np.finfo(np.float32).min,
                      np.finfo(np.float32).tiny, np.float32(1e-45), 0.1, 255.0, 1 / 3],
                     np.float32)
    values = np.concatenate([random, tens, np.nextafter(tens, np.float32(0)),
                             np.nextafter(tens, np.float32(np.inf)), edges, -tens])
    return values[np.isfinite(values)]


def test_every_value_reads_back_bit_for_bit() -> None:
    values = hard_values()
    text = json_array(values, nested=False)
    back = np.asarray(json.loads(text), dtype=np.float64).astype(np.float32)
    assert np.array_equal(back.view(np.uint32), values.view(np.uint32))


def test_orjson_reads_the_same_values(tmp_path: Path) -> None:
    values = hard_values()
    (tmp_path / "values.json").write_bytes(json_array(values, nested=False))
    done = run_in_kserve(f"""
        import numpy as np, orjson
        text = open({str(tmp_path / "values.json")!r}, "rb").read()
        np.save({str(tmp_path / "back.npy")!r}, np.asarray(orjson.loads(text), np.float32))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    back = np.load(tmp_path / "back.npy")
    assert np.array_equal(back.view(np.uint32), values.view(np.uint32))


@pytest.mark.parametrize("shape", [(7,), (2, 3), (1, 1, 1), (2, 1, 3, 4), (3, 2, 2, 1, 2)])
def test_nesting_is_the_arrays(shape: tuple[int, ...]) -> None:
    values = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    values.reshape(-1)[0] = 0.0
    nested = np.asarray(json.loads(json_array(values)), dtype=np.float32)
    assert nested.shape == shape and np.array_equal(nested, values)
    flat = np.asarray(json.loads(json_array(values, nested=False)), dtype=np.float32)
    assert flat.shape == (values.size,) and np.array_equal(flat, values.reshape(-1))


@pytest.mark.parametrize("values", [np.zeros((0, 3), np.float32),
                                    np.array([1.0, np.nan, np.inf], np.float32)])
def test_empty_and_non_finite_arrays_are_written_as_json_writes_them(
        values: np.ndarray) -> None:
    assert json_array(values) == json.dumps(values.tolist()).encode()


def test_text_is_shorter_than_python_floats() -> None:
    values = np.random.default_rng(2).normal(size=(4, 3, 8, 8)).astype(np.float32)
    assert len(json_array(values)) < len(json.dumps(values.tolist()))
