"""Remote models: DE-CAM, RISE and occlusion over a predictor served by KServe's own
ModelServer (0.21, its own environment: ``tests.kserve_env``) over V1 REST, V2 REST (JSON,
and binary tensors) and V2 gRPC, and by TorchServe 0.12 over its predictions API (JSON
numbers, and base64 tensors; deploy/torchserve/scores_handler.py), against the same ONNX
file loaded locally, on loopback.

Per method and protocol: the wall time of one gRPC Explain (one image, the method's
default parameters) remote and local, timed round-robin, their ratio, the remote calls
and bytes one request makes and the largest difference between the two maps. Per
protocol, one call of ``max_batch`` inputs taken apart (``calls``): the service encoding
it, the same request sent again already encoded (the predictor, the transfer and reading
the answer: what the service cannot make cheaper) and the local ONNX Runtime run of those
inputs. The figures go to ``remote.json``; with ``--predictors torchserve`` alone, to
``remote_torchserve.json``.

    nice python -m benchmarks.remote [--quick] [--repeats 5] [--size 64]
        [--predictors kserve,torchserve] [--model small|demo|resnet50] [--protocols v2-grpc,…]

``--model demo`` explains the shipped demo package (a ResNet at 128², whose own runs cost
more than the calls that carry them) instead of the small CNN, ``--model resnet50`` a
ResNet-50 at 224² (random weights: a production-sized model, far more work per byte sent);
their figures go to ``remote_demo.json`` and ``remote_resnet50.json``. ``--protocols``
keeps some of the KServe protocols (the REST ones carry large batches as JSON numbers,
which KServe's Python server decodes for seconds per call).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.common import (
    TorchServeProcess,
    base_parser,
    percentiles,
    resnet50_repository,
    table,
    time_calls,
    time_interleaved,
    write_json,
)
from saliency_service.core.remote import V2_GRPC
from saliency_service.core.repository import Repository
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config
from tests.onnx_models import small_cnn, write_package
from tests.test_remote_models import PROTOCOLS, endpoint, start_predictor, stop, write_remote
from tests.test_remote_torchserve import HANDLER, archive_scores_model, remote_of

METHODS = {"decam": pb.METHOD_DECAM, "rise": pb.METHOD_RISE, "occlusion": pb.METHOD_OCCLUSION}
QUICK_PARAMS = {"decam": {"decam": pb.DecamParams(population=8, generations=4)},
                "rise": {"rise": pb.RiseParams(masks=128)}, "occlusion": {}}
MAX_BATCH = 64
# KServe's gRPC server takes messages up to 8 MiB: a call carries at most this many bytes.
MAX_CALL_BYTES = 8 << 20
DEMO_PACKAGE = Path(__file__).resolve().parent.parent / "models" / "demo" / "1"
MODELS = ("small", "demo", "resnet50")
CONCURRENCY = 2
PREDICTORS = ("kserve", "torchserve")
# Package name → how its manifest calls TorchServe.
TORCHSERVE_VARIANTS = {"torchserve": {}, "torchserve-base64": {"binary_data": True}}
PREDICTOR_NOTES = {
    "kserve": "KServe 0.21 ModelServer + ONNX Runtime, one worker, loopback",
    "torchserve": "TorchServe 0.12 + deploy/torchserve/scores_handler.py (ONNX Runtime), one "
                  "worker, batch size 1, loopback",
}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="image side of the model")
    parser.add_argument("--predictors", default=",".join(PREDICTORS),
                        help=f"comma-separated, of {', '.join(PREDICTORS)}")
    parser.add_argument("--model", choices=MODELS, default="small",
                        help="the small CNN (--size), the shipped demo package or ResNet-50 "
                             "at 224²")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS),
                        help=f"KServe protocols, comma-separated, of {', '.join(PROTOCOLS)}")
    args = parser.parse_args()
    predictors = [p for p in PREDICTORS if p in args.predictors.split(",")]
    if not predictors:
        parser.error(f"--predictors names none of {', '.join(PREDICTORS)}")
    protocols = {n: p for n, p in PROTOCOLS.items() if n in args.protocols.split(",")}
    if not protocols:
        parser.error(f"--protocols names none of {', '.join(PROTOCOLS)}")
    logging.basicConfig(level=logging.WARNING)
    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as scratch:
        folder = Path(scratch)
        root = folder / "models"
        if args.model in ("demo", "resnet50"):
            # Copies, not the package's folder: the predictor writes its log beside its file.
            package = (DEMO_PACKAGE if args.model == "demo"
                       else resnet50_repository(224) / "resnet50" / "1")
            source, local = folder / "source", root / "local" / "1"
            for copy in (source, local):
                shutil.copytree(package, copy, ignore=shutil.ignore_patterns("*.log"))
            manifest = json.loads((local / "manifest.json").read_text())
            (local / "manifest.json").write_text(json.dumps({**manifest, "name": "local"}))
            size = int(manifest["input"]["shape"][-1])
            described = (f"the demo package ({manifest.get('description', 'DemoResNet')}), "
                         f"3×{size}×{size}" if args.model == "demo" else
                         f"ResNet-50 (random weights, seed 0), 3×{size}×{size}, 1000 classes")
        else:
            model = small_cnn(classes=10, size=args.size)
            source = write_package(model, folder / "source", "plain")
            local = write_package(model, root, "local")
            size = args.size
            described = f"small CNN, 3×{size}×{size}, 10 classes (tests.onnx_models)"
        max_batch = max(1, min(MAX_BATCH, MAX_CALL_BYTES // (4 * 3 * size * size + 1024)))
        names: list[str] = []
        stops: list[Any] = []
        try:
            if "kserve" in predictors:
                predictor, urls = start_predictor(source / "model.onnx", "plain")
                stops.append(lambda: stop(predictor))
                for name, protocol in protocols.items():
                    write_remote(local, root, name, {
                        **protocol, "url": endpoint(protocol, urls), "model": "plain",
                        "max_batch": max_batch, "concurrency": CONCURRENCY})
                    names.append(name)
            if "torchserve" in predictors:
                torchserve = start_torchserve(source, folder / "torchserve")
                stops.append(torchserve.stop)
                for name, variant in TORCHSERVE_VARIANTS.items():
                    write_remote(local, root, name, remote_of(
                        torchserve, variant, max_batch=max_batch, concurrency=CONCURRENCY))
                    names.append(name)
            rows = measure(root, names, size, repeats, args.quick)
            calls = call_floors(root, names, size, max_batch)
        finally:
            for each in stops:
                each()
    print(table(rows))
    print(table(calls))
    result = "remote" if "kserve" in predictors else f"remote_{predictors[0]}"
    if args.model != "small":
        result += f"_{args.model}"
    path = write_json(result, {
        "description": __doc__.splitlines()[0],
        "model": described,
        "predictor": "; ".join(PREDICTOR_NOTES[p] for p in predictors),
        "remote": {"max_batch": max_batch, "concurrency": CONCURRENCY},
        "repeats": repeats, "quick": args.quick, "rows": rows, "calls": calls}, args.out)
    print(f"wrote {path}")


def start_torchserve(source: Path, folder: Path) -> TorchServeProcess:
    """TorchServe serving the package's ONNX file as ``plain`` through the scores handler,
    one worker, each request a batch of its own (no aggregation delay)."""
    archive_scores_model(source / "model.onnx", "plain", folder / "store", batch_size=1,
                         entry=HANDLER)
    return TorchServeProcess(folder / "store", "plain=plain.mar", folder).start()


def call_floors(root: Path, names: list[str], size: int, max_batch: int,
                repeats: int = 10) -> list[dict[str, Any]]:
    """Per protocol, one call of ``max_batch`` inputs: p50 ms of the service's encoding, of
    the call sent already encoded (the floor: predictor, transfer, reading the answer) and
    of the local run of those inputs."""
    repository = Repository(root)
    repository.load_all()
    batch = np.random.default_rng(1).normal(size=(max_batch, 3, size, size)).astype(np.float32)
    local = repository.get("local")
    local_ms = percentiles(time_calls(lambda: local.run(batch), repeats))["p50_ms"]
    rows = []
    for name in names:
        remote = repository.get(name).remote
        prepared = remote._request(batch)  # noqa: SLF001 - the call taken apart
        attempt = (remote._grpc_attempt if remote.spec.protocol == V2_GRPC  # noqa: SLF001
                   else remote._rest_attempt)  # noqa: SLF001
        encode_ms = percentiles(time_calls(lambda remote=remote: remote._request(batch),  # noqa: SLF001
                                           repeats))["p50_ms"]
        call_ms = percentiles(time_calls(
            lambda attempt=attempt, prepared=prepared: attempt(prepared, max_batch, 600, None,
                                                               None), repeats))["p50_ms"]
        rows.append({"protocol": name, "inputs": max_batch,
                     "binary_data": remote.describe().get("remote.binary_data", ""),
                     "encode_ms": round(encode_ms, 1), "encoded_call_ms": round(call_ms, 1),
                     "local_run_ms": round(local_ms, 1),
                     "floor_ratio": round(call_ms / local_ms, 1)})
    for each in repository.handles():
        if each.remote is not None:
            each.remote.close()
    return rows


def traffic(cost: pb.Cost) -> dict[str, Any]:
    """The remote calls and bytes one request made and its forward passes, as its answer's
    ``cost`` reports them."""
    return {"remote_calls": cost.remote_calls, "remote_mb": round(cost.remote_bytes / 1e6, 2),
            "forward_passes": cost.forward_passes}


def measure(root: Path, names: list[str], size: int, repeats: int,
            quick: bool) -> list[dict[str, Any]]:
    batch = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    config = Config(models=root, host="127.0.0.1", port=0, metrics_port=0, max_batch=8)
    running = RunningServer(config).start(timeout=600)
    rows = []
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            for method, enum in METHODS.items():
                params = QUICK_PARAMS[method] if quick else {}

                def request(model: str, enum: int = enum,
                            params: dict = params) -> pb.ExplainRequest:
                    return pb.ExplainRequest(model=model, method=enum, seed=3,
                                             input=pb.Input(tensor=array_to_tensor(batch)),
                                             **params)

                answers: dict[str, pb.ExplainResponse] = {}

                def call(model: str, request=request, answers=answers) -> None:  # noqa: ANN001
                    answers[model] = stub.Explain(request(model), timeout=600)

                calls = {model: (lambda model=model: call(model))
                         for model in ("local", *names)}
                times = time_interleaved(calls, repeats, warmup=1)
                local_ms = percentiles(times["local"])["p50_ms"]
                for protocol in names:
                    remote_ms = percentiles(times[protocol])["p50_ms"]
                    difference = np.abs(tensor_to_array(answers[protocol].saliency)
                                        - tensor_to_array(answers["local"].saliency)).max()
                    rows.append({"method": method, "protocol": protocol,
                                 "local_p50_ms": round(local_ms, 1),
                                 "remote_p50_ms": round(remote_ms, 1),
                                 "ratio": round(remote_ms / local_ms, 2),
                                 "max_map_difference": float(difference),
                                 **traffic(answers[protocol].cost)})
    finally:
        running.stop()
    return rows


if __name__ == "__main__":
    main()
