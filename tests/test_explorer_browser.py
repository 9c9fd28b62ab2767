"""The web explorer in a real headless browser (Debian's Chromium and ChromeDriver, driven by
Selenium) against a real server on loopback: upload an image, run two methods, watch a DE-CAM
run's live progress, change the explained class, open the cost-vs-quality chart, and save a
screenshot (to ``$SALIENCY_EXPLORER_SCREENSHOT`` as well when set); a package whose class
labels are script shows them as text and runs none of it; the token stays in the tab."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.common import demo_repository
from saliency_service.evaluation.cells import TEST_CONFIG, generate
from saliency_service.protocol.explorer import REPORT, evaluation_rows
from tests.conftest import RunningServer, make_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# As root in a container, with no network: no sandbox, no background connections.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1400,1100")

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed (make setup installs "
                "them as root)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# Class labels that run script wherever they are parsed as HTML.
XSS_LABELS = ('<img src=x onerror="window.__xss=1;document.title=\'xss\'">',
              '<svg onload="window.__xss=2"></svg>',
              '</td><script>window.__xss=3</script>',
              '<iframe srcdoc="<script>parent.__xss=4</script>"></iframe>')


def xss_repository(root: Path) -> Path:
    """The demo package (``demo``) and a copy of it (``xss``) whose class labels are
    script. The manifest's sha256 entries cover the model files, not the manifest, so the
    copy loads as a hostile package would."""
    source = demo_repository() / "demo" / "1"
    shutil.copytree(source, root / "demo" / "1")
    shutil.copytree(source, root / "xss" / "1")
    manifest_path = root / "xss" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "xss"
    labels = manifest["class_labels"]
    manifest["class_labels"] = [f"{XSS_LABELS[i % len(XSS_LABELS)]} #{i}"
                                for i in range(len(labels))]
    manifest_path.write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def explorer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = xss_repository(tmp_path_factory.mktemp("models"))
    running = RunningServer(make_config(models, http_port=0, max_batch=8)).start()
    yield f"http://127.0.0.1:{running.server.http_port}/"
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


def card(driver: WebDriver, method: str) -> object:
    return driver.find_element(By.CSS_SELECTOR, f'.result[data-method="{method}"]')


def set_param(driver: WebDriver, method: str, name: str, value: str) -> None:
    field = driver.find_element(
        By.CSS_SELECTOR, f'.method-option[data-method="{method}"] .params [name="{name}"]')
    field.clear()
    field.send_keys(value)


def test_explorer_explains_an_uploaded_image_with_two_methods(
        explorer_url: str, browser: WebDriver, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.get(explorer_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    assert "3×128×128" in browser.find_element(By.ID, "model-status").text

    cell = generate(1, TEST_CONFIG, start=2)
    image_path = tmp_path / "cell.png"
    Image.fromarray(cell.images[0]).save(image_path)
    browser.find_element(By.ID, "file-input").send_keys(str(image_path))
    wait.until(lambda d: d.find_element(By.ID, "input-view").is_displayed())
    assert browser.find_element(By.ID, "input-caption").text == "cell.png"

    for method in ("gradcam", "decam"):
        browser.find_element(By.ID, f"m-{method}").click()
    # Defaults come from GetModel; a long enough search to watch, short enough for a test.
    assert browser.find_element(
        By.CSS_SELECTOR, '.method-option[data-method="decam"] [name="population"]'
    ).get_attribute("value") == "32"
    set_param(browser, "decam", "population", "8")
    set_param(browser, "decam", "generations", "60")
    set_param(browser, "decam", "patience", "0")
    browser.find_element(By.ID, "run").click()

    # Live: the DE-CAM card shows progress and an intermediate map while it still runs.
    wait.until(lambda d: "running" in card(d, "decam").get_attribute("class")
               and int(card(d, "decam").get_attribute("data-updates")) >= 2)
    decam = card(browser, "decam")
    bar = decam.find_element(By.TAG_NAME, "progress")
    assert 0 < float(bar.get_attribute("value")) < float(bar.get_attribute("max"))
    assert "step" in decam.find_element(By.CSS_SELECTOR, ".progress-text").text
    # The search's best map so far is drawn before the result arrives.
    wait.until(lambda d: "running" in card(d, "decam").get_attribute("class")
               and card(d, "decam").find_element(By.CSS_SELECTOR, "canvas.map").is_displayed())
    canvas = card(browser, "decam").find_element(By.CSS_SELECTOR, "canvas.map")
    assert browser.execute_script("return arguments[0].width", canvas) == 128

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 2)
    assert browser.find_elements(By.CSS_SELECTOR, ".result.failed") == []
    assert int(card(browser, "decam").get_attribute("data-updates")) >= 10
    rows = browser.find_elements(By.CSS_SELECTOR, "#prediction tr")
    assert len(rows) == 5
    for method in ("gradcam", "decam"):
        element = card(browser, method)
        cost = element.find_element(By.CSS_SELECTOR, ".cost").text
        assert re.fullmatch(r"cost: \d+ forward, \d+ backward, [\d.]+ ms", cost), cost
        overlay = element.find_element(By.CSS_SELECTOR, "img.overlay")
        assert browser.execute_script("return arguments[0].naturalWidth", overlay) >= 128
        assert element.find_element(By.CSS_SELECTOR, ".explained").text.startswith(
            "explained class:")
    gradcam_cost = card(browser, "gradcam").find_element(By.CSS_SELECTOR, ".cost").text
    assert gradcam_cost.startswith("cost: 2 forward, 1 backward")

    # The explained class can be changed: the methods run again for that class.
    browser.find_element(By.ID, "m-decam").click()  # gradcam alone this time
    Select(browser.find_element(By.ID, "target")).select_by_value("4")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.result.done[data-method="gradcam"]')
               and "explained class: 4" in card(d, "gradcam").text)
    browser.find_element(By.ID, "m-decam").click()
    Select(browser.find_element(By.ID, "target")).select_by_value("")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 2)

    # The evaluation's cost-vs-quality chart is one click away.
    browser.find_element(By.ID, "chart-button").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-plot svg circle"))
    points = browser.find_elements(By.CSS_SELECTOR, "#chart-plot svg circle")
    assert len(points) == len(evaluation_rows(REPORT.read_text())) > 5

    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = browser.get_screenshot_as_png()
    shot = Image.open(io.BytesIO(screenshot))
    assert shot.size[0] >= 1000
    (tmp_path / "explorer.png").write_bytes(screenshot)
    if os.environ.get("SALIENCY_EXPLORER_SCREENSHOT"):
        Path(os.environ["SALIENCY_EXPLORER_SCREENSHOT"]).write_bytes(screenshot)


def test_class_labels_are_text_not_script(explorer_url: str, browser: WebDriver) -> None:
    """A package whose labels are HTML with script: the prediction, the class list and the
    result show the labels literally, and nothing runs (the page's policy forbids inline
    script, and no label is ever parsed as HTML)."""
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.get(explorer_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    title = browser.title
    Select(browser.find_element(By.ID, "model")).select_by_value("xss")
    wait.until(lambda d: any(XSS_LABELS[0] in option.text for option in
                             d.find_elements(By.CSS_SELECTOR, "#target option")))
    browser.find_element(By.ID, "cell-button").click()
    wait.until(lambda d: d.find_element(By.ID, "input-view").is_displayed())
    Select(browser.find_element(By.ID, "target")).select_by_value("0")
    browser.find_element(By.ID, "m-gradcam").click()
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.result.done[data-method="gradcam"]'))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#prediction tr")) == 5)

    shown = browser.find_element(By.ID, "prediction").text
    assert sum(shown.count(label) for label in XSS_LABELS) == 5, shown
    explained = card(browser, "gradcam").find_element(By.CSS_SELECTOR, ".explained").text
    assert explained == f"explained class: 0 {XSS_LABELS[0]} #0"
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#target option")]
    assert all(any(label in text for text in options) for label in XSS_LABELS)
    # Nothing was parsed into elements, nothing ran.
    assert browser.find_elements(By.CSS_SELECTOR, "main img[src='x'], main iframe, main svg "
                                 "[onload], #prediction script, #prediction svg") == []
    assert browser.execute_script("return window.__xss") is None
    assert browser.title == title


def test_the_token_stays_in_the_tab(explorer_url: str, browser: WebDriver) -> None:
    """A pasted token is kept in sessionStorage (this tab), never in localStorage."""
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.get(explorer_url)
    browser.execute_script("localStorage.setItem('saliency-token', 'stale')")
    browser.get(explorer_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    assert browser.execute_script("return localStorage.getItem('saliency-token')") is None
    browser.find_element(By.CSS_SELECTOR, "#auth summary").click()
    token = browser.find_element(By.ID, "token")
    token.send_keys("s3cret")
    browser.find_element(By.ID, "seed").click()  # the change event
    wait.until(lambda d: d.execute_script("return sessionStorage.getItem('saliency-token')")
               == "s3cret")
    assert browser.execute_script("return localStorage.length") == 0
    assert "sessionStorage" in browser.find_element(By.ID, "token-note").text
