"""The web explorer on a detector and a segmenter, in a real headless browser (Debian's Chromium
and ChromeDriver, driven by Selenium) against a real server on loopback: Predict's boxes are
drawn over the image and a click on one explains that detection; "every detection" explains
each, one map each; a segmenter's class map is a coloured layer with a legend, and a click on a
pixel explains that pixel's class region. The requests the page sent are read back to check
their targets; labels stay text; a 400 px phone still sees the whole page."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from saliency_service.core.dense import NO_CLASS
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.protocol.explorer import SCENE_SEED
from saliency_service.serving.background import RunningServer
from saliency_service.zoo.detectors import (
    ANCHOR,
    MAX_DETECTIONS,
    NMS_IOU,
    SCORE_THRESHOLD,
    STRIDE,
)
from tests.conftest import make_config
from tests.detection_support import SIZE, load_trained
from tests.test_dense_serving import SEGMENT_LABELS, write
from tests.test_explorer_browser import (  # skips this module where Chromium is missing
    CHROMEDRIVER,
    CHROMIUM,
    CHROMIUM_FLAGS,
    XSS_LABELS,
    click,
    in_view,
    page_width,
    ready_page,
    set_param,
)

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

GRID_OUTPUTS = {"kind": "detection_raw", "logits": "raw",
                "detection": {"stride": STRIDE, "anchor": ANCHOR,
                              "score_threshold": SCORE_THRESHOLD, "nms_iou": NMS_IOU,
                              "max_detections": MAX_DETECTIONS}}
# Every request body the page sends, kept in the page (fetch is looked up at each call).
RECORD_REQUESTS = """
window.__sent = [];
const original = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) {
    window.__sent.push({ url: String(url), body: JSON.parse(options.body) });
  }
  return original(url, options);
};"""


def sigmoid_segmenter(source: Path, target: Path) -> Path:
    """The U-Net as a multi-label segmenter: each object class's probability is the sigmoid of
    its logit over the background's, so a background pixel belongs to no class."""
    model = onnx.load(source)
    graph = model.graph
    (logits,) = graph.output
    graph.initializer.extend(numpy_helper.from_array(np.array([value], np.int64), name)
                             for name, value in (("zero", 0), ("one", 1), ("four", 4)))
    graph.node.extend([
        helper.make_node("Slice", [logits.name, "one", "four", "one"], ["objects"]),
        helper.make_node("Slice", [logits.name, "zero", "one", "one"], ["background"]),
        helper.make_node("Sub", ["objects", "background"], ["margins"]),
        helper.make_node("Sigmoid", ["margins"], ["probabilities"])])
    graph.output.remove(logits)
    graph.output.append(helper.make_tensor_value_info(
        "probabilities", TensorProto.FLOAT, ["batch", len(CLASSES), SIZE, SIZE]))
    onnx.save(model, target)
    return target


@pytest.fixture(scope="module")
def dense_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The grid detector, the U-Net segmenter, and the detector again with script for labels."""
    root = tmp_path_factory.mktemp("dense-explorer")
    trained = load_trained(root / "onnx")
    models = root / "models"
    write(models / "grid", trained.onnx["grid"], GRID_OUTPUTS, CLASSES)
    write(models / "unet", trained.onnx["unet"], {"kind": "segmentation", "logits": "logits"},
          SEGMENT_LABELS)
    write(models / "xssgrid", trained.onnx["grid"], GRID_OUTPUTS, XSS_LABELS[:len(CLASSES)])
    write(models / "sigmoid", sigmoid_segmenter(trained.onnx["unet"], root / "sigmoid.onnx"),
          {"kind": "segmentation", "logits": "probabilities", "scores": "sigmoid"}, CLASSES)
    running = RunningServer(make_config(models, http_port=0, max_batch=8)).start(timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def http(dense_server: RunningServer) -> Iterator[httpx.Client]:
    port = dense_server.server.http_port
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def url(dense_server: RunningServer) -> str:
    return f"http://127.0.0.1:{dense_server.server.http_port}/explorer/"


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated scene with two or more objects, as a file to upload."""
    batch = generate(4, SceneConfig(size=SIZE, seed=SCENE_SEED))
    index = next(i for i, scene in enumerate(batch.scenes) if len(scene.boxes) >= 2)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(batch.images[index]).save(path)
    return path


