"""``saliency import`` of ONNX classifiers from other frameworks, served over gRPC for real.

Every region-scoring fixture in ``tests/fixtures/onnx`` (``onnx.helper`` graphs and Keras
models converted with tf2onnx) is imported with the command line, served by a real server
on a loopback port, and checked: what import decided, readiness and ``GetModel``,
``Predict`` against ONNX Runtime run directly on the file, and occlusion, RISE and DE-CAM
maps that put most of their mass on the one region the model looks at. The cases import
refuses are checked for a message that says what to do. Every method on every fixture,
checked against the source framework, is in ``tests/test_import_all_methods.py``.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from saliency_service.core.repository import sha256_file
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config, run_cli
from tests.fixtures.onnx_classifiers import BOXES, FOLDER, SIZE, region_classifier
from tests.onnx_models import small_cnn

ONNX_ONLY = {"occlusion", "rise", "decam"}
# Gradient methods need only the graph's translation; the CAM and multi-scale ones a feature map.
NEED_FEATURE_MAPS = {"gradcam", "gradcam_plus_plus", "guided_gradcam", "xgradcam", "smoe_scale",
                     "fastcam", "lovi"}
# Methods that explain detectors alone; a classifier lists them as unavailable, saying so.
DETECTORS_ONLY = {"drise"}
GRADIENTS_WITHOUT_CAM = {"vanilla_gradient", "input_x_gradient", "smoothgrad", "vargrad",
                         "integrated_gradients", "guided_backprop", "guided_absolutegrad"}


@dataclass(frozen=True)
class Fixture:
    """A committed ONNX file and what import must decide for it."""

    file: str
    input_name: str
    layout: str
    batch: int  # the model's fixed batch size, 0 = free
    kind: str
    classes: int = 2
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.file.removesuffix(".onnx")

    @property
    def shape(self) -> list[int]:
        image = [SIZE, SIZE, 3] if self.layout == "NHWC" else [3, SIZE, SIZE]
        return [self.batch or -1, *image]


FIXTURES = [
    Fixture("softmax_nchw.onnx", "input", "NCHW", 0, "probabilities"),
    Fixture("sigmoid_multilabel.onnx", "images", "NCHW", 0, "sigmoid", classes=3),
    Fixture("fixed_batch1.onnx", "input", "NCHW", 1, "logits"),
    Fixture("nhwc_logits.onnx", "input_1", "NHWC", 0, "logits"),
    Fixture("dynamic_hw.onnx", "x", "NCHW", 0, "probabilities",
            flags=("--input-shape", "3,32,32")),
    Fixture("keras_nhwc_softmax.onnx", "image", "NHWC", 0, "probabilities"),
    Fixture("keras_batch2.onnx", "image", "NHWC", 2, "probabilities"),
]
IDS = [f.name for f in FIXTURES]



@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Every fixture imported with ``saliency import`` into one repository: (root, output)."""
    root = tmp_path_factory.mktemp("imported")
    outputs = {}
    for fixture in FIXTURES:
        code, out, err = run_cli("import", str(FOLDER / fixture.file), "--name", fixture.name,
                                 "--models", str(root), *fixture.flags)
        assert code == 0, err
        outputs[fixture.name] = out
    for name, build in CONV_GRAPHS.items():
        source = root.parent / f"{name}.onnx"
        onnx.save(build(), str(source))
        code, out, err = run_cli("import", str(source), "--name", name, "--models", str(root))
        assert code == 0, err
        outputs[name] = out
    for broken, (section, key, value) in BROKEN_MANIFESTS.items():
        shutil.copytree(root / "softmax_nchw", root / broken)
        path = root / broken / "1" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest[section][key] = value
        path.write_text(json.dumps(manifest))
    return root, outputs


# Hand-edited manifests the server must refuse to load: (section, key, value), message.
BROKEN_MANIFESTS = {"bad_layout": ("input", "layout", "HWCN"),
                    "bad_kind": ("outputs", "kind", "softmax")}


@pytest.fixture(scope="module")
def stub(imported: tuple[Path, dict[str, str]]) -> Iterator[pb_grpc.ExplainerStub]:
    running = RunningServer(make_config(imported[0])).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            yield pb_grpc.ExplainerStub(channel)
    finally:
        running.stop()


