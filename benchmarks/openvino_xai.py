"""Side by side with OpenVINO XAI, the nearest gradient-free peer, on the same ONNX models.

OpenVINO XAI (``openvino-xai``, with the ``openvino`` runtime) pins ``numpy<2`` and would
change our stack, so it runs in its own virtual environment (``.venv-openvino/``, made by
this benchmark on first use) in a subprocess (``benchmarks/_openvino_peer.py``), and the
two sides exchange float32 inputs, targets and maps as .npy files: both explain exactly the
same preprocessed arrays, for the same targets, and our metric code scores both.

Pairs, per model:

* RISE (OpenVINO XAI) against our RISE at equal mask counts and grid cells;
* AISE (OpenVINO XAI, its default "balance" preset) against DE-CAM given AISE's measured
  forward passes per image as ``decam.max_forward_passes``;
* ReciproCAM (OpenVINO XAI, one inference with its inserted branch) against FastCAM and SMOE
  Scale (one forward pass).

Per pair: wall seconds per image at the same thread count (OpenVINO ``INFERENCE_NUM_THREADS``
and ONNX Runtime ``intra_op_num_threads``), forward passes per image (the peer's model calls
counted by wrapping its inference), and on the demo model's test cells RCAP, relevance mass,
pointing game and relevance rank (``evaluation.metrics``; on the Fashion-MNIST model, RCAP
on its test photographs, which have no ground truth), with paired bootstrap intervals for
DE-CAM − AISE. The ResNet-50-shaped model has random weights: time and passes only.
The peer runs one image per call (its API); ours runs requests of ``--batch`` images.

Ours runs twice per method, one row after the other on the same inputs, targets and seeds,
in one in-process server started as ``--precision bfloat16 --forward-engine openvino``:
requests asking for "float32" run on ONNX Runtime (the default server), requests leaving
``precision`` empty run on OpenVINO in bfloat16 where the model passed the server's check
(each row says which precision ran). The peer keeps OpenVINO's default inference precision
(bf16 on CPUs with bfloat16 units; its rows say). On the demo cells, each bfloat16 row's
metric means are set against the float32 row's 95 % bootstrap interval.

    python -m benchmarks.openvino_xai [--quick] [--images 24] [--threads 1]
        [--models demo,resnet50]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _cells
from benchmarks.common import (
    ROOT,
    base_parser,
    demo_repository,
    fmt,
    in_process_core,
    resnet50_repository,
    table,
    write_json,
)
from saliency_service.core import devices
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.inputs import preprocess_pixels

PEER_VENV = ROOT / ".venv-openvino"
PEER_REQUIREMENTS = ("openvino-xai==1.1.0", "openvino==2024.4.0")
PEER_SCRIPT = ROOT / "benchmarks" / "_openvino_peer.py"
RISE_CELLS = 8  # OpenVINO XAI's "balance" grid; ours is set to the same
PEER = "OpenVINO XAI"
# Our rows: the request's precision field for each.
OURS = {"ours float32 (ONNX Runtime)": "float32", "ours bfloat16 (OpenVINO)": ""}
FLOAT32, BFLOAT16 = OURS


def peer_python() -> tuple[Path | None, str]:
    """The peer environment's interpreter, made on first use; (None, why) when it cannot be
    installed, with the command and the end of its error."""
    python = PEER_VENV / "bin" / "python"
    check = [str(python), "-c", "import openvino_xai, openvino"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    for command in ([sys.executable, "-m", "venv", str(PEER_VENV)],
                    [str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"`{' '.join(command)}` failed: {done.stderr.strip()[-1500:]}"
    return python, ""


def run_peer(python: Path, package: Path, method: str, inputs: np.ndarray,
             targets: np.ndarray, threads: int, params: dict[str, Any] | None = None,
             target_layer: str = "") -> dict[str, Any]:
    """One OpenVINO XAI method over every image, in the peer's environment."""
    manifest = json.loads((package / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="openvino-xai-") as folder:
        work = Path(folder)
        np.save(work / "inputs.npy", inputs)
        np.save(work / "targets.npy", targets)
        # -P: the script's folder must not shadow the openvino_xai package with this module.
        command = [str(python), "-P", str(PEER_SCRIPT), "--model", str(package / "model.onnx"),
                   "--logits-output", manifest.get("outputs", {}).get("logits", "logits"),
                   "--inputs", str(work / "inputs.npy"), "--targets", str(work / "targets.npy"),
                   "--method", method, "--params", json.dumps(params or {}),
                   "--threads", str(threads), "--maps", str(work / "maps.npy"),
                   "--report", str(work / "report.json")]
        if target_layer:
            command += ["--target-layer", target_layer]
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads))
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
        if done.returncode != 0:
            raise RuntimeError(f"OpenVINO XAI {method} failed: {done.stderr.strip()[-2000:]}")
        report = json.loads((work / "report.json").read_text())
        maps = np.load(work / "maps.npy")
    return {"maps": maps, "seconds_per_image": float(np.mean(report["seconds"])),
            "forward_passes_per_image": float(np.mean(report["model_calls"])),
            "forward_passes_max": int(max(report["model_calls"])),
            "openvino": report["openvino"],
            "precision": report.get("inference_precision", "?")}


