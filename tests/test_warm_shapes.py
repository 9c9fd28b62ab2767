"""Chunks have power-of-two lengths, and a warmed model meets no new batch shape: a server
that answered requests with many sample counts, step counts and batch sizes built no oneDNN
kernel that the warm-up alone did not build (counted from oneDNN's own log)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.common import ServerProcess
from saliency_service.core.chunking import MAX_CHUNK_ROWS, chunk_shapes, chunks
from saliency_service.core.repository import ModelHandle
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from tests.architecture_matrix import MATRIX, build

RESNET = next(a for a in MATRIX if a.name == "resnet")


@pytest.mark.parametrize("total", [0, 1, 3, 20, 31, 32, 33, 1000])
@pytest.mark.parametrize("size", [1, 3, 8, 32, 100])
def test_chunks_cover_the_range_in_powers_of_two(total: int, size: int) -> None:
    parts = list(chunks(total, size))
    lengths = [part.stop - part.start for part in parts]
    assert sum(lengths) == total
    assert all(a.stop == b.start for a, b in pairwise(parts))
    assert set(lengths) <= set(chunk_shapes(size))
    assert lengths == sorted(lengths, reverse=True)
    # As few passes as powers of two allow: full chunks, then one per bit of the rest.
    step = chunk_shapes(size)[-1]
    assert len(parts) == total // step + bin(total % step).count("1")


def test_a_free_batch_runs_in_chunk_lengths(tmp_path: Path) -> None:
    report = export_package(build(RESNET), name="resnet", version=1,
                            input_shape=RESNET.input_shape, mean=[0.5] * 3, std=[0.25] * 3,
                            class_labels=(), repository=tmp_path, head=RESNET.head)
    handle = ModelHandle("resnet", 1, report.path)
    handle.load()
    x = np.random.default_rng(0).normal(size=(MAX_CHUNK_ROWS + 5, *RESNET.input_shape))
    whole = handle.run(x.astype(np.float32))[0]
    singly = np.concatenate([handle.run(x[i:i + 1].astype(np.float32))[0]
                             for i in range(x.shape[0])])
    assert whole.shape == (MAX_CHUNK_ROWS + 5, 5)
    np.testing.assert_allclose(whole, singly, rtol=1e-5, atol=1e-5)


def _requests() -> list[pb.ExplainRequest]:
    """Parameters unlike the warm-up's: odd sample and step counts, batches of 1 and 3."""
    rng = np.random.default_rng(2)
    requests = []
    for batch in (1, 3):
        x = rng.normal(size=(batch, *RESNET.input_shape)).astype(np.float32)
        source = pb.Input(tensor=array_to_tensor(x))
        variations = [
            (pb.METHOD_VANILLA_GRADIENT, None, {}),
            (pb.METHOD_INPUT_X_GRADIENT, None, {}),
            (pb.METHOD_SMOOTHGRAD, "smoothgrad", {"samples": 3}),
            (pb.METHOD_SMOOTHGRAD, "smoothgrad", {"samples": 21}),
            (pb.METHOD_VARGRAD, "vargrad", {"samples": 5}),
            (pb.METHOD_INTEGRATED_GRADIENTS, "integrated_gradients", {"steps": 7}),
            (pb.METHOD_INTEGRATED_GRADIENTS, "integrated_gradients", {"steps": 45}),
            (pb.METHOD_GUIDED_BACKPROP, None, {}),
            (pb.METHOD_GUIDED_ABSOLUTEGRAD, "guided_absolutegrad", {"samples": 6}),
            (pb.METHOD_GRADCAM, None, {}),
            (pb.METHOD_GRADCAM_PLUS_PLUS, None, {}),
            (pb.METHOD_GUIDED_GRADCAM, None, {}),
            (pb.METHOD_FASTCAM, None, {}),
        ]
        for method, field, values in variations:
            request = pb.ExplainRequest(model="resnet", method=method, input=source)
            for key, value in values.items():
                setattr(getattr(request, field), key, value)
            requests.append(request)
    return requests


def kernels_built(models: Path, log: Path, requests: list[pb.ExplainRequest],
                  env: dict[str, str] | None = None) -> int:
    """oneDNN kernels a ``saliency serve`` process on ``models`` built from its start until
    it answered ``requests`` and stopped (its log is read once the process has exited)."""
    with ServerProcess(models, log_path=log, ready_timeout=600,
                       env={"ONEDNN_VERBOSE": "profile_create", **(env or {})}
                       ) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for request in requests:
            reply = stub.Explain(request, timeout=120)
            batch, _, height, width = request.input.tensor.shape
            assert list(reply.saliency.shape) == [batch, height, width]
    return log.read_text().count(",create:cache_miss,")


def test_requests_after_readiness_build_no_new_kernels(tmp_path: Path) -> None:
    models = tmp_path / "models"
    export_package(build(RESNET), name="resnet", version=1, input_shape=RESNET.input_shape,
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=(), repository=models,
                   head=RESNET.head)
    at_readiness = kernels_built(models, tmp_path / "ready.log", [])
    requests = _requests()
    after_requests = kernels_built(models, tmp_path / "served.log", requests)
    assert at_readiness > 50  # the log is on: the warm-up built the model's kernels
    assert after_requests == at_readiness, (
        f"{after_requests - at_readiness} oneDNN kernels were built for "
        f"{len(requests)} requests after readiness")
