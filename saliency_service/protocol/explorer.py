"""The web explorer's routes: its static files at ``/``, a synthetic cell with its ground
truth, the evaluation report's cost-vs-quality figures, and the OpenAPI description."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from saliency_service.evaluation.cells import CLASS_NAMES, TEST_CONFIG, CellConfig, generate
from saliency_service.protocol.calls import request_id_from
from saliency_service.protocol.openapi import spec
from saliency_service.protocol.rest import error_body
from saliency_service.protocol.status import http_status_of

STATIC = Path(__file__).resolve().parent / "explorer_files"
REPORT = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
CELL_SIZES = (16, 512)


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


def _error(code: grpc.StatusCode, message: str) -> JSONResponse:
    """The API's JSON error shape and status."""
    return JSONResponse(error_body(code, message, request_id_from(None)),
                        status_code=http_status_of(code))


async def cell_route(request: Request) -> Response:
    try:
        index = int(request.query_params.get("index", "0"))
        size = int(request.query_params.get("size", "128"))
    except ValueError:
        return _error(grpc.StatusCode.INVALID_ARGUMENT, "index and size must be integers")
    low, high = CELL_SIZES
    if index < 0 or not low <= size <= high:
        return _error(grpc.StatusCode.INVALID_ARGUMENT,
                      f"index must be >= 0 and size within [{low}, {high}], got {index}, {size}")
    return JSONResponse(await run_in_threadpool(cell, index, size))


def _tables(text: str) -> list[list[str]]:
    """The markdown tables of ``text``, each as its consecutive ``|`` lines."""
    tables: list[list[str]] = []
    previous = False
    for line in text.splitlines():
        row = line.startswith("|")
        if row and not previous:
            tables.append([])
        if row:
            tables[-1].append(line)
        previous = row
    return tables


def evaluation_rows(text: str) -> list[dict[str, Any]]:
    """Method, engine, p50 ms and RCAP of each row of the report's first table that has
    those columns (★ = on the cost-vs-quality front)."""
    wanted = {"method", "engine", "p50 ms", "RCAP ↑"}
    for lines in _tables(text):
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        if wanted <= set(header):
            break
    else:
        return []
    rows = []
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=False))
        try:
            row = {"method": cells["method"].replace("★", "").strip(),
                   "engine": cells["engine"], "p50_ms": float(cells["p50 ms"]),
                   "rcap": float(cells["RCAP ↑"]), "front": "★" in cells["method"]}
        except (KeyError, ValueError):
            continue
        rows.append(row)
    return rows


async def evaluation_route(request: Request) -> Response:
    if not REPORT.is_file():
        return _error(grpc.StatusCode.NOT_FOUND, f"no evaluation report at {REPORT}")
    text = REPORT.read_text()
    title = next((line[2:] for line in text.splitlines() if line.startswith("# ")), "")
    return JSONResponse({"title": title, "rows": evaluation_rows(text),
                         "report": "/explorer/evaluation.md"})


async def report_route(request: Request) -> Response:
    if not REPORT.is_file():
        return _error(grpc.StatusCode.NOT_FOUND, f"no evaluation report at {REPORT}")
    return PlainTextResponse(REPORT.read_text(), media_type="text/markdown; charset=utf-8")


async def index_route(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


async def openapi_route(request: Request) -> Response:
    return JSONResponse(spec())


def routes() -> list[BaseRoute]:
    return [
        Route("/", index_route, methods=["GET"]),
        Route("/openapi.json", openapi_route, methods=["GET"]),
        Route("/explorer/cell", cell_route, methods=["GET"]),
        Route("/explorer/evaluation", evaluation_route, methods=["GET"]),
        Route("/explorer/evaluation.md", report_route, methods=["GET"]),
        Mount("/explorer", StaticFiles(directory=STATIC), name="explorer"),
    ]
