"""The Python client takes a method's parameters as keyword arguments, checked against the
method's params message before a request is sent; against a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from saliency_service.client.client import SaliencyClient
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.method_params import ParamError, params_message

PIXELS = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def client(server) -> Iterator[SaliencyClient]:
    with SaliencyClient(server.address, timeout=60) as connected:
        yield connected


def test_parameters_by_keyword_reach_the_method(client: SaliencyClient) -> None:
    result = client.explain("tiny", "integrated_gradients", tensor=PIXELS, steps=8,
                            baseline="blur", return_overlay=True)
    assert (result.cost.forward_passes, result.cost.backward_passes) == (10, 8)
    assert len(result.overlays) == 1
    same = client.explain("tiny", "integrated_gradients", tensor=PIXELS,
                          params=pb.IntegratedGradientsParams(steps=8,
                                                              baseline=pb.BASELINE_BLUR))
    np.testing.assert_array_equal(result.maps, same.maps)
    default = client.explain("tiny", "integrated_gradients", tensor=PIXELS)
    assert default.cost.backward_passes == 32  # the default steps


def test_values_are_typed_from_python_or_text() -> None:
    assert params_message("decam", {"grid": "4", "refine": "false", "mutation": 0.5,
                                    "strategy": "rand1bin"}) == pb.DecamParams(
        grid=4, refine=False, mutation=0.5, strategy="rand1bin")
    assert params_message("fastcam", {"weights": "1,2,3", "normalization": "gamma_cdf"}) == (
        pb.MultiScaleParams(weights=[1, 2, 3], normalization=pb.NORMALIZATION_GAMMA_CDF))
    assert params_message("smoe_scale", {"weights": [0.5, 0.5]}).weights == [0.5, 0.5]
    assert params_message("gradcam", {}) is None


@pytest.mark.parametrize(("method", "values", "message"), [
    ("integrated_gradients", {"stepz": 8},
     "integrated_gradients has no parameter 'stepz'; it takes: steps, baseline, rule"),
    ("integrated_gradients", {"baseline": "sky"},
     "integrated_gradients.baseline='sky' is not offered; valid values: black, blur"),
    ("integrated_gradients", {"steps": "many"}, "integrated_gradients.steps='many' is not an"),
    ("integrated_gradients", {"steps": 8.5}, "is not an integer"),
    ("decam", {"refine": "maybe"}, "decam.refine='maybe' is not a boolean"),
    ("vanilla_gradient", {"steps": 8}, "vanilla_gradient has no parameter 'steps'; it takes none"),
    ("shap", {"steps": 8}, "unknown method 'shap'; valid methods: auto, vanilla_gradient"),
])
def test_mistakes_name_the_valid_choices(method: str, values: dict, message: str) -> None:
    with pytest.raises(ParamError) as raised:
        params_message(method, values)
    assert message in str(raised.value)


def test_the_client_refuses_mistakes_before_sending(client: SaliencyClient) -> None:
    with pytest.raises(ParamError, match="it takes: samples, noise_level"):
        client.explain("tiny", "smoothgrad", tensor=PIXELS, steps=8)
    with pytest.raises(ParamError, match="not both"):
        client.explain("tiny", "smoothgrad", tensor=PIXELS, samples=4,
                       params=pb.SmoothGradParams(samples=4))
    with pytest.raises(ValueError, match="valid methods"):
        client.explain("tiny", "shap", tensor=PIXELS)
