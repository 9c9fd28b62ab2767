"""The web explorer's routes: its page and files under ``/explorer/``, a synthetic cell with its
ground truth (for classifiers) or a generated scene with its objects (for detectors and
segmenters), each method's named parameter values, the evaluation report's cost-vs-quality
rows per model, the OpenAPI description, and ``GET /`` (KServe's liveness for clients, a
redirect to the explorer for browsers).

Every explorer response carries a Content-Security-Policy that allows only the explorer's own
script, so a string the page shows (a package's class labels) can never run as code. The page
and its files are open; the data routes need the bearer token as the API does (``rest.py``),
and the cell and the scene, the routes that compute, take an admission slot and a worker like
a call.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from saliency_service.core.errors import InvalidInput, NotFound, ServiceError
from saliency_service.core.repository import RESIZE_MODES
from saliency_service.core.request import RequestState
from saliency_service.evaluation import scenes
from saliency_service.evaluation.cells import CLASS_NAMES, TEST_CONFIG, CellConfig, generate
from saliency_service.methods import registry
from saliency_service.protocol.calls import Calls, request_id_from
from saliency_service.protocol.openapi import spec
from saliency_service.protocol.rest import call_info, error_response

T = TypeVar("T")
log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "explorer_files"
REPORT = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
PAGE = "/explorer/"
CELL_SIZES = (16, 512)
SCENE_SIZES = (32, 512)
SCENE_SEED = 2  # scenes the shipped scene models were neither trained (0) nor checked (1) on
MAX_CELL_INDEX = 2**31 - 1  # the cells' seeds are int64; a person never pages this far
_DIGITS = re.compile(r"[0-9]{1,10}")
# Only the explorer's own files run; images may be data: or blob: URLs (uploads, maps).
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY,
                    "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer"}
_MODEL_FLAG = re.compile(r"--model\s+([A-Za-z0-9._-]+)")
_WANTED = {"method", "engine", "p50 ms", "RCAP ↑"}


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _png(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def cell(index: int, size: int) -> dict[str, Any]:
    """Cell ``index`` of the test set at ``size`` px: the image, its class and its ground
    truth (0.9 on the discriminative part, 0.4 on the rest of the object)."""
    batch = generate(1, CellConfig(size=size, backgrounds=TEST_CONFIG.backgrounds,
                                   seed=TEST_CONFIG.seed), start=index)
    truth = np.clip(batch.heatmaps[0] / 0.9 * 255.0, 0, 255).astype(np.uint8)
    label = int(batch.labels[0])
    return {"image": _png(batch.images[0]), "ground_truth": _png(truth),
            "class_index": label, "label": CLASS_NAMES[label], "index": index, "size": size}


def scene(index: int, size: int) -> dict[str, Any]:
    """Scene ``index`` at ``size`` px: the image, its objects (box in pixels, class) and the
    objects' masks as the ground truth, for trying a detector or segmenter."""
    batch = scenes.generate(1, scenes.SceneConfig(size=size, seed=SCENE_SEED), start=index)
    objects = batch.scenes[0]
    found = [{"box": dict(zip(("x1", "y1", "x2", "y2"), map(float, box), strict=True)),
              "class_index": int(label), "label": scenes.CLASSES[int(label)]}
             for box, label in zip(objects.boxes, objects.classes, strict=True)]
    truth = np.where(batch.class_maps[0] > 0, 255, 0).astype(np.uint8)
    return {"image": _png(batch.images[0]), "ground_truth": _png(truth), "objects": found,
            "index": index, "size": size}


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The query parameter ``name`` as a plain decimal integer within [low, high].

    Raises InvalidInput naming the parameter, its range and the value given."""
    text = request.query_params.get(name, str(default))
    if _DIGITS.fullmatch(text) and low <= int(text) <= high:
        return int(text)
    shown = text if len(text) <= 24 else f"{text[:20]}… ({len(text)} characters)"
    raise InvalidInput(f"{name} must be an integer within [{low}, {high}], got {shown!r}")


async def admitted(calls: Calls, request: Request, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a worker thread once admission grants a slot, as every call runs:
    beyond the server's capacity it is refused (RESOURCE_EXHAUSTED) instead of competing
    with the admitted calls for the CPU. The slot is freed when the worker ends, even if the
    client has gone."""
    state = RequestState(call_info(request).deadline)
    await calls.admission.acquire(state)
    worker = asyncio.get_running_loop().run_in_executor(calls.executor, work, *args)

    def release(done: asyncio.Future[T]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: a client that left has nobody to tell
        calls.admission.release(state)

    worker.add_done_callback(release)
    return await asyncio.shield(worker)


# ---- the evaluation report -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostTable:
    """One model's cost-vs-quality table in the report."""

    model: str
    title: str  # the heading of the section holding it
    rows: list[dict[str, Any]]


def _row(header: list[str], line: str) -> dict[str, Any] | None:
    cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=False))
    try:
        return {"method": cells["method"].replace("★", "").strip(),
                "engine": cells["engine"], "p50_ms": float(cells["p50 ms"]),
                "rcap": float(cells["RCAP ↑"]), "front": "★" in cells["method"]}
    except (KeyError, ValueError):
        return None