def model_setup(name: str, images: int) -> dict[str, Any]:
    """The package, its inputs (test cells at the model's size, or Fashion-MNIST test
    photographs for the fashion model, preprocessed as our server does) and whether quality
    means anything for it (not for random weights)."""
    from saliency_service.core.repository import Manifest  # noqa: PLC0415

    root = {"demo": demo_repository(), "fashion": ROOT / "models"}.get(name) or \
        resnet50_repository(224)
    package = root / name / "1"
    manifest = json.loads((package / "manifest.json").read_text())
    spec = Manifest.from_json(manifest).input
    if name == "fashion":
        from saliency_service.evaluation import fashion_mnist  # noqa: PLC0415

        batch: Any = fashion_mnist.load("test", images)
    else:
        batch = _cells.cells(images, spec.height)
    inputs = preprocess_pixels(batch.images, spec)
    scored = name != "resnet50"  # the ResNet-50 shape has random weights
    return {"name": name, "root": root, "package": package, "batch": batch, "inputs": inputs,
            "scored": scored, "target_layer": manifest["outputs"]["scales"][-1]}


def compare_model(setup: dict[str, Any], python: Path | None, threads: int, masks: int,
                  batch: int, ours_systems: dict[str, str]) -> dict[str, Any]:
    name, package, inputs = setup["name"], setup["package"], setup["inputs"]
    placement = devices.current()
    core = in_process_core(setup["root"], intra_op_threads=threads,
                           precision=placement.precision,
                           forward_engine=placement.forward_engine)
    if setup["scored"]:
        targets = setup["batch"].labels.astype(np.int64)
    else:  # random weights: explain what the model predicts (in float32)
        with devices.requested("float32"):
            logits = core.repository.find(name, 0).run(inputs)[0]
        targets = logits.argmax(1).astype(np.int64)
    scorer = _cells.classifier(package, threads) if setup["scored"] else None
    rows: list[dict[str, Any]] = []
    scores: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def add(pair: str, system: str, method: str, run: dict[str, Any]) -> None:
        row = {"model": name, "pair": pair, "system": system, "method": method,
               "precision": run["precision"], "seconds_per_image": run["seconds_per_image"],
               "forward_passes_per_image": run["forward_passes_per_image"]}
        if scorer is not None:
            per_image = _cells.quality(run["maps"], setup["batch"], targets, scorer)
            scores[system, method] = per_image
            row.update(_cells.means(per_image))
        rows.append(row)
        print(table([{k: fmt(v) for k, v in row.items()}]), flush=True)

    def ours(pair: str, label: str, method: int,
             params: tuple[str, Any] | None = None) -> None:
        for system, precision in ours_systems.items():
            # An untimed request first, as the peer's first inference is untimed too (it
            # also compiles and checks the bfloat16 model, as a server's warm-up does).
            _cells.explain(core, name, method, inputs[:1], targets[:1], params,
                           precision=precision)
            add(pair, system, label, _cells.explain(core, name, method, inputs, targets,
                                                    params, batch=batch, precision=precision))

    if python is not None:
        rise = {"num_masks": masks, "num_cells": RISE_CELLS, "prob": 0.5}
        add("RISE", PEER, "rise", run_peer(python, package, "rise", inputs, targets,
                                           threads, rise))
    ours("RISE", "rise", pb.METHOD_RISE, ("rise", pb.RiseParams(
        masks=masks, cells=RISE_CELLS, keep_probability=0.5)))
    aise_passes = None
    if python is not None:
        aise = run_peer(python, package, "aise", inputs, targets, threads)
        aise_passes = math.floor(aise["forward_passes_per_image"])  # never more than AISE
        add("AISE / DE-CAM", PEER, "aise", aise)
        budget = pb.DecamParams(max_forward_passes=aise_passes)
        ours("AISE / DE-CAM", f"decam[max_forward_passes={aise_passes}]", pb.METHOD_DECAM,
             ("decam", budget))
    if setup["scored"]:  # what the defaults buy; on random weights only their cost, fixed
        ours("AISE / DE-CAM", "decam (defaults)", pb.METHOD_DECAM)
    if python is not None:
        add("ReciproCAM / FastCAM", PEER, "reciprocam", run_peer(
            python, package, "reciprocam", inputs, targets, threads,
            target_layer=setup["target_layer"]))
    ours("ReciproCAM / FastCAM", "fastcam", pb.METHOD_FASTCAM)
    ours("ReciproCAM / FastCAM", "smoe_scale", pb.METHOD_SMOE_SCALE)
    result: dict[str, Any] = {"model": name, "images": len(inputs), "rows": rows,
                              "aise_forward_passes": aise_passes}
    decam = (FLOAT32, f"decam[max_forward_passes={aise_passes}]")
    if (PEER, "aise") in scores and decam in scores:
        result["decam_minus_aise"] = {
            metric: _cells.paired(scores[decam][metric], scores[PEER, "aise"][metric])
            for metric in scores[decam]}
    result["bfloat16_against_float32"] = {
        method: against_float32(scores[FLOAT32, method], scores[BFLOAT16, method])
        for system, method in scores if system == BFLOAT16 and (FLOAT32, method) in scores}
    return result


