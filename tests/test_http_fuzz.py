"""Hostile bodies and query strings thrown at every HTTP route of a real server: none may
be answered 5xx, and the server must still answer ``/healthz`` and a valid Predict after.

A seeded generator (``random.Random``, so every run sends the same requests) takes a valid
request for each route and breaks it: wrong types, huge, negative and non-finite numbers,
integers of thousands of digits, nesting thousands deep, nulls, unknown fields, bad enum
names, bad base64, empty bodies, wrong content types, multipart forms with hostile fields,
and GETs with hostile query parameters. The counts of statuses seen are printed
(``pytest -s``).
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningServer, make_config

LIMITS = {"max_batch": 4, "max_pixels": 96 * 96, "max_samples": 8, "max_steps": 8,
          "max_masks": 32, "max_population": 8, "max_generations": 3,
          "max_message_bytes": 4 * 1024 * 1024}
SEED = 31
ROUNDS = 24  # hostile variants per route and body kind: a few hundred requests in all


class Raw:
    """JSON text put into a body as it is (what ``json.dumps`` cannot or will not write)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dump(value: Any) -> str:
    """``value`` as JSON text, ``Raw`` parts verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def png(size: int = 32) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


PNG = base64.b64encode(png()).decode()
TENSOR = {"shape": [1, 3, 32, 32], "dtype": "DTYPE_FLOAT32",
          "data": base64.b64encode(np.zeros((1, 3, 32, 32), np.float32).tobytes()).decode()}
INSTANCE = np.zeros((3, 32, 32)).tolist()

HOSTILE_SCALARS: list[Any] = [
    None, True, False, 0, -1, 2**31, -(2**31) - 1, 2**40, -(2**40), 2**63, 2**64, 10**20,
    -(10**20), 12345, 1e20, -1e20, 1e300, 0.5, -0.0, 1e-320,
    Raw("9" * 5000), Raw("-" + "9" * 4400), Raw("1e999"), Raw("-1e999"), Raw("NaN"),
    Raw("Infinity"), Raw("-Infinity"), Raw("1" + "0" * 400 + ".5"),
    "", "x" * 10_000, "gradcam", "METHOD_RISE", "rise", "shap", "@@not base64@@", "AAAA",
    "é\u0000\ud7ff", "12345", "99999999999999999999999", "-5", "1e20", "blur", "zero",
]


def deep(rng: random.Random) -> Raw:
    depth = rng.choice([33, 100, 999, 1000, 5000, 100_000])
    if rng.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def hostile(rng: random.Random, level: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.55 or level > 2:
        return rng.choice(HOSTILE_SCALARS)
    if roll < 0.7:
        return deep(rng)
    if roll < 0.85:
        return [hostile(rng, level + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["unknown", "steps", "shape", "b64", "data", "class_index"]):
            hostile(rng, level + 1) for _ in range(rng.randint(0, 3))}


# Field names a route's body may carry (its own, its params messages', and some it does not).
EXPLAIN_FIELDS = ["model", "version", "method", "input", "target", "seed", "top_k",
                  "return_overlay", "integrated_gradients", "smoothgrad", "rise", "fastcam",
                  "decam", "occlusion", "gradcam", "integratedGradients", "colour"]
PREDICT_FIELDS = ["model", "version", "input", "top_k", "colour"]
INPUT_PATHS = [("input", "tensor", "shape"), ("input", "tensor", "dtype"),
               ("input", "tensor", "data"), ("input", "images", "images"), ("input", "images"),
               ("input", "tensor"), ("target", "class_index"), ("target", "classes")]
PARAMS = {"integrated_gradients": ["steps", "baseline", "internal_batch_size"],
          "smoothgrad": ["samples", "noise", "internal_batch_size"],
          "rise": ["masks", "cells", "probability"], "fastcam": ["weights"],
          "decam": ["population", "generations", "grid", "refine"]}
KSERVE_KEYS = ["instances", "top_k", "method", "parameters", "target", "seed", "model",
               "return_overlay", "inputs", "colour"]


def set_path(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = body
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def native_body(rng: random.Random, explain: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "input": {"tensor": dict(TENSOR)}}
    if explain:
        method = rng.choice(list(PARAMS))
        body["method"] = method
        body[method] = {name: rng.choice(HOSTILE_SCALARS) for name in
                        rng.sample(PARAMS[method], rng.randint(0, len(PARAMS[method])))}
    fields = EXPLAIN_FIELDS if explain else PREDICT_FIELDS
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.4:
            set_path(body, rng.choice(INPUT_PATHS), hostile(rng))
        else:
            body[rng.choice(fields)] = hostile(rng)
    return body


def kserve_body(rng: random.Random, explain: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"instances": [rng.choice([PNG, {"b64": PNG}, INSTANCE])]}
    if explain:
        method = rng.choice([*PARAMS, None])
        if method is not None:
            body["method"] = method
            body["parameters"] = {name: hostile(rng) for name in
                                  rng.sample(PARAMS[method], rng.randint(1, len(PARAMS[method])))}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(KSERVE_KEYS)
        if key == "instances" and rng.random() < 0.5:
            body[key] = [hostile(rng) for _ in range(rng.randint(0, 2))]
        elif key == "parameters" and rng.random() < 0.5:
            body[key] = {rng.choice(["steps", "weights", "masks", "baseline", "nope"]):
                         hostile(rng)}
        else:
            body[key] = hostile(rng)
    return body


RAW_BODIES = [b"", b"null", b"[]", b'"text"', b"{", b"{}", b"\xff\xfe\x00{", b"[" * 100_000,
              b'{"model": "tiny", "input": ' + b"[" * 3000, b"1" * 6000, b"\x00" * 64,
              b'{"a": 1}' * 3, b'{"instances": [' + b"1," * 1000 + b"]}"]
CONTENT_TYPES = ["application/json", "text/plain", "multipart/form-data",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""]


def raw_request(rng: random.Random, path: str) -> dict[str, Any]:
    return {"method": "POST", "url": path, "content": rng.choice(RAW_BODIES),
            "headers": {"content-type": rng.choice(CONTENT_TYPES)}}


def form_request(rng: random.Random, path: str, explain: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"model": rng.choice(["tiny", "", "x" * 300])}
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["request", "param", "field", "image", "file", "method"])
        if kind == "request":
            data["request"] = dump(rng.choice([hostile(rng), native_body(rng, explain)]))
        elif kind == "param":
            data["param"] = rng.choice(["steps=1e20", "steps=99999999999999999999", "weights=",
                                        "weights=1,x", "masks=-5", "steps", "=", "steps=" +
                                        "9" * 5000, "baseline=nope"])
        elif kind == "field":
            data[rng.choice(EXPLAIN_FIELDS)] = dump(hostile(rng))
        elif kind == "method":
            data["method"] = rng.choice(["integrated_gradients", "12345", "rise", "", "nope"])
        elif kind == "image":
            files.append(("image", ("a.png", rng.choice([png(), b"", b"not png",
                                                         png(8)]), "image/png")))
        else:
            files.append(("picture", ("a.png", png(), "image/png")))
    if not files:
        files.append(("image", ("a.png", png(), "image/png")))
    return {"method": "POST", "url": path, "data": data, "files": files}


QUERY_VALUES = ["99999999999999999999999", "9" * 5000, "-1", "1e5", "latest", "", " 1",
                "٣", "0x10", "1.0", "\u00bd", "%00", "1&version=2", "4294967296",
                "18446744073709551616"]
NAMES = ["tiny", "nope", "", "x" * 1000, "%2e%2e", "tiny%00", "ti ny", "..", "é"]


def get_request(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(NAMES)
    path = rng.choice([f"/api/v1/models/{name}", f"/v1/models/{name}", "/api/v1/models",
                       "/v1/models", "/healthz", "/readyz", "/openapi.json"])
    params = {rng.choice(["version", "v", "model"]): rng.choice(QUERY_VALUES)
              for _ in range(rng.randint(0, 2))}
    return {"method": "GET", "url": path, "params": params}


def requests(seed: int) -> Iterator[dict[str, Any]]:
    """The fuzzed requests, the same for one seed."""
    rng = random.Random(seed)
    native = [("/api/v1/explain", True), ("/api/v1/explain/stream", True),
              ("/api/v1/predict", False)]
    kserve = [("/v1/models/{}:explain", True), ("/v1/models/{}:predict", False)]
    for _ in range(ROUNDS):
        for path, explain in native:
            yield {"method": "POST", "url": path,
                   "content": dump(native_body(rng, explain)).encode(),
                   "headers": {"content-type": "application/json"}}
            yield form_request(rng, path, explain)
            yield raw_request(rng, path)
        for path, explain in kserve:
            url = path.format(rng.choice(["tiny", "tiny", "nope", "x" * 300]))
            yield {"method": "POST", "url": url,
                   "content": dump(kserve_body(rng, explain)).encode(),
                   "headers": {"content-type": "application/json"}}
            yield raw_request(rng, url)
        yield get_request(rng)
        yield get_request(rng)


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, http_port=0, **LIMITS)).start()
    yield running
    running.stop()


def test_no_hostile_request_gets_a_5xx_and_the_server_stays_up(web: RunningServer) -> None:
    statuses: Counter[int | str] = Counter()
    failures: list[str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as http:
        for request in requests(SEED):
            body = request.get("content", request.get("data", request.get("params")))
            try:
                response = http.request(**request)
            except httpx.TransportError as exc:  # the server dropped the connection
                statuses["dropped"] += 1
                failures.append(f"{request['method']} {request['url']} {str(body)[:200]!r} → "
                                f"{type(exc).__name__}")
                continue
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(f"{request['method']} {request['url']} {str(body)[:200]!r} → "
                                f"{response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and len(error["message"]) <= 1024, error
        print(f"\nHTTP fuzz: {sum(statuses.values())} requests, statuses "
              f"{dict(sorted(statuses.items(), key=str))}")
        assert not failures, f"{len(failures)} failed:\n" + "\n".join(failures[:10])
        assert sum(statuses.values()) >= 300
        assert http.get("/healthz").status_code == 200
        valid = http.post("/api/v1/predict", json={"model": "tiny", "input": {"tensor": TENSOR}})
        assert valid.status_code == 200, valid.text