def onnxruntime_scores(fixture: Fixture, inputs: np.ndarray) -> np.ndarray:
    """The class scores of ``inputs`` (in the model's layout) straight from ONNX Runtime,
    in chunks of the model's batch size (zero rows pad the last one)."""
    session = ort.InferenceSession(str(FOLDER / fixture.file),
                                   providers=["CPUExecutionProvider"])
    size = fixture.batch or len(inputs)
    rows = []
    for start in range(0, len(inputs), size):
        part = inputs[start:start + size]
        padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]),
                                                np.float32)])
        rows.append(session.run(None, {fixture.input_name: padded})[0][:len(part)])
    return np.concatenate(rows)


def probabilities(fixture: Fixture, scores: np.ndarray) -> np.ndarray:
    if fixture.kind != "logits":
        return scores.astype(np.float64)
    exp = np.exp(scores.astype(np.float64) - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """N×H×W×C → the model's layout."""
    return images if layout == "NHWC" else np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def region_pixels(count: int, boxes: tuple[int, ...] = (0,), level: int = 128,
                  seed: int = 0) -> np.ndarray:
    """uint8 N×H×W×3: dim noise (up to 0.3) with the boxes of ``boxes`` at ``level``."""
    pixels = np.random.default_rng(seed).integers(0, 77, (count, SIZE, SIZE, 3), np.uint8)
    for index in boxes:
        y0, y1, x0, x1 = BOXES[index]
        pixels[:, y0:y1, x0:x1] = level
    return pixels


def mass_inside(maps: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = box
    return maps[:, y0:y1, x0:x1].sum(axis=(1, 2)) / maps.sum(axis=(1, 2))


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_import_reports_its_decisions_and_writes_a_checked_package(
        fixture: Fixture, imported: tuple[Path, dict[str, str]]) -> None:
    root, outputs = imported
    out = outputs[fixture.name]
    assert f"input: {fixture.input_name} {fixture.layout} {fixture.shape}" in out
    assert f"({fixture.classes} classes, {fixture.kind})" in out
    assert (f"fixed at {fixture.batch}" if fixture.batch else "batch: free") in out
    folder = root / fixture.name / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["input"]["shape"] == fixture.shape
    assert manifest["outputs"]["kind"] == fixture.kind
    entry = manifest["files"]["model.onnx"]
    assert entry == {"sha256": sha256_file(FOLDER / fixture.file),
                     "bytes": (FOLDER / fixture.file).stat().st_size}
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_served_package_is_ready_and_get_model_shows_the_decisions(
        fixture: Fixture, stub: pb_grpc.ExplainerStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert models[fixture.name].ready, models[fixture.name].error
    info = stub.GetModel(pb.GetModelRequest(model=fixture.name), timeout=10)
    assert info.input.layout == fixture.layout
    assert list(info.input.shape) == [-1, *fixture.shape[1:]]
    assert info.input.name == fixture.input_name
    assert info.input.batch_size == fixture.batch
    assert info.output_kind == fixture.kind
    offered = {m.name for m in info.methods}
    missing = {m.name: m.reason for m in info.unavailable_methods
               if m.name not in DETECTORS_ONLY}
    assert offered == ONNX_ONLY | GRADIENTS_WITHOUT_CAM
    assert set(missing) == NEED_FEATURE_MAPS
    # None of these graphs has an activated feature map after a convolution: each method
    # that needs one says which the graph lacks.
    lacks = ("no activation, concatenation or residual sum" if fixture.name.startswith("keras")
             else "the graph has no convolution")
    assert all(lacks in reason for reason in missing.values()), missing
    assert "scale outputs" in missing["smoe_scale"] and "CAM layer" in missing["gradcam"]
    assert info.metadata["exporter.tool"] == "saliency import"
    axis = "axis 3" if fixture.layout == "NHWC" else "axis 1"
    assert info.metadata["exporter.decided.layout"].startswith(axis)


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_predict_gives_the_models_own_probabilities(
        fixture: Fixture, stub: pb_grpc.ExplainerStub) -> None:
    """Float tensors in the model's layout and PNG images, 3 at a time (a fixed batch
    runs in chunks): the probabilities are ONNX Runtime's on the same inputs."""
    rng = np.random.default_rng(1)
    pixels = region_pixels(3, level=255)
    pixels[1] = rng.integers(0, 256, pixels.shape[1:], np.uint8)
    tensors = to_layout(rng.uniform(0, 1, (3, SIZE, SIZE, 3)).astype(np.float32),
                        fixture.layout)
    for message, model_inputs in (
            (pb.Input(tensor=array_to_tensor(tensors)), tensors),
            (pb.Input(images=pb.EncodedImages(images=[png(p) for p in pixels])),
             to_layout(pixels.astype(np.float32) / np.float32(255.0), fixture.layout))):
        reply = stub.Predict(pb.PredictRequest(model=fixture.name, input=message,
                                               top_k=fixture.classes), timeout=30)
        scores = onnxruntime_scores(fixture, model_inputs)
        expected = probabilities(fixture, scores)
        np.testing.assert_allclose(tensor_to_array(reply.logits), scores, atol=1e-6)
        for row, prediction in enumerate(reply.predictions):
            got = {c.index: c.probability for c in prediction.top}
            assert [c.index for c in prediction.top] == list(np.argsort(-expected[row],
                                                                        kind="stable"))
            np.testing.assert_allclose([got[i] for i in range(fixture.classes)],
                                       expected[row], atol=1e-6)
    if fixture.kind == "probabilities":  # the image with the bright box: a confident answer
        top = reply.predictions[0].top[0]
        assert top.probability > 0.999
        assert top.logit == pytest.approx(np.log(top.probability), abs=1e-5)


# Each method's parameters for the test, and the least share of the map's mass on the box.
LOCALIZATION = {
    pb.METHOD_OCCLUSION: ({"occlusion": pb.OcclusionParams(window=4, stride=2)}, 0.8),
    pb.METHOD_RISE: ({"rise": pb.RiseParams(masks=4000)}, 0.5),
    pb.METHOD_DECAM: ({"decam": pb.DecamParams(baseline=pb.BASELINE_BLACK, sparsity=1.5)}, 0.6),
}


@pytest.mark.parametrize("method", list(LOCALIZATION), ids=["occlusion", "rise", "decam"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_gradient_free_maps_find_the_region_the_model_looks_at(
        fixture: Fixture, method: int, stub: pb_grpc.ExplainerStub) -> None:
    params, least = LOCALIZATION[method]
    pixels = region_pixels(2, seed=3)
    reply = stub.Explain(pb.ExplainRequest(
        model=fixture.name, method=method, seed=0, target=pb.Target(class_index=0),
        input=pb.Input(images=pb.EncodedImages(images=[png(p) for p in pixels])), **params),
        timeout=60)
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (2, SIZE, SIZE)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert list(reply.targets) == [0, 0]
    inside = mass_inside(maps, BOXES[0])
    assert (inside > least).all(), inside


def test_multi_label_scores_each_class_on_its_own_and_explains_each_region(
        stub: pb_grpc.ExplainerStub) -> None:
    both = png(region_pixels(1, boxes=(0, 1), level=200)[0])
    request = pb.Input(images=pb.EncodedImages(images=[both]))
    (prediction,) = stub.Predict(pb.PredictRequest(model="sigmoid_multilabel", input=request,
                                                   top_k=3), timeout=30).predictions
    chances = {c.index: c.probability for c in prediction.top}
    assert chances[0] > 0.9 and chances[1] > 0.9 and chances[2] == pytest.approx(0.5)
    assert sum(chances.values()) > 2  # not a distribution, and not made into one
    for score in prediction.top:
        assert score.logit == pytest.approx(np.log(score.probability / (1 - score.probability)),
                                            abs=1e-3)
    for target in (0, 1):
        reply = stub.Explain(pb.ExplainRequest(
            model="sigmoid_multilabel", method=pb.METHOD_OCCLUSION, input=request,
            target=pb.Target(class_index=target),
            occlusion=pb.OcclusionParams(window=4, stride=2)), timeout=60)
        assert mass_inside(tensor_to_array(reply.saliency), BOXES[target])[0] > 0.8


def test_a_manifest_with_an_unknown_layout_or_output_kind_is_not_served(
        stub: pb_grpc.ExplainerStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert not models["bad_layout"].ready
    assert "'HWCN' must be one of NCHW, NHWC" in models["bad_layout"].error
    assert not models["bad_kind"].ready
    assert "'softmax' must be one of logits, probabilities, sigmoid" in models["bad_kind"].error


def test_imported_packages_refuse_cam_methods_saying_what_the_graph_lacks(
        stub: pb_grpc.ExplainerStub) -> None:
    image = pb.Input(images=pb.EncodedImages(images=[png(region_pixels(1)[0])]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(pb.ExplainRequest(model="keras_nhwc_softmax", method=pb.METHOD_GRADCAM,
                                       input=image), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no activation, concatenation or residual sum" in caught.value.details()
    reply = stub.Explain(pb.ExplainRequest(model="keras_nhwc_softmax",
                                           method=pb.METHOD_VANILLA_GRADIENT, input=image,
                                           target=pb.Target(class_index=0)), timeout=30)
    assert mass_inside(tensor_to_array(reply.saliency), BOXES[0])[0] > 0.99


def test_nhwc_model_takes_float_tensors_in_its_own_layout(
        stub: pb_grpc.ExplainerStub) -> None:
    wrong = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(model="nhwc_logits",
                                       input=pb.Input(tensor=array_to_tensor(wrong))),
                     timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"N×{SIZE}×{SIZE}×3" in caught.value.details()
    assert "NHWC" in caught.value.details()


def _graph(inputs: list[onnx.ValueInfoProto], nodes: list[onnx.NodeProto],
           outputs: list[onnx.ValueInfoProto],
           initializers: tuple[onnx.TensorProto, ...] = ()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "refused", inputs, outputs,
                                                list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _float(name: str, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def conv_classifier(first: str = "", channels_last_maps: bool = False) -> onnx.ModelProto:
    """A convolution, ReLU, global average pool and linear head on an NHWC input (turned to
    N×C×H×W for the Conv, as tf2onnx does); ``first`` is an op applied to the input before
    it, and ``channels_last_maps`` turns the map back to N×H×W×C before the ReLU."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "fc")]
    nodes = [helper.make_node(first, ["input"], ["entry"])] if first else []
    nodes.append(helper.make_node("Transpose", ["entry" if first else "input"], ["nchw"],
                                  perm=[0, 3, 1, 2]))
    nodes.append(helper.make_node("Conv", ["nchw", "w"], ["conv"], pads=[1, 1, 1, 1]))
    if channels_last_maps:
        nodes += [helper.make_node("Transpose", ["conv"], ["nhwc"], perm=[0, 2, 3, 1]),
                  helper.make_node("Relu", ["nhwc"], ["maps"]),
                  helper.make_node("ReduceMean", ["maps"], ["pooled"], axes=[1, 2],
                                   keepdims=0)]
    else:
        nodes += [helper.make_node("Relu", ["conv"], ["maps"]),
                  helper.make_node("GlobalAveragePool", ["maps"], ["gap"]),
                  helper.make_node("Flatten", ["gap"], ["pooled"])]
    nodes.append(helper.make_node("Gemm", ["pooled", "fc"], ["logits"], transB=1))
    return _graph([_float("input", ["N", SIZE, SIZE, 3])], nodes, [_float("logits", ["N", 2])],
                  tuple(weights))


# Graphs with feature maps the fast path cannot read, and why (in the import's output and
# in GetModel's reasons).
CONV_GRAPHS = {
    "untranslatable": lambda: conv_classifier(first="Shrink"),
    "channels_last_maps": lambda: conv_classifier(channels_last_maps=True),
}


def no_image_input() -> onnx.ModelProto:
    weights = numpy_helper.from_array(np.zeros((2, 16), np.float32), "w")
    return _graph([_float("features", ["N", 16])],
                  [helper.make_node("Gemm", ["features", "w"], ["logits"], transB=1)],
                  [_float("logits", ["N", 2])], [weights])


def two_image_inputs() -> onnx.ModelProto:
    return _graph([_float("left", ["N", 3, 8, 8]), _float("right", ["N", 3, 8, 8])],
                  [helper.make_node("Sub", ["left", "right"], ["d"]),
                   helper.make_node("ReduceMean", ["d"], ["logits"], axes=[2, 3], keepdims=0)],
                  [_float("logits", ["N", 3])])


def spatial_output() -> onnx.ModelProto:
    """Neither class scores, a map at the input's size nor a grid head (too few channels)."""
    return _graph([_float("input", ["N", 3, 8, 8])],
                  [helper.make_node("MaxPool", ["input"], ["mask"], kernel_shape=[2, 2],
                                    strides=[2, 2])],
                  [_float("mask", ["N", 3, 4, 4])])


REFUSALS = {
    "no image input": (no_image_input, (), "no image-like input"),
    "several candidate inputs": (two_image_inputs, (), "several candidate image inputs"),
    "output not N×classes": (spatial_output, (), "cannot tell what the outputs are"),
    "ambiguous layout": (lambda: region_classifier(width=3), (),
                         "pass --layout NCHW or --layout NHWC"),
    "free height and width": (lambda: region_classifier(height="H", width="W"), (),
                              "pass --input-shape C,H,W"),
    "probabilities that are logits": (
        lambda: region_classifier(head="", output_name="logits"),
        ("--output", "probabilities"), "rows sum to"),
    "shape against the graph": (region_classifier, ("--input-shape", "3,64,64"),
                                "disagrees with the graph"),
    "logits that are probabilities": (region_classifier, ("--output", "logits"),
                                      "pass --output probabilities"),
    "scores in [0, 1] of no telling op": (lambda: region_classifier(head="HardSigmoid"), (),
                                          "pass --output sigmoid"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_import_refuses_what_it_cannot_serve_and_says_what_to_do(
        case: str, tmp_path: Path) -> None:
    build, flags, message = REFUSALS[case]
    source = tmp_path / "model.onnx"
    onnx.save(build(), str(source))
    code, _, err = run_cli("import", str(source), "--name", "refused",
                             "--models", str(tmp_path / "models"), *flags)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "models" / "refused").exists()


@pytest.mark.parametrize("head, flags, kind", [("LogSoftmax", (), "logits"),
                                               ("HardSigmoid", ("--output", "sigmoid"),
                                                "sigmoid")])
def test_import_reads_log_probabilities_as_logits_and_takes_a_confirmed_output_flag(
        head: str, flags: tuple[str, ...], kind: str, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(region_classifier(head=head), str(source))
    code, out, err = run_cli("import", str(source), "--name", "m",
                             "--models", str(tmp_path / "models"), *flags)
    assert code == 0, err
    assert f"(2 classes, {kind})" in out
    manifest = json.loads((tmp_path / "models" / "m" / "1" / "manifest.json").read_text())
    assert manifest["outputs"]["kind"] == kind


def test_import_writes_the_preprocessing_it_is_given(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(region_classifier(), str(source))
    code, _, err = run_cli("import", str(source), "--name", "m", "--version", "3",
                           "--models", str(tmp_path / "models"), "--labels", "box,rest",
                           "--value-range", "0,255", "--mean", "127.5", "--std", "1,2,4")
    assert code == 0, err
    manifest = json.loads((tmp_path / "models" / "m" / "3" / "manifest.json").read_text())
    assert manifest["input"]["value_range"] == [0.0, 255.0]
    assert manifest["input"]["mean"] == [127.5] * 3
    assert manifest["input"]["std"] == [1.0, 2.0, 4.0]
    assert manifest["class_labels"] == ["box", "rest"]
    code, _, err = run_cli("import", str(source), "--name", "m", "--version", "3",
                           "--models", str(tmp_path / "models"))
    assert code == 2 and "pass --force" in err


def test_a_graph_without_a_translation_serves_the_onnx_only_methods_and_says_why(
        imported: tuple[Path, dict[str, str]], stub: pb_grpc.ExplainerStub) -> None:
    out = imported[1]["untranslatable"]
    assert "gradients: unavailable: its ONNX graph cannot be translated" in out
    assert "scales: none: its ONNX graph cannot be translated" in out and "Shrink" in out
    info = stub.GetModel(pb.GetModelRequest(model="untranslatable"), timeout=30)
    assert {m.name for m in info.methods} == ONNX_ONLY
    reasons = {m.name: m.reason for m in info.unavailable_methods
               if m.name not in DETECTORS_ONLY}
    assert all("Shrink" in reason for reason in reasons.values()), reasons


def test_feature_maps_left_channels_last_are_named_as_the_reason(
        imported: tuple[Path, dict[str, str]], stub: pb_grpc.ExplainerStub) -> None:
    root, outputs = imported
    assert "act on N×H×W×C tensors only" in outputs["channels_last_maps"]
    info = stub.GetModel(pb.GetModelRequest(model="channels_last_maps"), timeout=30)
    assert {m.name for m in info.methods} == ONNX_ONLY | GRADIENTS_WITHOUT_CAM
    reasons = {m.name: m.reason for m in info.unavailable_methods
               if m.name not in DETECTORS_ONLY}
    assert all("N×H×W×C tensors only" in reason for reason in reasons.values()), reasons
    manifest = json.loads((root / "channels_last_maps" / "1" / "manifest.json").read_text())
    assert manifest["outputs"]["scales"] == [] and manifest["cam_output"] == ""


def test_a_conv_classifier_gets_its_scale_and_head_from_the_graph(
        tmp_path: Path) -> None:
    """The NCHW map after the Conv's ReLU is the scale; the GAP → Flatten → Gemm head reads
    it; the written graph returns it for any batch size; its name avoids the graph's own."""
    model = conv_classifier()
    model.graph.node[-1].output[0] = "scale_0"  # the class output already has that name
    model.graph.output[0].name = "scale_0"
    source = tmp_path / "model.onnx"
    onnx.save(model, str(source))
    code, out, err = run_cli("import", str(source), "--name", "m", "--models",
                             str(tmp_path / "models"))
    assert code == 0, err
    assert f"scales: saliency_scale_0 = Relu 'maps' 4×{SIZE}×{SIZE}" in out
    assert "head: gap_linear" in out
    folder = tmp_path / "models" / "m" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outputs"] == {"logits": "scale_0", "kind": "logits",
                                   "scales": ["saliency_scale_0"]}
    assert manifest["cam_output"] == "saliency_scale_0"
    assert manifest["head"]["type"] == "gap_linear" and manifest["head"]["features"] == 4
    assert manifest["scale_shapes"] == [[4, SIZE, SIZE]]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(5, SIZE, SIZE, 3)).astype(np.float32)
    logits, maps = session.run(["scale_0", "saliency_scale_0"], {"input": x})
    assert maps.shape == (5, 4, SIZE, SIZE)
    weights = numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) @ weights.T, logits, rtol=1e-5, atol=1e-5)


def test_import_prints_no_control_characters_from_the_file(tmp_path: Path) -> None:
    """A node name with an ANSI escape and a bell (a hostile file's) is printed as escapes:
    what import prints cannot move the cursor, clear or recolour the user's terminal."""
    model = small_cnn()
    for index, node in enumerate(model.graph.node):
        node.name = f"n\x1b[2J\x07{index}"
    onnx.save(model, str(tmp_path / "m.onnx"))
    code, out, err = run_cli("import", str(tmp_path / "m.onnx"), "--name", "m", "--models",
                             str(tmp_path / "models"), "--labels", "a,b,c")
    assert code == 0, err
    refused, _, message = run_cli("import", str(tmp_path / "m.onnx"), "--name", "m2",
                                  "--models", str(tmp_path / "models"), "--labels", "a,b,c",
                                  "--cam-layer", "x\x1b[31m")
    assert refused == 2
    for text in (out, err, message):
        assert not any(not c.isprintable() and c not in "\n\t" for c in text), repr(text)
    assert "\\x1b[2J\\x07" in out and "\\x1b[31m" in message
