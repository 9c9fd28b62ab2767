"""KServe's V1 protocol as its clients use it: liveness at ``/``, the model list, model
readiness, ``:predict`` and ``:explain`` (a method chosen by the server when none is named),
first with plain HTTP, then with KServe's own ``InferenceRESTClient`` when it is installed."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningServer, make_config
from tests.kserve_env import run_in_kserve


def png(seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def base(repository: Path) -> Iterator[str]:
    running = RunningServer(make_config(repository, http_port=0)).start()
    yield f"http://127.0.0.1:{running.server.http_port}"
    running.stop()


def test_v1_health_routes(base: str) -> None:
    with httpx.Client(base_url=base, timeout=30) as http:
        for accept in ({}, {"accept": "application/json"}, {"accept": "*/*"}):
            live = http.get("/", headers=accept)
            assert live.status_code == 200 and live.json() == {"status": "alive"}, accept
        assert http.get("/v1/models").json() == {"models": ["broken", "tiny"]}
        ready = http.get("/v1/models/tiny")
        assert ready.status_code == 200 and ready.json() == {"name": "tiny", "ready": True}
        broken = http.get("/v1/models/broken")
        assert broken.status_code == 503 and broken.json() == {"name": "broken", "ready": False}
        assert http.get("/v1/models/absent").status_code == 404


def test_explain_without_a_method_runs_the_one_the_server_picks(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as http:
        response = http.post("/v1/models/tiny:explain", json={"instances": [png()]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["cost"]["method"] not in ("METHOD_UNSPECIFIED", "METHOD_AUTO")
        assert np.asarray(body["explanations"][0]["saliency"]).shape == (32, 32)


def test_kserve_sdk_client(base: str) -> None:
    """KServe's SDK (0.21) against the server: liveness, readiness, predict, explain."""
    completed = run_in_kserve(f"""
        import asyncio, base64, io
        import httpx, numpy as np
        from kserve.inference_client import InferenceRESTClient, RESTConfig
        base = {base!r}
        images = {[png(1), png(2)]!r}

        async def run():
            client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60))
            assert await client.is_server_live(base) is True
            assert await client.is_model_ready(base, "tiny") is True
            assert await client.is_model_ready(base, "broken") is False
            predicted = await client.infer(base, {{"instances": images}}, model_name="tiny")
            assert len(predicted["predictions"]) == 2
            assert {{"class_index", "label", "probability"}} <= set(predicted["predictions"][0])
            explained = await client.explain(base, "tiny", {{"instances": images[:1]}})
            assert np.asarray(explained["explanations"][0]["saliency"]).shape == (32, 32)
            try:
                await client.infer(base, {{"inputs": []}}, model_name="tiny")
            except httpx.HTTPStatusError as error:
                assert "instances" in error.response.text
            else:
                raise AssertionError("a V1 body without instances was accepted")
            print("kserve sdk ok")

        asyncio.run(run())
    """)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "kserve sdk ok" in completed.stdout
