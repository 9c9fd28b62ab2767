"""The web explorer in a real headless browser (Debian's Chromium and ChromeDriver, driven by
Selenium) against a real server on loopback: upload an image, run two methods, watch a DE-CAM
run's live progress, change the explained class, open the cost-vs-quality chart, and save a
screenshot (to ``$SALIENCY_EXPLORER_SCREENSHOT`` as well when set); a package whose class
labels are script shows them as text and runs none of it; the token stays in the tab and is
asked for when the server needs one; on a 400 px phone nothing is wider than the screen and
the results come into view; one colour map; named values and the chart per model."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.common import demo_repository
from saliency_service.evaluation.cells import TEST_CONFIG, generate
from saliency_service.methods.decam import AGGREGATES, STRATEGIES
from saliency_service.protocol.explorer import REPORT, evaluation_rows
from saliency_service.render.drawing import jet
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
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
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
    """The demo package (``demo``) and an ONNX-only copy of it (``xss``) whose class labels
    are script. The manifest's sha256 entries cover the model files, not the manifest, so
    the copy loads as a hostile package would."""
    source = demo_repository() / "demo" / "1"
    shutil.copytree(source, root / "demo" / "1")
    (root / "xss" / "1").mkdir(parents=True)
    shutil.copy(source / "model.onnx", root / "xss" / "1" / "model.onnx")
    manifest_path = root / "xss" / "1" / "manifest.json"
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["name"] = "xss"
    manifest["files"] = {"model.onnx": manifest["files"]["model.onnx"]}
    labels = manifest["class_labels"]
    manifest["class_labels"] = [f"{XSS_LABELS[i % len(XSS_LABELS)]} #{i}"
                                for i in range(len(labels))]
    manifest_path.write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def explorer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = xss_repository(tmp_path_factory.mktemp("models"))
    running = RunningServer(make_config(models, http_port=0, max_batch=8)).start(timeout=600)
    yield f"http://127.0.0.1:{running.server.http_port}/explorer/"
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


def click(driver: WebDriver, css: str) -> None:
    """A real click on the element ``css``, first scrolled to the middle of the window (the
    sticky Explain bar may cover the window's bottom edge)."""
    element = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def in_view(driver: WebDriver, css: str) -> bool:
    """Whether the top of the element ``css`` is inside the window."""
    return bool(driver.execute_script(
        "const box = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return box.top >= 0 && box.top < window.innerHeight && box.height > 0", css))


def page_width(driver: WebDriver) -> tuple[int, int]:
    return tuple(driver.execute_script(  # type: ignore[return-value]
        "return [document.documentElement.scrollWidth, window.innerWidth]"))


def waiting(driver: WebDriver, seconds: float) -> WebDriverWait:
    """A wait that retries while the page re-renders the elements a condition reads (a
    list rebuilt between finding an element and reading it is not a failure)."""
    return WebDriverWait(driver, seconds, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,))


def ready_page(driver: WebDriver, url: str) -> WebDriverWait:
    wait = waiting(driver, 120)
    driver.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    return wait


def set_param(driver: WebDriver, method: str, name: str, value: str) -> None:
    field = driver.find_element(
        By.CSS_SELECTOR, f'.method-option[data-method="{method}"] .params [name="{name}"]')
    field.clear()
    field.send_keys(value)