def against_float32(full: dict[str, np.ndarray],
                    half: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per metric: the float32 row's mean with its 95 % bootstrap interval, the bfloat16
    row's mean, whether it lies within that interval, and the paired difference."""
    found = {}
    for metric, values in full.items():
        interval = _cells.paired(values, np.zeros_like(values))  # the mean's interval
        mean = float(np.nanmean(half[metric]))
        found[metric] = {"float32": interval, "bfloat16": mean,
                         "within": bool(interval["low"] <= mean <= interval["high"]),
                         "difference": _cells.paired(half[metric], values)}
    return found


def ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Peer time / our time per pair (> 1: ours faster), at the pair's pass counts."""
    by = {(row["system"], row["method"]): row for row in result["rows"]}
    decam = f"decam[max_forward_passes={result['aise_forward_passes']}]"
    pairs = [("rise", "rise"), ("aise", decam), ("reciprocam", "fastcam"),
             ("reciprocam", "smoe_scale")]
    out = []
    for (peer, mine), system in ((pair, system) for pair in pairs for system in OURS):
        theirs, ours = by.get((PEER, peer)), by.get((system, mine))
        if theirs is None or ours is None:
            continue
        row = {"model": result["model"], PEER: peer, "ours": f"{mine}, {ours['precision']}",
               "passes (theirs / ours)": f"{theirs['forward_passes_per_image']:.0f} / "
                                         f"{ours['forward_passes_per_image']:.0f}",
               "time ratio (theirs / ours)": theirs["seconds_per_image"]
               / ours["seconds_per_image"]}
        for metric in ("relevance_mass", "pointing_game", "rcap"):
            if metric in ours:
                row[f"{metric} (theirs / ours)"] = f"{theirs[metric]:.3f} / {ours[metric]:.3f}"
        out.append(row)
    return out


def speedups(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method of ours: float32 (ONNX Runtime) time / bfloat16 (OpenVINO) time."""
    by = {(row["system"], row["method"]): row for row in result["rows"]}
    return [{"model": result["model"], "method": method,
             "precision (ours bfloat16 row)": row["precision"],
             "float32 s/image": by[FLOAT32, method]["seconds_per_image"],
             "bfloat16 s/image": row["seconds_per_image"],
             "speed-up": by[FLOAT32, method]["seconds_per_image"] / row["seconds_per_image"]}
            for (system, method), row in by.items()
            if system == BFLOAT16 and (FLOAT32, method) in by]


def report(results: dict[str, Any]) -> str:
    lines = [f"OpenVINO XAI {results.get('openvino', '?')} against ours, "
             f"{results['threads']} thread(s) each (ours float32 on ONNX Runtime and "
             "bfloat16 on OpenVINO, the peer at OpenVINO's default precision), "
             "on a 2-core machine shared with other "
             "work (absolute times are loaded; the ratios are measured side by side in one "
             "run). Quality on the demo's test cells (ground-truth metrics skip blank "
             "images) and, for the fashion model, RCAP on Fashion-MNIST test photographs; "
             "target: the true label."]
    if results.get("peer_missing"):
        lines.append(f"OpenVINO XAI could not be installed: {results['peer_missing']}")
    for result in results["models"]:
        lines += ["", f"{result['model']}, {result['images']} images:",
                  table([{k: fmt(v) for k, v in row.items()} for row in result["rows"]])]
        for metric, value in result.get("decam_minus_aise", {}).items():
            lines.append(f"DE-CAM − AISE at {result['aise_forward_passes']} passes, {metric}: "
                         f"{value['difference']:+.3f} [95 % CI {value['low']:+.3f}, "
                         f"{value['high']:+.3f}], n = {value['n']}")
        for method, found in result.get("bfloat16_against_float32", {}).items():
            lines.append(f"{method}, bfloat16 against float32's 95 % CI: " + "; ".join(
                f"{metric} {value['bfloat16']:.3f} in [{value['float32']['low']:.3f}, "
                f"{value['float32']['high']:.3f}]: {'yes' if value['within'] else 'NO'}"
                for metric, value in found.items()))
    rows = [row for result in results["models"] for row in ratios(result)]
    if rows:
        lines += ["", "Ratios:", table([{k: fmt(v) for k, v in row.items()} for row in rows])]
    rows = [row for result in results["models"] for row in speedups(result)]
    if rows:
        lines += ["", "Ours, bfloat16 on OpenVINO against float32 on ONNX Runtime:",
                  table([{k: fmt(v) for k, v in row.items()} for row in rows])]
    for note in results.get("notes", []):
        lines.append(note)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24,
                        help="demo and fashion images (ResNet-50: 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="our images per request")
    parser.add_argument("--masks", type=int, default=1000, help="RISE masks")
    parser.add_argument("--models", default=None,
                        help="demo,fashion,resnet50 (quick: demo)")
    args = parser.parse_args()
    models = (args.models or ("demo" if args.quick else "demo,fashion,resnet50")).split(",")
    python, missing = peer_python()
    results: dict[str, Any] = {"threads": args.threads, "models": [], "quick": args.quick,
                               "peer_missing": missing, "notes": []}
    ours_systems = dict(OURS)
    try:
        devices.configure(precision="bfloat16", forward_engine=devices.OPENVINO)
    except devices.PlacementRefused as refused:
        del ours_systems[BFLOAT16]
        results["notes"].append(f"No bfloat16 rows of ours: {refused}")
    if python is not None:
        version = subprocess.run(
            [str(python), "-c", "import openvino; print(openvino.__version__)"],
            capture_output=True, text=True)
        results["openvino"] = version.stdout.strip()
    if "fashion" in models and not (ROOT / "models" / "fashion" / "1").is_dir():
        models.remove("fashion")
        results["notes"].append("No Fashion-MNIST package under models/ at the time of this "
                                "run: that model is not in the comparison.")
    for name in models:
        images = (3 if args.quick else args.images) if name != "resnet50" else 2
        masks = 200 if args.quick else args.masks
        results["models"].append(compare_model(model_setup(name, images), python,
                                               args.threads, masks, args.batch, ours_systems))
    devices.configure()
    text = report(results)
    print(text)
    print(f"wrote {write_json('openvino_xai', {**results, 'report': text}, args.out)}")


if __name__ == "__main__":
    main()
