"""A segmenter this project did not make, as a user installs it: PaddleOCR's PP-OCRv4 text
detector from RapidOCR's wheel (paddle2onnx, one sigmoid "text" channel), served from a
hand-written manifest and explained over gRPC: its text map is Predict's class map, and a
word's region is explained where that word is, not where the other word is."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from saliency_service.core.dense import NO_CLASS
from saliency_service.core.repository import MANIFEST, ONNX_FILE, sha256_file
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import tensor_to_array
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config
from tests.third_party import TEXT_MEAN, TEXT_STD, ocr_text_detector

HEIGHT, WIDTH = 128, 384
WORDS = (("Hello", (24, 40)), ("saliency", (220, 70)))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ocr")
    source = ocr_text_detector(root / "download")
    package = root / "models" / "text" / "1"
    package.mkdir(parents=True)
    shutil.copy(source, package / ONNX_FILE)
    manifest = {
        "format": 1, "name": "text", "version": 1,
        "input": {"name": "x", "shape": [-1, 3, HEIGHT, WIDTH], "mean": list(TEXT_MEAN),
                  "std": list(TEXT_STD), "value_range": [0.0, 1.0], "layout": "NCHW",
                  "dtype": "float32"},
        "class_labels": ["text"],
        "outputs": {"kind": "segmentation", "logits": "sigmoid_0.tmp_0", "scores": "sigmoid"},
        "files": {ONNX_FILE: {"sha256": sha256_file(package / ONNX_FILE)}},
    }
    (package / MANIFEST).write_text(json.dumps(manifest))
    return root / "models"


@pytest.fixture(scope="module")
def stub(repository: Path) -> Iterator[pb_grpc.ExplainerStub]:
    running = RunningServer(make_config(repository)).start(timeout=600)
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.ExplainerStub(channel)
    running.stop()


def page() -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """A PNG with two dark words on paper, and each word's box (x1, y1, x2, y2)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (236, 231, 221))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=26)
    boxes = []
    for word, (x, y) in WORDS:
        draw.text((x, y), word, fill=(20, 20, 25), font=font)
        x1, y1, x2, y2 = draw.textbbox((x, y), word, font=font)
        boxes.append((x1, y1, x2, y2))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), boxes


def images(png: bytes) -> pb.Input:
    return pb.Input(images=pb.EncodedImages(images=[png]))


def test_the_text_map_is_predicts_class_map(stub: pb_grpc.ExplainerStub) -> None:
    info = stub.GetModel(pb.GetModelRequest(model="text"), timeout=60)
    assert info.status.ready, info.status.error
    assert info.output_kind == "segmentation"
    assert {"occlusion", "rise", "decam"} <= {m.name for m in info.methods}
    png, boxes = page()
    classes = tensor_to_array(stub.Predict(pb.PredictRequest(
        model="text", input=images(png)), timeout=120).class_map)[0]
    assert classes.shape == (HEIGHT, WIDTH)
    text = classes == 0
    assert set(np.unique(classes)) <= {0, NO_CLASS}
    for x1, y1, x2, y2 in boxes:  # DB maps a shrunk core of each word; the paper is not text
        assert text[y1:y2, x1:x2].mean() > 0.25
    assert text[:20].mean() < 0.01 and text[-15:].mean() < 0.01


def test_a_words_region_is_explained_where_that_word_is(stub: pb_grpc.ExplainerStub) -> None:
    png, boxes = page()
    (x1, y1, x2, y2), other = boxes[0], boxes[1]
    region = pb.RegionTarget(label="text", box=pb.Box(x1=x1, y1=y1, x2=x2, y2=y2))
    reply = stub.Explain(pb.ExplainRequest(
        model="text", method=pb.METHOD_OCCLUSION, input=images(png), target=pb.Target(
            region=region), occlusion=pb.OcclusionParams(window=12, stride=6)), timeout=300)
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (1, HEIGHT, WIDTH) and len(reply.explained) == 1
    assert reply.explained[0].region_pixels == (x2 - x1) * (y2 - y1)
    assert reply.explained[0].score > 0.3  # the word reads as text
    own = maps[0, y1:y2, x1:x2].mean()
    elsewhere = maps[0, other[1]:other[3], other[0]:other[2]].mean()
    assert own > 3 * elsewhere, (own, elsewhere)


def test_the_default_target_is_the_predicted_text(stub: pb_grpc.ExplainerStub) -> None:
    png, _ = page()
    reply = stub.Explain(pb.ExplainRequest(
        model="text", method=pb.METHOD_RISE, input=images(png), seed=1,
        rise=pb.RiseParams(masks=150, cells=12)), timeout=300)
    assert [e.label for e in reply.explained] == ["text"]
    classes = tensor_to_array(stub.Predict(pb.PredictRequest(
        model="text", input=images(png)), timeout=120).class_map)[0]
    assert reply.explained[0].region_pixels == int((classes == 0).sum())


def test_bad_targets_name_what_to_change(stub: pb_grpc.ExplainerStub) -> None:
    png, _ = page()
    for target, expected in (
            (pb.Target(region=pb.RegionTarget(label="car")), "has no class 'car'"),
            (pb.Target(region=pb.RegionTarget(label="text", box=pb.Box(
                x1=0, y1=0, x2=500, y2=10))), "outside the 128×384 model input"),
            (pb.Target(min_score=0.5), "a segmenter's target is a region")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(pb.ExplainRequest(model="text", method=pb.METHOD_OCCLUSION,
                                           input=images(png), target=target), timeout=120)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in caught.value.details()


def test_gradient_methods_are_offered_and_explain_a_word_where_it_is(
        stub: pb_grpc.ExplainerStub) -> None:
    """The translated graph matches ONNX Runtime (its probabilities compared on their 0…1
    scale), so the gradient methods are offered, and the word's summed text probability is
    most sensitive to that word's pixels."""
    info = stub.GetModel(pb.GetModelRequest(model="text"), timeout=60)
    offered = {m.name for m in info.methods}
    assert {"vanilla_gradient", "integrated_gradients"} <= offered, info.methods
    png, boxes = page()
    (x1, y1, x2, y2), other = boxes[0], boxes[1]
    region = pb.RegionTarget(label="text", box=pb.Box(x1=x1, y1=y1, x2=x2, y2=y2))
    for method, params in (
            (pb.METHOD_VANILLA_GRADIENT, {}),
            (pb.METHOD_INTEGRATED_GRADIENTS,
             {"integrated_gradients": pb.IntegratedGradientsParams(steps=8)})):
        reply = stub.Explain(pb.ExplainRequest(
            model="text", method=method, input=images(png),
            target=pb.Target(region=region), **params), timeout=300)
        maps = tensor_to_array(reply.saliency)
        assert maps.shape == (1, HEIGHT, WIDTH) and len(reply.explained) == 1
        own = maps[0, y1:y2, x1:x2].mean()
        elsewhere = maps[0, other[1]:other[3], other[0]:other[2]].mean()
        assert own > 2 * elsewhere, (pb.Method.Name(method), own, elsewhere)