def predicted(http: httpx.Client, model: str, png: bytes) -> dict[str, Any]:
    image = base64.b64encode(png).decode()
    answer = http.post("/api/v1/predict",
                       json={"model": model, "input": {"images": {"images": [image]}}})
    assert answer.status_code == 200, answer.text
    return answer.json()


def open_model(browser: WebDriver, url: str, model: str, kind: str) -> WebDriverWait:
    """The page with ``model`` chosen and every request body it sends recorded."""
    wait = ready_page(browser, url)
    browser.execute_script(RECORD_REQUESTS)
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    wait.until(lambda d: kind in d.find_element(By.ID, "model-status").text)
    return wait


def explain_bodies(browser: WebDriver) -> list[dict[str, Any]]:
    sent = browser.execute_script("return window.__sent")
    return [entry["body"] for entry in sent if entry["url"].endswith("/api/v1/explain/stream")]


def upload(browser: WebDriver, wait: WebDriverWait, path: Path) -> None:
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "scene").is_displayed()
               and "click" in d.find_element(By.ID, "scene-hint").text)


def done_card(browser: WebDriver, wait: WebDriverWait, method: str, runs: int) -> Any:
    """The method's card once the page's ``runs``-th explain request has its answer."""
    css = f'.result.done[data-method="{method}"], .result.failed[data-method="{method}"]'
    wait.until(lambda d: len(explain_bodies(d)) >= runs and d.find_elements(By.CSS_SELECTOR, css))
    element = browser.find_element(By.CSS_SELECTOR, css)
    assert "done" in element.get_attribute("class"), element.text
    return element


def overlays_shown(browser: WebDriver, element: Any) -> int:
    images = element.find_elements(By.CSS_SELECTOR, "ol.maps img.overlay")
    return sum(browser.execute_script("return arguments[0].naturalWidth", image) >= SIZE
               for image in images)


def test_clicking_a_box_explains_that_detection(browser: WebDriver, url: str, http: httpx.Client,
                                                scene_png: Path) -> None:
    detections = predicted(http, "grid", scene_png.read_bytes())["detections"][0]["detections"]
    assert len(detections) >= 2
    wait = open_model(browser, url, "grid", "detector")
    assert browser.find_element(By.ID, "target-name").text == "Explained detection"
    upload(browser, wait, scene_png)

    # Each detection is a box over the image where Predict put it, labelled with class and score.
    boxes = {int(b.get_attribute("data-index")): b
             for b in browser.find_elements(By.CSS_SELECTOR, "#scene-boxes .box")}
    assert sorted(boxes) == list(range(len(detections)))
    canvas = browser.find_element(By.ID, "scene-canvas")
    frame = canvas.rect
    for index, detection in enumerate(detections):
        assert boxes[index].text == f"{detection['label']} {detection['score']:.2f}"
        place = boxes[index].rect
        scale = frame["width"] / SIZE
        assert abs((place["x"] - frame["x"]) / scale - detection["box"]["x1"]) < 1
        assert abs((place["y"] - frame["y"]) / scale - detection["box"]["y1"]) < 1

    click(browser, "#m-drise")
    set_param(browser, "drise", "masks", "150")
    assert "click a detection" in browser.find_element(By.ID, "run-hint").text
    assert browser.find_element(By.ID, "run").get_attribute("disabled")
    chosen = len(detections) - 1
    click(browser, f'#scene-boxes .box[data-index="{chosen}"]')
    element = done_card(browser, wait, "drise", 1)
    (body,) = explain_bodies(browser)
    want = detections[chosen]
    assert body["target"] == {"detection": {"box": want["box"],
                                            "class_index": want["class_index"]}}
    assert body["method"] == "drise" and body["return_overlay"] is True
    assert overlays_shown(browser, element) == 1
    assert element.find_element(By.CSS_SELECTOR, ".explained").text.startswith(
        f"explained detection: {want['label']} (class {want['class_index']})")
    assert "picked" in browser.find_element(
        By.CSS_SELECTOR, f'#scene-boxes .box[data-index="{chosen}"]').get_attribute("class")

    # Every detection: one map each, listed with what each explains.
    Select(browser.find_element(By.ID, "target")).select_by_value("all")
    element = done_card(browser, wait, "drise", 2)
    assert explain_bodies(browser)[1]["target"] == {"min_score": 0}
    assert overlays_shown(browser, element) == len(detections)
    captions = [span.text for span in element.find_elements(By.CSS_SELECTOR, ".target-text")]
    assert [caption.split(" (")[0] for caption in captions] == [d["label"] for d in detections]
    assert element.find_element(By.CSS_SELECTOR, ".explained").text == (
        f"explained {len(detections)} detections, one map each")