def cost_tables(text: str) -> list[CostTable]:
    """Each model's first table with method, engine, p50 ms and RCAP columns (★ = on the
    cost-vs-quality front), in report order; a table belongs to the model named by the last
    ``--model`` before it (the command that produced it)."""
    tables: list[CostTable] = []
    model = title = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        model = (_MODEL_FLAG.findall(line) or [model])[-1]
        if not line.startswith("|"):
            continue
        block = [line]
        while index < len(lines) and lines[index].startswith("|"):
            block.append(lines[index])
            index += 1
        header = [cell.strip() for cell in block[0].strip("|").split("|")]
        if not _WANTED.issubset(header) or any(t.model == model for t in tables):
            continue
        rows = [row for row in (_row(header, line) for line in block[2:]) if row is not None]
        if model and rows:
            tables.append(CostTable(model, title, rows))
    return tables


def evaluation_rows(text: str, model: str | None = None) -> list[dict[str, Any]]:
    """The cost-vs-quality rows of ``model`` (default: the report's first table's)."""
    tables = cost_tables(text)
    chosen = [t for t in tables if model is None or t.model == model]
    return chosen[0].rows if chosen else []


# ---- routes ------------------------------------------------------------------------------


async def root_route(request: Request) -> Response:
    """``GET /``: a browser (it asks for HTML) goes to the explorer; any other client gets
    KServe's liveness answer, which KServe's SDK reads from ``/``."""
    vary = {"vary": "Accept"}
    if "text/html" in request.headers.get("accept", ""):
        return _secured(RedirectResponse(PAGE, status_code=307, headers=vary))
    return JSONResponse({"status": "alive"}, headers=vary)


async def page_redirect_route(request: Request) -> Response:
    return _secured(RedirectResponse(PAGE, status_code=307))


async def index_route(request: Request) -> Response:
    return _secured(FileResponse(STATIC / "index.html"))


async def openapi_route(request: Request) -> Response:
    return JSONResponse(spec())


async def evaluation_route(request: Request) -> Response:
    if not REPORT.is_file():
        raise NotFound(f"no evaluation report at {REPORT}")
    text = REPORT.read_text()
    tables = cost_tables(text)
    model = request.query_params.get("model")
    chosen = [t for t in tables if model is None or t.model == model]
    if not chosen:
        raise NotFound(f"the evaluation report has no cost-vs-quality table for model "
                       f"{model!r}; it has tables for {', '.join(t.model for t in tables)}")
    table = chosen[0]
    return JSONResponse({"model": table.model, "title": table.title, "rows": table.rows,
                         "report": "/explorer/evaluation.md"})


async def report_route(request: Request) -> Response:
    if not REPORT.is_file():
        raise NotFound(f"no evaluation report at {REPORT}")
    return PlainTextResponse(REPORT.read_text(), media_type="text/markdown; charset=utf-8")


async def choices_route(request: Request) -> Response:
    """The values offered as lists rather than text fields: each method's parameters that
    take one of a few names (``decam.strategy``), and the request's ``resize`` modes."""
    methods: dict[str, dict[str, list[str]]] = {}
    for handler in registry.handlers():
        named = {field.name: list(field.metadata["choices"])
                 for field in dataclasses.fields(handler.Params)
                 if field.metadata.get("choices")}
        if named:
            methods[handler.name] = named
    return JSONResponse({"methods": methods, "resize": list(RESIZE_MODES)})


def _guarded(route: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """The route with a client's mistake answered in the API's error shape (one log line)."""
    async def endpoint(request: Request) -> Response:
        try:
            return _secured(await route(request))
        except ServiceError as exc:
            response = error_response(exc, request_id_from(request.headers.get("x-request-id")))
            log.info("explorer %s refused: %s", request.url.path, exc,
                     extra={"event": "explorer_refused", "path": request.url.path,
                            "code": response.status_code})
            return _secured(response)

    return endpoint


class ExplorerFiles(StaticFiles):
    """The page's static files, with the explorer's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        return _secured(await super().get_response(path, scope))


def routes(calls: Calls) -> list[BaseRoute]:
    """The explorer's routes; its cell runs under ``calls``' admission and workers."""

    async def cell_route(request: Request) -> Response:
        low, high = CELL_SIZES
        index = query_int(request, "index", 0, 0, MAX_CELL_INDEX)
        size = query_int(request, "size", 128, low, high)
        return JSONResponse(await admitted(calls, request, cell, index, size))

    async def scene_route(request: Request) -> Response:
        low, high = SCENE_SIZES
        index = query_int(request, "index", 0, 0, MAX_CELL_INDEX)
        size = query_int(request, "size", 64, low, high)
        return JSONResponse(await admitted(calls, request, scene, index, size))

    get = ["GET"]
    return [
        Route("/", root_route, methods=get),
        Route("/openapi.json", openapi_route, methods=get),
        Route("/explorer", page_redirect_route, methods=get),
        Route(PAGE, index_route, methods=get),
        Route("/explorer/cell", _guarded(cell_route), methods=get),
        Route("/explorer/scene", _guarded(scene_route), methods=get),
        Route("/explorer/choices", _guarded(choices_route), methods=get),
        Route("/explorer/evaluation", _guarded(evaluation_route), methods=get),
        Route("/explorer/evaluation.md", _guarded(report_route), methods=get),
        Mount("/explorer", ExplorerFiles(directory=STATIC), name="explorer"),
    ]