def test_explorer_explains_an_uploaded_image_with_two_methods(
        explorer_url: str, browser: WebDriver, tmp_path: Path) -> None:
    wait = waiting(browser, 120)
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
        click(browser, f"#m-{method}")
    # Defaults come from GetModel; a long enough search to watch, short enough for a test.
    assert browser.find_element(
        By.CSS_SELECTOR, '.method-option[data-method="decam"] [name="population"]'
    ).get_attribute("value") == "32"
    set_param(browser, "decam", "population", "8")
    set_param(browser, "decam", "generations", "60")
    set_param(browser, "decam", "patience", "0")
    click(browser, "#run")
    # The results panel is beside the form and in view while the methods run.
    wait.until(lambda d: in_view(d, "#output") and in_view(d, "#results .result"))

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
    click(browser, "#m-decam")  # gradcam alone this time
    Select(browser.find_element(By.ID, "target")).select_by_value("4")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.result.done[data-method="gradcam"]')
               and "explained class: 4" in card(d, "gradcam").text)
    click(browser, "#m-decam")
    Select(browser.find_element(By.ID, "target")).select_by_value("")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 2)

    # The evaluation's cost-vs-quality chart for this model is one click away.
    click(browser, "#chart-button")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-plot svg circle"))
    points = browser.find_elements(By.CSS_SELECTOR, "#chart-plot svg circle")
    assert len(points) == len(evaluation_rows(REPORT.read_text(), "demo")) > 5

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
    wait = waiting(browser, 120)
    browser.get(explorer_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    title = browser.title
    Select(browser.find_element(By.ID, "model")).select_by_value("xss")
    wait.until(lambda d: any(XSS_LABELS[0] in option.text for option in
                             d.find_elements(By.CSS_SELECTOR, "#target option")))
    click(browser, "#cell-button")
    wait.until(lambda d: d.find_element(By.ID, "input-view").is_displayed())
    Select(browser.find_element(By.ID, "target")).select_by_value("0")
    click(browser, "#m-fastcam")
    click(browser, "#run")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.result.done[data-method="fastcam"]'))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#prediction tr")) == 5)

    shown = browser.find_element(By.ID, "prediction").text
    assert sum(shown.count(label) for label in XSS_LABELS) == 5, shown
    explained = card(browser, "fastcam").find_element(By.CSS_SELECTOR, ".explained").text
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
    wait = waiting(browser, 60)
    browser.get(explorer_url)
    browser.execute_script("localStorage.setItem('saliency-token', 'stale')")
    browser.get(explorer_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    assert browser.execute_script("return localStorage.getItem('saliency-token')") is None
    click(browser, "#auth summary")
    token = browser.find_element(By.ID, "token")
    token.send_keys("s3cret")
    click(browser, "#seed")  # the change event
    wait.until(lambda d: d.execute_script("return sessionStorage.getItem('saliency-token')")
               == "s3cret")
    assert browser.execute_script("return localStorage.length") == 0
    assert "sessionStorage" in browser.find_element(By.ID, "token-note").text


def test_a_phone_sees_the_whole_page_and_its_results(explorer_url: str,
                                                     browser: WebDriver) -> None:
    """At 400 px wide nothing is wider than the screen, before, during and after a run, and
    Explain brings the results (below the form there) into view."""
    size = browser.get_window_size()
    browser.set_window_size(400, 860)
    try:
        wait = ready_page(browser, explorer_url)
        assert browser.execute_script("return window.innerWidth") <= 400
        width, inner = page_width(browser)
        assert width <= inner, (width, inner)
        click(browser, "#cell-button")
        wait.until(lambda d: d.find_element(By.ID, "input-view").is_displayed())
        for method in ("gradcam", "rise", "decam"):
            click(browser, f"#m-{method}")
        set_param(browser, "rise", "masks", "64")
        set_param(browser, "decam", "generations", "4")
        set_param(browser, "decam", "population", "8")
        assert not in_view(browser, "#output")  # below the form
        click(browser, "#run")
        wait.until(lambda d: in_view(d, "#output"))
        width, inner = page_width(browser)
        assert width <= inner, (width, inner)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 3)
        click(browser, "#chart-button")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-plot svg circle"))
        width, inner = page_width(browser)
        assert width <= inner, (width, inner)
    finally:
        browser.set_window_size(size["width"], size["height"])


def test_one_colour_map_for_intermediate_and_final_maps(explorer_url: str,
                                                        browser: WebDriver) -> None:
    """The page draws a search's intermediate maps with the colour map of the server's
    overlay (render.drawing.jet), so the final overlay continues what the run showed."""
    ready_page(browser, explorer_url)
    values = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
    drawn = browser.execute_script("return arguments[0].map((v) => colour(v))", values)
    expected = jet(np.array(values, np.float32)).tolist()
    for value, page, server in zip(values, drawn, expected, strict=True):
        assert all(abs(a - b) <= 1 for a, b in zip(page, server, strict=True)), (value, page)


def test_a_method_without_progress_shows_a_running_bar_and_time(explorer_url: str,
                                                                browser: WebDriver) -> None:
    """A method that reports no steps (RISE) has an indeterminate bar and a running clock
    from the start, not an empty bar."""
    ready_page(browser, explorer_url)
    fresh = browser.execute_script(
        "const element = card('rise'); const bar = element.querySelector('progress');"
        "const out = [bar.position, element.querySelector('.elapsed') !== null,"
        "             element.querySelector('.progress-text').textContent];"
        "element.remove(); return out;")
    position, has_clock, text = fresh
    assert position == -1, "the bar is indeterminate (no value) until a step is reported"
    assert has_clock and text == "running"


def test_named_values_are_lists_and_the_chart_follows_the_model(explorer_url: str,
                                                                browser: WebDriver) -> None:
    wait = ready_page(browser, explorer_url)
    for name, values in (("strategy", STRATEGIES), ("aggregate", AGGREGATES)):
        field = browser.find_element(
            By.CSS_SELECTOR, f'.method-option[data-method="decam"] .params [name="{name}"]')
        assert field.tag_name == "select"
        assert tuple(Select(field).options[i].get_attribute("value")
                     for i in range(len(values))) == values
    layer = browser.find_element(
        By.CSS_SELECTOR, '.method-option[data-method="gradcam"] .params [name="layer"]')
    assert layer.tag_name == "select"
    assert [o.get_attribute("value") for o in Select(layer).options][:2] == ["", "scale_0"]
    assert browser.find_element(By.ID, "resize").tag_name == "select"
    # The report has a table for demo, none for the xss copy: no chart rather than demo's.
    wait.until(lambda d: d.find_element(By.ID, "chart-button").is_displayed())
    Select(browser.find_element(By.ID, "model")).select_by_value("xss")
    wait.until(lambda d: not d.find_element(By.ID, "chart-button").is_displayed())
    assert not browser.find_element(By.ID, "chart").is_displayed()
    Select(browser.find_element(By.ID, "model")).select_by_value("demo")
    wait.until(lambda d: d.find_element(By.ID, "chart-button").is_displayed())


def test_root_sends_a_browser_to_the_explorer(explorer_url: str, browser: WebDriver) -> None:
    root = explorer_url.removesuffix("explorer/")
    browser.get(root)
    waiting(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
    assert browser.current_url == explorer_url


def test_a_server_with_a_token_asks_for_it(repository: Path, browser: WebDriver) -> None:
    """With tokens configured the page opens, says it needs the token and where to put it;
    with it, the models load and a synthetic cell (a data route) is generated."""
    config = make_config(repository, http_port=0, auth_token="s3cret")
    with RunningServer(config) as running:
        url = f"http://127.0.0.1:{running.server.http_port}/explorer/"
        wait = waiting(browser, 60)
        browser.get(url)
        browser.execute_script("sessionStorage.clear()")
        browser.get(url)
        wait.until(lambda d: "401" in d.find_element(By.ID, "status").text)
        assert "Bearer token" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "token").is_displayed()
        browser.find_element(By.ID, "token").send_keys("s3cret")
        click(browser, "#seed")  # the change event
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".method-option"))
        click(browser, "#cell-button")
        wait.until(lambda d: d.find_element(By.ID, "input-view").is_displayed())
        assert browser.find_element(By.ID, "input-caption").text.startswith("cell 0:")
        browser.execute_script("sessionStorage.clear()")
