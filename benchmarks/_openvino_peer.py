"""OpenVINO XAI's side of ``benchmarks/openvino_xai.py``: runs in its own virtual
environment (``.venv-openvino``), so it imports nothing of this project.

Reads float32 N×C×H×W model inputs (preprocessed by the caller exactly as our server does) and
int64 targets from .npy files, explains each image with one OpenVINO XAI method on the ONNX
model, and writes the N×H×W maps (.npy) and a JSON report: seconds and model calls per image,
and the inference precision OpenVINO chose (its default: bf16 on CPUs with bfloat16 units).
Model calls are counted by wrapping the method's ``model_forward`` (every inference it runs,
by batch size), so AISE's adaptive count is measured, not assumed. The model is compiled
with ``INFERENCE_NUM_THREADS`` set, so both systems run the same number of threads.

    python -P benchmarks/_openvino_peer.py --model model.onnx --inputs x.npy --targets t.npy
        --method rise|aise|reciprocam [--params '{"num_masks": 1000}'] --threads 1
        --maps out.npy --report out.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import cv2
import numpy as np
import openvino as ov
from openvino_xai.methods.black_box.aise.classification import AISEClassification
from openvino_xai.methods.black_box.rise import RISE
from openvino_xai.methods.white_box.recipro_cam import ReciproCAM


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def make_method(name: str, model: ov.Model, logits_output: str, threads: int,
                target_layer: str | None = None) -> Any:
    """The method with its model compiled for ``threads`` threads; black-box methods get
    softmax probabilities of the logits output (AISE would otherwise squash logits with a
    sigmoid). ReciproCAM's branch goes after ``target_layer`` (its own search when None)."""
    def postprocess(outputs: Any) -> np.ndarray:
        return softmax(np.asarray(outputs[logits_output]))

    if name == "rise":
        method = RISE(model, postprocess, prepare_model=False)
    elif name == "aise":
        method = AISEClassification(model, postprocess, prepare_model=False)
    elif name == "reciprocam":
        method = ReciproCAM(model, target_layer=target_layer, embed_scaling=False,
                            prepare_model=False)
        method.prepare_model(load_model=False)  # inserts the XAI branch
    else:
        raise SystemExit(f"unknown method {name}")
    graph = method._model if name == "reciprocam" else model
    method._model_compiled = ov.Core().compile_model(
        graph, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                       "PERFORMANCE_HINT": "LATENCY"})
    return method


def explain_one(name: str, method: Any, image: np.ndarray, target: int,
                params: dict[str, Any]) -> np.ndarray:
    """One H×W float map of ``image`` (1×C×H×W) for ``target``."""
    height, width = image.shape[2:]
    if name == "reciprocam":
        maps = method.generate_saliency_map(image)  # 1 × classes × h × w
        return cv2.resize(np.asarray(maps[0, target], np.float32), (width, height))
    maps = method.generate_saliency_map(image, target_indices=[target], scale_output=False,
                                        **params)
    return np.asarray(maps[target], np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--logits-output", default="logits")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--params", default="{}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target-layer", help="ReciproCAM: the node after which its "
                        "branch goes (default: OpenVINO XAI's own search)")
    parser.add_argument("--maps", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    inputs = np.load(args.inputs)
    targets = np.load(args.targets)
    params = json.loads(args.params)
    model = ov.Core().read_model(args.model)
    method = make_method(args.method, model, args.logits_output, args.threads,
                         args.target_layer)
    method.model_forward(inputs[:1], preprocess=False)  # warm-up, not counted
    calls = [0]
    forward = method.model_forward

    def counted(x: np.ndarray, preprocess: bool = True) -> Any:
        calls[0] += int(x.shape[0])
        return forward(x, preprocess)

    method.model_forward = counted
    maps, seconds, passes = [], [], []
    for image, target in zip(inputs, targets, strict=True):
        before = calls[0]
        started = time.perf_counter()
        maps.append(explain_one(args.method, method, image[None], int(target), params))
        seconds.append(time.perf_counter() - started)
        passes.append(calls[0] - before)
    np.save(args.maps, np.stack(maps))
    with open(args.report, "w") as out:
        json.dump({"method": args.method, "params": params, "threads": args.threads,
                   "seconds": seconds, "model_calls": passes,
                   "openvino": ov.__version__,
                   "inference_precision": method._model_compiled.get_property(
                       "INFERENCE_PRECISION_HINT").get_type_name()}, out)


if __name__ == "__main__":
    main()