def test_clicking_a_pixel_explains_its_class_region(browser: WebDriver, url: str,
                                                   http: httpx.Client) -> None:
    wait = open_model(browser, url, "unet", "segmenter")
    assert browser.find_element(By.ID, "cell-label").text == "or generated scene"
    click(browser, "#cell-button")  # a generated scene at the model's size
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#scene-legend .legend-item"))
    scene = http.get("/explorer/scene", params={"index": 0, "size": SIZE}).json()
    answer = predicted(http, "unet", base64.b64decode(scene["image"]))["class_map"]
    classes = np.frombuffer(base64.b64decode(answer["data"]), np.uint8).reshape(SIZE, SIZE)
    present = sorted(int(c) for c in np.unique(classes))
    legend = [item.text for item in browser.find_elements(By.CSS_SELECTOR, ".legend-item")]
    assert legend == [f"{c}: {SEGMENT_LABELS[c]} · {int((classes == c).sum())} px"
                      for c in present]
    # The layer is the class map over the image: an object pixel takes its class's colour.
    label = max((c for c in present if c > 0), key=lambda c: int((classes == c).sum()))
    inside = (classes == label)
    interior = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] \
        & inside[1:-1, 2:]
    y, x = (int(v) + 1 for v in np.argwhere(interior)[0])

    click(browser, "#m-occlusion")
    click_pixel(browser, x, y)
    element = done_card(browser, wait, "occlusion", 1)
    (body,) = explain_bodies(browser)
    assert body["target"] == {"region": {"class_index": label}}
    assert overlays_shown(browser, element) == 1
    pixels = int((classes == label).sum())
    assert element.find_element(By.CSS_SELECTOR, ".explained").text.startswith(
        f"explained region: {SEGMENT_LABELS[label]} (class {label}) · {pixels} px")
    picked = browser.find_element(By.CSS_SELECTOR, ".legend-item.picked").text
    assert picked.startswith(f"{label}: ")

    # The legend is a second way to pick, and "every region" sends the default target.
    other = next(c for c in present if c != label)
    click(browser, f"#scene-legend li:nth-child({present.index(other) + 1}) .legend-item")
    element = done_card(browser, wait, "occlusion", 2)
    assert explain_bodies(browser)[1]["target"] == {"region": {"class_index": other}}
    Select(browser.find_element(By.ID, "target")).select_by_value("all")
    element = done_card(browser, wait, "occlusion", 3)
    assert "target" not in explain_bodies(browser)[2]
    assert overlays_shown(browser, element) >= 2


def click_pixel(browser: WebDriver, x: int, y: int) -> None:
    """A real click on pixel (x, y) of the model's input drawn on the scene's canvas."""
    canvas = browser.find_element(By.ID, "scene-canvas")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    side = canvas.rect["width"]
    ActionChains(browser).move_to_element_with_offset(
        canvas, round((x + 0.5) / SIZE * side - side / 2),
        round((y + 0.5) / SIZE * side - side / 2)).click().perform()


