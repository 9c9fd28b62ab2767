"""Each ``--max-*`` limit governs exactly the parameter it names, on the real server.

The cases come from the registry (every parameter field that declares a limit), so a new
method's limits are covered without editing this file. For each limit alone: with every
limit at a low value a request just above it is refused naming that flag; with that one
limit raised the same request runs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from saliency_service.core.params import flag, limits_of
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.codec import method_enum
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import TINY_SHAPE, RunningServer, make_config
from tests.onnx_models import box_detector, write_package

LOW = 4
CASES = [(handler, field, limit) for handler in registry.handlers()
         for field, limit in limits_of(handler.Params).items()]
LIMIT_NAMES = sorted({limit for _, _, limit in CASES})


def request_over(handler: registry.Handler, field: str) -> pb.ExplainRequest:
    """A small request with ``field`` one above LOW and every other limited field at its
    default or LOW, whichever is smaller."""
    params = getattr(pb.ExplainRequest(), handler.params_field).__class__()
    defaults = {f.name: f.default for f in dataclasses.fields(handler.Params)}
    for other in limits_of(handler.Params):
        setattr(params, other, min(defaults[other], LOW))
    setattr(params, field, LOW + 1)
    request = pb.ExplainRequest(
        model="detector" if handler.detectors_only else "tiny", method=method_enum(handler.name),
        input=pb.Input(tensor=array_to_tensor(np.zeros((1, *TINY_SHAPE), np.float32))))
    getattr(request, handler.params_field).CopyFrom(params)
    return request


@pytest.fixture(scope="module")
def models(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classifier and a post-NMS detector, for the methods only detectors offer."""
    root = tmp_path_factory.mktemp("limits")
    shutil.copytree(repository / "tiny", root / "tiny")
    write_package(box_detector(TINY_SHAPE[-1]), root, "detector", labels=("object",),
                  outputs={"kind": "detection", "boxes": "boxes", "scores": "scores",
                           "classes": "classes"})
    return root


@pytest.fixture(scope="module")
def low_server(models: Path) -> RunningServer:
    running = RunningServer(make_config(models, **dict.fromkeys(LIMIT_NAMES, LOW))).start()
    yield running
    running.stop()


def test_every_limit_flag_governs_a_parameter() -> None:
    assert {"max_samples", "max_steps", "max_masks", "max_population",
            "max_generations"} <= set(LIMIT_NAMES)


@pytest.mark.parametrize(("handler", "field", "limit"), CASES,
                         ids=[f"{h.name}.{f}" for h, f, _ in CASES])
def test_a_limit_alone_admits_and_refuses(models: Path, low_server: RunningServer,
                                          handler: registry.Handler, field: str,
                                          limit: str) -> None:
    request = request_over(handler, field)
    with grpc.insecure_channel(low_server.address) as channel, pytest.raises(
            grpc.RpcError) as refused:
        pb_grpc.ExplainerStub(channel).Explain(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert flag(limit) in refused.value.details()
    assert f"{handler.params_field}.{field}" in refused.value.details()
    raised = dict.fromkeys(LIMIT_NAMES, LOW) | {limit: LOW + 1}
    server = RunningServer(make_config(models, **raised)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            reply = pb_grpc.ExplainerStub(channel).Explain(request, timeout=60)
        assert reply.saliency.shape[0] == 1
    finally:
        server.stop()


def test_limits_are_declared_on_dataclass_fields() -> None:
    for handler in registry.handlers():
        assert dataclasses.is_dataclass(handler.Params)


def test_limits_below_a_methods_minimum_leave_the_model_ready(repository: object) -> None:
    """Every limit at 1 (below VarGrad's 2 samples and DE-CAM's 4 candidates): the warm-up
    skips what no request could use, the model is ready and serves the rest, and a request
    for a skipped method is refused naming the flag to raise."""
    running = RunningServer(make_config(repository, **dict.fromkeys(LIMIT_NAMES, 1))).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            model = stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=30)
            assert model.status.ready, model.status.error
            tensor = array_to_tensor(np.zeros((1, *TINY_SHAPE), np.float32))
            ok = stub.Explain(pb.ExplainRequest(model="tiny", method=pb.METHOD_GRADCAM,
                                                input=pb.Input(tensor=tensor)), timeout=60)
            assert ok.saliency.shape
            request = pb.ExplainRequest(model="tiny", method=pb.METHOD_VARGRAD,
                                        input=pb.Input(tensor=tensor))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Explain(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "--max-samples" in refused.value.details()
    finally:
        running.stop()
