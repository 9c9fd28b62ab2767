"""The saliency explanation service: saliency maps, predictions and their cost for image models,
over gRPC, HTTP/JSON and KServe V1.

``from saliency_service import SaliencyClient`` needs only the client install
(``pip install saliency-service``); serving needs ``saliency-service[server]``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SaliencyClient"]


def __getattr__(name: str) -> Any:
    if name == "SaliencyClient":
        from saliency_service.client.client import SaliencyClient  # noqa: PLC0415

        return SaliencyClient
    raise AttributeError(f"module 'saliency_service' has no attribute {name!r}")
