"""What a detector's explanation costs per box: D-RISE against a classifier's RISE at equal
masks, on the same backbone.

The scene detector's grid head (``saliency_service.zoo.detectors.GridDetector``) and a
classifier made of the same backbone and context block with a pooled linear head: the
network work per masked image is the same, so the ratio shows what D-RISE adds (decoding
every cell, scoring the box similarity) and what sharing the masks across an image's boxes
saves. Side by side in one run, in process, one image (the evaluation scenes'), median of
``--repeats``.

    python -m benchmarks.detection_cost [--quick] [--masks 1000]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import base_parser, in_process_core, table, write_json
from saliency_service.core.repository import MANIFEST, ONNX_FILE, sha256_file
from saliency_service.core.request import CostCounter, RequestState
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor
from saliency_service.zoo.detectors import (
    ANCHOR,
    MAX_DETECTIONS,
    MEAN,
    NMS_IOU,
    SCORE_THRESHOLD,
    STRIDE,
    export_onnx,
    preprocess,
)
from tests.detection_support import EVALUATION_SEED, SIZE, load_trained


def _package(root: Path, name: str, onnx_path: Path, outputs: dict[str, Any]) -> None:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / ONNX_FILE).write_bytes(onnx_path.read_bytes())
    manifest = {"format": 1, "name": name, "version": 1,
                "input": {"name": "input", "shape": [-1, 3, SIZE, SIZE], "mean": list(MEAN),
                          "std": [0.25, 0.25, 0.25], "value_range": [0.0, 1.0],
                          "layout": "NCHW", "dtype": "float32"},
                "class_labels": list(CLASSES), "outputs": outputs,
                "files": {ONNX_FILE: {"sha256": sha256_file(folder / ONNX_FILE)}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def repository(root: Path) -> Path:
    """The detector's package and the same-backbone classifier's."""
    trained = load_trained(root / "onnx")
    grid = trained.grid
    torch.manual_seed(0)
    classifier = nn.Sequential(grid.backbone, grid.features, nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(grid.head.in_channels, len(CLASSES)))
    classifier_onnx = export_onnx(classifier.eval(), root / "onnx" / "classifier.onnx", SIZE,
                                  ["logits"])
    models = root / "models"
    _package(models, "detector", trained.onnx["grid"], {
        "kind": "detection_raw", "logits": "raw",
        "detection": {"stride": STRIDE, "anchor": ANCHOR, "score_threshold": SCORE_THRESHOLD,
                      "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}})
    _package(models, "classifier", classifier_onnx, {"logits": "logits"})
    return models


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    masks = 100 if args.quick else args.masks
    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as staging:
        core = in_process_core(repository(Path(staging)), intra_op_threads=1)
        scenes = generate(8, SceneConfig(seed=EVALUATION_SEED))
        x = preprocess(scenes.images).numpy()
        found = core.predict(pb.PredictRequest(model="detector", input=pb.Input(
            tensor=array_to_tensor(x))), CostCounter()).detections
        item = max(range(len(found)), key=lambda i: len(found[i].detections))
        image = pb.Input(tensor=array_to_tensor(x[item:item + 1]))
        first = found[item].detections[0]
        cases = {
            "classifier RISE": pb.ExplainRequest(
                model="classifier", method=pb.METHOD_RISE, input=image,
                rise=pb.RiseParams(masks=masks, cells=16)),
            "detector D-RISE, 1 box": pb.ExplainRequest(
                model="detector", method=pb.METHOD_DRISE, input=image,
                drise=pb.RiseParams(masks=masks), target=pb.Target(detection=pb.DetectionTarget(
                    box=first.box, label=first.label))),
            f"detector D-RISE, every box ({len(found[item].detections)})": pb.ExplainRequest(
                model="detector", method=pb.METHOD_DRISE, input=image,
                drise=pb.RiseParams(masks=masks)),
        }
        seconds: dict[str, list[float]] = {label: [] for label in cases}
        replies: dict[str, pb.ExplainResponse] = {}
        for round_ in range(repeats + 1):  # interleaved, so load shifts hit every case
            for label, request in cases.items():
                started = time.perf_counter()
                replies[label] = core.explain(request, RequestState(None), CostCounter())
                if round_:  # the first round warms up
                    seconds[label].append(time.perf_counter() - started)
        rows = []
        for label, reply in replies.items():
            maps = max(len(reply.explained), 1)
            median = statistics.median(seconds[label])
            rows.append({"case": label, "maps": maps, "masks": masks,
                         "forward passes": reply.cost.forward_passes,
                         "ms": round(median * 1000, 1),
                         "ms per map": round(median * 1000 / maps, 1)})
    base = rows[0]["ms per map"]
    for row in rows:
        row["per map / classifier RISE"] = round(row["ms per map"] / base, 2)
    print(table(rows))
    out = write_json("detection_cost", {"rows": rows, "masks": masks, "repeats": repeats,
                                        "command": "python -m benchmarks.detection_cost "
                                                   + " ".join(argv or [])},
                     args.out if args.quick or args.out else None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
