"""Captions stay bounded whatever a package's class labels hold: a long label is cut with
an ellipsis before layout, a caption has a bounded number of lines, and rendering stops at
the request's deadline."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from saliency_service.core.errors import DeadlineExceeded
from saliency_service.core.repository import InputSpec
from saliency_service.core.request import CostCounter
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from saliency_service.render.drawing import (
    MARGIN,
    MAX_TEXT_LINES,
    MIN_WIDTH,
    line_height,
    text_band,
)
from saliency_service.render.overlays import MAX_LABEL_CHARS, caption_label, captioned_overlays
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo" / "1"
LONG_LABEL = ("very long label " * 6250)[:100_000]  # 100,000 characters, spaces inside
# The longest label a manifest may hold (longer ones leave the package not ready).
PACKAGE_LABEL = LONG_LABEL[:512]
SIDE = 128  # the demo model's input side
DEMO_INPUT = InputSpec(shape=(-1, 3, SIDE, SIDE), mean=(0.25, 0.25, 0.26),
                       std=(0.226, 0.226, 0.228))


@pytest.fixture(scope="module")
def long_label_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The demo package whose first class label is as long as a manifest allows."""
    root = tmp_path_factory.mktemp("long-label")
    shutil.copytree(DEMO, root / "demo" / "1")
    manifest_path = root / "demo" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["class_labels"][0] = PACKAGE_LABEL
    manifest_path.write_text(json.dumps(manifest))
    running = RunningServer(make_config(root, max_batch=8)).start(timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(long_label_server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(long_label_server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def demo_inputs(batch: int) -> pb.Input:
    inputs = np.random.default_rng(0).normal(size=(batch, 3, SIDE, SIDE)).astype(np.float32)
    return pb.Input(tensor=array_to_tensor(inputs))


def overlay_height(stub: pb_grpc.ExplainerStub, class_index: int) -> int:
    request = pb.ExplainRequest(model="demo", method=pb.METHOD_SMOE_SCALE,
                                input=demo_inputs(1), return_overlay=True,
                                target=pb.Target(class_index=class_index))
    reply = stub.Explain(request, timeout=120)
    return Image.open(io.BytesIO(reply.overlays[0])).height


# ---- captions -------------------------------------------------------------------------

def test_a_long_label_gets_a_caption_of_a_few_lines(stub) -> None:
    """The caption holds the label cut to a few lines, not laid out in full."""
    short = overlay_height(stub, 1)
    long = overlay_height(stub, 0)
    assert short <= long <= short + 5 * line_height()


def test_a_100000_character_label_gets_a_caption_of_a_few_lines() -> None:
    """Before, the caption was laid out in full: thousands of lines, seconds past any
    deadline (9.5 s, +325 MiB). The cut label takes at most a few lines more than a short
    one."""
    spec = DEMO_INPUT
    inputs = np.zeros((1, 3, SIDE, SIDE), np.float32)

    def height(label: str) -> int:
        (overlay,) = captioned_overlays(inputs, spec, np.zeros((1, SIDE, SIDE), np.float32),
                                        np.zeros(1, np.int64), (label,), "smoe_scale",
                                        CostCounter(), 0.1)
        return Image.open(io.BytesIO(overlay)).height

    assert height("round_cell") <= height(LONG_LABEL) <= height("round_cell") + 5 * line_height()


def test_a_caption_label_is_cut_with_an_ellipsis() -> None:
    label = caption_label(LONG_LABEL)
    assert len(label) == MAX_LABEL_CHARS and label.endswith("…")
    assert caption_label("round_cell") == "round_cell"


@pytest.mark.parametrize("text", [LONG_LABEL, "x" * 100_000, "line\n" * 10_000])
def test_a_text_band_holds_a_bounded_number_of_lines(text: str) -> None:
    band = text_band(text, MIN_WIDTH)
    assert band.shape[0] <= 2 * MARGIN + MAX_TEXT_LINES * line_height()


def test_overlays_stop_at_the_request_deadline() -> None:
    """Rendering checks the request's deadline between items."""
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise DeadlineExceeded("the request's deadline passed")

    spec = DEMO_INPUT
    inputs = np.zeros((3, 3, SIDE, SIDE), np.float32)
    with pytest.raises(DeadlineExceeded):
        captioned_overlays(inputs, spec, np.zeros((3, SIDE, SIDE), np.float32),
                           np.zeros(3, np.int64), (LONG_LABEL,), "smoe_scale", CostCounter(),
                           0.1, check=check)
    assert len(calls) == 2


