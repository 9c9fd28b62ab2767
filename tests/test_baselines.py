"""Baselines mean the same thing for every method that removes evidence."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_service.core.repository import InputSpec
from saliency_service.methods._utils.baselines import BASELINES, make_baseline
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import TINY_SHAPE

SPEC = InputSpec(shape=(-1, *TINY_SHAPE), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))


@pytest.mark.parametrize("kind", BASELINES)
def test_every_baseline_has_the_input_shape_and_is_finite(kind: str) -> None:
    inputs = np.random.default_rng(0).normal(size=(2, *TINY_SHAPE)).astype(np.float32)
    baseline = make_baseline(kind, inputs, SPEC, np.random.default_rng(1))
    assert baseline.shape == inputs.shape and np.isfinite(baseline).all()


def test_black_is_the_bottom_of_the_value_range_and_zero_is_the_mean() -> None:
    inputs = np.ones((1, *TINY_SHAPE), np.float32)
    black = make_baseline("black", inputs, SPEC)
    np.testing.assert_allclose(black[0, :, 0, 0], [-2.0, -2.0, -3.0])
    assert not make_baseline("zero", inputs, SPEC).any()


def completeness(stub, steps: int) -> float:
    request = pb.ExplainRequest(
        model="tiny", method=pb.METHOD_INTEGRATED_GRADIENTS,
        input=pb.Input(tensor=array_to_tensor(
            np.random.default_rng(0).normal(size=(2, *TINY_SHAPE)).astype(np.float32))),
        integrated_gradients=pb.IntegratedGradientsParams(steps=steps,
                                                          baseline=pb.BASELINE_ZERO))
    reply = stub.Explain(request, timeout=60)
    # Prediction forward + steps forward/backward per image, and f(zero) once per loaded
    # model (the same image for both items and every later request).
    assert reply.cost.forward_passes - (2 + 2 * steps) in (0, 1)
    return reply.diagnostics["completeness_error_relative"]


def test_integrated_gradients_from_zero_converges_with_steps(stub) -> None:
    coarse, fine = completeness(stub, 4), completeness(stub, 128)
    assert fine < coarse and fine < 0.05
