"""The explorer's HTTP routes over a real server on loopback, called with httpx: the page
answers with a Content-Security-Policy that forbids inline script, its data routes need the
bearer token and its computing route passes admission, bad query values are 400, ``GET /``
is KServe's liveness for clients and a redirect to the explorer for browsers, and the
cost-vs-quality rows are per model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from saliency_service.core.repository import RESIZE_MODES
from saliency_service.core.request import RequestState
from saliency_service.evaluation.cells import CLASS_NAMES
from saliency_service.methods.decam import AGGREGATES, STRATEGIES
from saliency_service.protocol.explorer import MAX_CELL_INDEX, REPORT, evaluation_rows
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# The page and its files, health and the API description: open without a token.
OPEN_PATHS = ("/", "/explorer", "/explorer/", "/explorer/explorer.js", "/explorer/explorer.css",
              "/explorer/index.html", "/healthz", "/readyz", "/openapi.json")
# The explorer's data routes: the token, as the API.
DATA_PATHS = ("/explorer/cell?index=1&size=32", "/explorer/scene?index=1&size=32",
              "/explorer/evaluation",
              "/explorer/evaluation?model=demo", "/explorer/evaluation.md", "/explorer/choices")


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    """One worker and no queue, so a held slot refuses every other computing call."""
    running = RunningServer(make_config(repository, http_port=0, auth_token=TOKEN,
                                        max_inflight=1, max_queue=0)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(web: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, http_status: int, grpc_status: str,
                 words: str = "") -> str:
    assert response.status_code == http_status, response.text
    error = response.json()["error"]
    assert error["code"] == http_status and error["status"] == grpc_status, error
    assert words.lower() in error["message"].lower(), error["message"]
    return str(error["message"])


# ---- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("path", DATA_PATHS)
def test_explorer_data_routes_need_the_token(http: httpx.Client, path: str) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}):
        assert_error(http.get(path, headers=headers), 401, "UNAUTHENTICATED",
                     "Authorization: Bearer")
    assert http.get(path, headers=AUTH).status_code == 200, path


@pytest.mark.parametrize("path", OPEN_PATHS)
def test_the_page_and_health_stay_open(http: httpx.Client, path: str) -> None:
    response = http.get(path, headers={"accept": "text/html"}, follow_redirects=True)
    # /readyz is 503 while warming up: open means answered, not refused for a token.
    assert response.status_code == (503 if response.status_code == 503 and path == "/readyz"
                                    else 200), (path, response.text[:200])


# ---- admission ---------------------------------------------------------------------------


def test_a_cell_takes_an_admission_slot(web: RunningServer, http: httpx.Client) -> None:
    """With the one worker held, a cell is refused as any call (429), not computed beside
    it; once free, it is admitted and counted."""
    admission = web.server.calls.admission
    holder = RequestState()
    web.call(admission.acquire(holder))
    try:
        refused = http.get("/explorer/cell", params={"index": 1, "size": 32}, headers=AUTH)
        assert_error(refused, 429, "RESOURCE_EXHAUSTED", "capacity")
    finally:
        web.loop.call_soon_threadsafe(admission.release, holder)
    admitted = admission.admitted
    answer = http.get("/explorer/cell", params={"index": 1, "size": 32}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] in CLASS_NAMES
    assert admission.admitted == admitted + 1
    assert admission.inflight == 0


# ---- query values ------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "words"), [
    ({"index": str(2**64)}, f"index must be an integer within [0, {MAX_CELL_INDEX}]"),
    ({"index": str(2**63 - 1)}, "index must be an integer within"),
    ({"index": "9" * 5000}, "index must be an integer within"),
    ({"index": "-1"}, "index must be an integer within"),
    ({"index": "1e3"}, "index must be an integer within"),
    ({"index": "first"}, "got 'first'"),
    ({"index": ""}, "index must be an integer within"),
    ({"size": "8"}, "size must be an integer within [16, 512]"),
    ({"size": str(2**70)}, "size must be an integer within [16, 512]"),
    ({"size": "nan"}, "size must be an integer within"),
])
def test_bad_cell_queries_are_400(http: httpx.Client, params: dict[str, str],
                                  words: str) -> None:
    response = http.get("/explorer/cell", params=params, headers=AUTH)
    assert_error(response, 400, "INVALID_ARGUMENT", words)
    assert response.headers["x-request-id"]


def test_the_largest_cell_index_is_served(http: httpx.Client) -> None:
    response = http.get("/explorer/cell", params={"index": MAX_CELL_INDEX, "size": 16},
                        headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["index"] == MAX_CELL_INDEX


def test_unknown_evaluation_model_is_404_naming_the_models_it_has(http: httpx.Client) -> None:
    response = http.get("/explorer/evaluation", params={"model": "tiny"}, headers=AUTH)
    assert_error(response, 404, "NOT_FOUND", "no cost-vs-quality table for model 'tiny'")
    assert "demo" in response.json()["error"]["message"]


# ---- GET /: KServe's liveness for clients, the explorer for browsers ----------------------


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
def test_root_is_kserve_liveness_for_clients(http: httpx.Client, accept: str | None) -> None:
    headers = {"accept": accept} if accept else {}
    response = http.get("/", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}
    assert "accept" in response.headers["vary"].lower()


def test_root_redirects_browsers_to_the_explorer(http: httpx.Client) -> None:
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    response = http.get("/", headers={"accept": accept})
    assert response.status_code in (302, 303, 307)
    assert response.headers["location"] == "/explorer/"
    page = http.get("/", headers={"accept": accept}, follow_redirects=True)
    assert page.status_code == 200 and "saliency explorer" in page.text
    assert str(page.url).endswith("/explorer/")
    assert 'src="/explorer/explorer.js"' in page.text


# ---- security headers --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/explorer/", "/explorer/index.html", "/explorer/explorer.js",
                                  "/explorer/explorer.css", *DATA_PATHS])
def test_explorer_responses_forbid_inline_script(http: httpx.Client, path: str) -> None:
    response = http.get(path, headers=AUTH)
    assert response.status_code == 200
    policy = {part.split()[0]: part.split()[1:] for part in
              response.headers["content-security-policy"].split(";") if part.strip()}
    assert policy["script-src"] == ["'self'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in value for values in policy.values() for value in values)
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_has_no_inline_script_or_handlers(http: httpx.Client) -> None:
    """The page loads under its own policy: no inline script, style or event handler."""
    page = http.get("/explorer/").text
    assert re.findall(r"<script\b[^>]*>", page) == ['<script src="/explorer/explorer.js">']
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)
    assert not re.search(r"<style\b|\sstyle\s*=", page, re.IGNORECASE)


# ---- per-model data ----------------------------------------------------------------------


def test_evaluation_rows_are_those_of_the_selected_model(http: httpx.Client) -> None:
    text = REPORT.read_text()
    demo = http.get("/explorer/evaluation", params={"model": "demo"}, headers=AUTH).json()
    fashion = http.get("/explorer/evaluation", params={"model": "fashion"}, headers=AUTH).json()
    assert demo["model"] == "demo" and fashion["model"] == "fashion"
    assert demo["rows"] == evaluation_rows(text, "demo") and len(demo["rows"]) > 5
    assert fashion["rows"] == evaluation_rows(text, "fashion") and len(fashion["rows"]) > 5
    assert demo["rows"] != fashion["rows"]
    assert {row["method"] for row in fashion["rows"] if row["front"]} == {
        "smoe_scale", "gradcam_plus_plus", "fastcam", "integrated_gradients"}
    # Without a model: the report's first table, as before.
    assert http.get("/explorer/evaluation", headers=AUTH).json()["rows"] == demo["rows"]


def test_choices_list_each_methods_named_values(http: httpx.Client) -> None:
    choices = http.get("/explorer/choices", headers=AUTH).json()
    methods = choices["methods"]
    assert tuple(methods["decam"]["strategy"]) == STRATEGIES
    assert tuple(methods["decam"]["aggregate"]) == AGGREGATES
    assert "blur" in methods["decam"]["baseline"]
    assert "layer" not in methods.get("gradcam", {})  # the model's layers: from GetModel
    assert tuple(choices["resize"]) == RESIZE_MODES