def test_a_pixel_of_no_class_is_said_so_and_sends_nothing(browser: WebDriver, url: str,
                                                          http: httpx.Client) -> None:
    """A sigmoid segmenter's pixels where no class reaches 0.5 (255) are left uncoloured and
    out of the legend; a click there says so instead of explaining."""
    wait = open_model(browser, url, "sigmoid", "segmenter")
    click(browser, "#cell-button")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#scene-legend .legend-item"))
    scene = http.get("/explorer/scene", params={"index": 0, "size": SIZE}).json()
    answer = predicted(http, "sigmoid", base64.b64decode(scene["image"]))["class_map"]
    classes = np.frombuffer(base64.b64decode(answer["data"]), np.uint8).reshape(SIZE, SIZE)
    assert (classes == NO_CLASS).mean() > 0.5
    present = sorted(int(c) for c in np.unique(classes) if c != NO_CLASS)
    legend = [item.text for item in browser.find_elements(By.CSS_SELECTOR, ".legend-item")]
    assert legend == [f"{c}: {CLASSES[c]} · {int((classes == c).sum())} px" for c in present]

    click(browser, "#m-occlusion")
    y, x = (int(v) for v in np.argwhere(classes == NO_CLASS)[0])
    click_pixel(browser, x, y)
    wait.until(lambda d: "no class reaches probability 0.5" in d.find_element(By.ID, "status").text)
    assert explain_bodies(browser) == []
    y, x = (int(v) for v in np.argwhere(classes == present[0])[len(present) // 2])
    click_pixel(browser, x, y)
    done_card(browser, wait, "occlusion", 1)
    assert explain_bodies(browser)[0]["target"] == {"region": {"class_index": present[0]}}


def test_detection_labels_are_text_not_script(browser: WebDriver, url: str,
                                              scene_png: Path) -> None:
    wait = open_model(browser, url, "xssgrid", "detector")
    title = browser.title
    upload(browser, wait, scene_png)
    shown = [box.text for box in browser.find_elements(By.CSS_SELECTOR, "#scene-boxes .box")]
    assert shown and all(any(text.startswith(label) for label in XSS_LABELS) for text in shown)
    legend = browser.find_element(By.ID, "scene-legend").text
    assert any(label in legend for label in XSS_LABELS)
    assert browser.find_elements(By.CSS_SELECTOR, "#scene img, #scene iframe, #scene svg, "
                                 "#scene script") == []
    assert browser.execute_script("return window.__xss") is None
    assert browser.title == title


def test_a_phone_picks_a_detection(browser: WebDriver, url: str, scene_png: Path) -> None:
    """At 400 px wide the image with its boxes fits the screen, and a click on a box brings the
    map into view."""
    size = browser.get_window_size()
    browser.set_window_size(400, 860)
    try:
        wait = open_model(browser, url, "grid", "detector")
        upload(browser, wait, scene_png)
        width, inner = page_width(browser)
        assert width <= inner, (width, inner)
        picture = browser.find_element(By.ID, "scene-picture").rect
        assert picture["x"] >= 0 and picture["x"] + picture["width"] <= inner
        click(browser, "#m-occlusion")
        click(browser, '#scene-boxes .box[data-index="0"]')
        done_card(browser, wait, "occlusion", 1)
        wait.until(lambda d: in_view(d, "#results .result"))
        width, inner = page_width(browser)
        assert width <= inner, (width, inner)
    finally:
        browser.set_window_size(size["width"], size["height"])


def test_the_scene_route_gives_objects_and_their_masks(http: httpx.Client) -> None:
    scene = http.get("/explorer/scene", params={"index": 3, "size": 48}).json()
    batch = generate(1, SceneConfig(size=48, seed=SCENE_SEED), start=3)
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(scene["image"]))))
    np.testing.assert_array_equal(image, batch.images[0])
    truth = np.asarray(Image.open(io.BytesIO(base64.b64decode(scene["ground_truth"]))))
    np.testing.assert_array_equal(truth > 0, batch.class_maps[0] > 0)
    assert [o["label"] for o in scene["objects"]] == [CLASSES[c] for c in batch.scenes[0].classes]
    assert [[o["box"][k] for k in ("x1", "y1", "x2", "y2")] for o in scene["objects"]] == \
        batch.scenes[0].boxes.tolist()
    refused = http.get("/explorer/scene", params={"index": 0, "size": 16})
    assert refused.status_code == 400
    assert "size must be an integer within [32, 512]" in refused.json()["error"]["message"]
    assert json.loads(refused.text)["error"]["status"] == "INVALID_ARGUMENT"
