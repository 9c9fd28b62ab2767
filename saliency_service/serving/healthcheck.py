"""A health probe for containers: exit 0 when the gRPC health service reports SERVING.

    python -m saliency_service.serving.healthcheck             # liveness ("") on SALIENCY_PORT
    python -m saliency_service.serving.healthcheck --service saliency.v1.Explainer   # readiness

Used by the image's ``HEALTHCHECK`` (Docker has no native gRPC probe; Kubernetes
does, and the manifests use it). With TLS on, pass ``--tls-ca`` (and a client
certificate when the server requires mutual TLS).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saliency_service.serving.healthcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    port = os.environ.get("SALIENCY_PORT", "50051")
    parser.add_argument("--address", default=f"127.0.0.1:{port}")
    parser.add_argument("--service", default="", help='"" = live; saliency.v1.Explainer = ready')
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("SALIENCY_PROBE_TLS_CA", ""),
        help="PEM bundle that signed the server certificate",
    )
    parser.add_argument("--tls-cert", default=os.environ.get("SALIENCY_PROBE_TLS_CERT", ""))
    parser.add_argument("--tls-key", default=os.environ.get("SALIENCY_PROBE_TLS_KEY", ""))
    parser.add_argument(
        "--server-name", default="localhost", help="name to verify the server certificate against"
    )
    return parser


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    with open(args.tls_ca, "rb") as handle:
        root = handle.read()
    key = chain = None
    if args.tls_cert:
        with open(args.tls_key, "rb") as handle:
            key = handle.read()
        with open(args.tls_cert, "rb") as handle:
            chain = handle.read()
    credentials = grpc.ssl_channel_credentials(root, key, chain)
    return grpc.secure_channel(
        args.address, credentials, options=[("grpc.ssl_target_name_override", args.server_name)]
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        sys.stderr.write(f"unhealthy: {error.code().name}: {error.details()}\n")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.stderr.write(f"unhealthy: {args.service or 'server'} is {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
