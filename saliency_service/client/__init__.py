"""The Python client and the CLI's client commands; needs only grpcio, protobuf and numpy."""

from saliency_service.client.client import SaliencyClient

__all__ = ["SaliencyClient"]
