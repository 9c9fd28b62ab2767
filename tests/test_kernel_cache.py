"""The server asks oneDNN to keep enough compiled kernels, and an explicit setting wins."""

from __future__ import annotations

import os

import pytest

from saliency_service.serving.onednn_cache import CAPACITY, VARIABLE, reserve_kernel_cache


def test_the_capacity_is_raised_when_the_environment_is_silent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VARIABLE, raising=False)
    assert reserve_kernel_cache() == str(CAPACITY)
    assert os.environ[VARIABLE] == str(CAPACITY)
    assert CAPACITY > 1024  # oneDNN's own default


def test_an_explicit_capacity_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "2048")
    assert reserve_kernel_cache() == "2048"
    assert os.environ[VARIABLE] == "2048"
