"""Every gradient-family handler through a real server: registry × batch size × target."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import method_enum
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import TINY_SHAPE

FAMILY = [h for h in registry.handlers() if h.uses_gradients]
SAMPLES = 3
STEPS = 4
# Small settings so the whole matrix stays fast; the defaults are tested in-process.
SMALL_PARAMS = {
    "smoothgrad": pb.SmoothGradParams(samples=SAMPLES),
    "vargrad": pb.SmoothGradParams(samples=SAMPLES, noise_level=0.2),
    "guided_absolutegrad": pb.GuidedAbsoluteGradParams(samples=SAMPLES, quantile=0.5),
    "integrated_gradients": pb.IntegratedGradientsParams(
        steps=STEPS, rule=pb.QUADRATURE_RIEMANN_MIDDLE, baseline=pb.BASELINE_BLUR
    ),
}


def torch_passes(name: str) -> tuple[int, int] | None:
    """(forward, backward) torch passes per image for the settings above, where known."""
    if name in ("smoothgrad", "vargrad", "guided_absolutegrad"):
        return SAMPLES, SAMPLES
    if name == "integrated_gradients":
        return STEPS + 1, STEPS
    if name in ("vanilla_gradient", "input_x_gradient", "guided_backprop", "gradcam",
                "gradcam_plus_plus", "xgradcam"):
        return 1, 1
    return None


def request_for(name: str, method: int, batch: int, target: str) -> pb.ExplainRequest:
    x = np.random.default_rng(batch).normal(size=(batch, *TINY_SHAPE)).astype(np.float32)
    request = pb.ExplainRequest(
        model="tiny",
        method=method,
        seed=11,
        return_raw=True,
        input=pb.Input(tensor=array_to_tensor(x)),
    )
    if target == "class":
        request.target.class_index = 3
    if name in SMALL_PARAMS:
        getattr(request, name).CopyFrom(SMALL_PARAMS[name])
    return request


def test_the_whole_family_is_registered() -> None:
    assert {h.name for h in FAMILY} >= {
        "vanilla_gradient",
        "input_x_gradient",
        "smoothgrad",
        "vargrad",
        "integrated_gradients",
        "guided_backprop",
        "guided_absolutegrad",
        "gradcam",
        "gradcam_plus_plus",
        "xgradcam",
    }


@pytest.mark.parametrize("target", ["predicted", "class"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("handler", FAMILY, ids=lambda h: h.name)
def test_explain_over_grpc(stub, handler, batch: int, target: str) -> None:
    request = request_for(handler.name, method_enum(handler.name), batch, target)
    reply = stub.Explain(request, timeout=60)
    maps = tensor_to_array(reply.saliency)
    assert maps.dtype == np.float32 and maps.shape == (batch, *TINY_SHAPE[1:])
    assert maps.min() >= 0 and maps.max() <= 1 and np.isfinite(maps).all()
    assert maps.max() > 0
    predicted = [p.top[0].index for p in reply.predictions]
    assert list(reply.targets) == (predicted if target == "predicted" else [3] * batch)
    # One ONNX Runtime forward per image for the prediction, then the method's torch passes.
    known = torch_passes(handler.name)
    if known is None:  # a method this file does not know: at least one pass of each kind
        assert reply.cost.forward_passes >= 2 * batch and reply.cost.backward_passes >= batch
    else:
        assert reply.cost.forward_passes == batch + known[0] * batch
        assert reply.cost.backward_passes == known[1] * batch
    assert reply.cost.method == method_enum(handler.name)
    raw = tensor_to_array(reply.raw)
    assert raw.shape[0] == batch and np.isfinite(raw).all()
    if handler.name == "integrated_gradients":
        assert reply.diagnostics["completeness_error"] >= 0


def test_equal_seeds_give_equal_maps_over_grpc(stub) -> None:
    first = stub.Explain(request_for("smoothgrad", pb.METHOD_SMOOTHGRAD, 2, "class"), timeout=60)
    second = stub.Explain(request_for("smoothgrad", pb.METHOD_SMOOTHGRAD, 2, "class"), timeout=60)
    assert first.saliency.data == second.saliency.data
    other = request_for("smoothgrad", pb.METHOD_SMOOTHGRAD, 2, "class")
    other.seed = 12
    assert stub.Explain(other, timeout=60).saliency.data != first.saliency.data


@pytest.mark.parametrize(
    ("field", "params", "message"),
    [
        ("smoothgrad", pb.SmoothGradParams(samples=0), "samples must be >= 1"),
        ("guided_absolutegrad", pb.GuidedAbsoluteGradParams(quantile=2.0), "quantile must be <= 1"),
        ("integrated_gradients", pb.IntegratedGradientsParams(steps=100_000), "server limit"),
        ("gradcam", pb.GradCamParams(layer="fc"), "layer 'fc' (tensor 'logits') is 2-D"),
    ],
)
def test_bad_parameters_are_invalid_argument(stub, field: str, params, message: str) -> None:
    method = method_enum(field)
    request = request_for(field, method, 1, "predicted")
    getattr(request, field).CopyFrom(params)
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
