"""SMOE Scale, FastCAM and LOVI: saliency from the scale activations of one forward pass.

Mundhenk, Chen & Friedland, "Efficient Saliency Maps for Explainable AI"
(https://arxiv.org/abs/1911.11293). Each scale's post-ReLU activation x (C channels, plus
1e-7 so the log is finite) gives the SMOE Scale map μ · (log₂ μ − mean_c log₂ x) with
μ = mean_c x: high where few channels fire strongly. Each map is squashed into [0, 1] by a
Gaussian CDF of its z-score (or a Gamma CDF with maximum-likelihood shape/scale), upsampled
bilinearly to the input and averaged with per-scale weights. FastCAM multiplies that map by a
class activation map; for a global-average-pool + linear head the CAM is read off the head's
weights, which is exactly Grad-CAM for that architecture with no backward pass.

The maps are computed from outputs of the prediction run the service makes anyway (handlers
set ``wants_scale_outputs``), so SMOE, LOVI and FastCAM on a linear head cost one forward
pass per image. Computing SMOE inside the ONNX graph instead (:func:`add_smoe_outputs`) was
measured by ``benchmarks/multiscale.py`` and did not beat numpy after the run, so packages
keep plain scale outputs.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image
from scipy import special

from handlers.base import (
    ENGINE_ONNX,
    ENGINE_TORCH,
    ExplainJob,
    Handler,
    run_onnx_batched,
    scale_by_max,
)
from handlers.registry import register
from handlers.resize import upsample
from kernel.errors import InvalidInput
from kernel.repository import ONNX_FILE, ModelHandle
from saliency.v1 import explainer_pb2 as pb

log = logging.getLogger(__name__)

EPSILON = 1e-7
NORMALIZATIONS = ("gaussian_cdf", "gamma_cdf")
# The paper's per-layer weights for ResNet-50's five scales (stem ReLU, layer1..layer4),
# an example of the ``weights`` parameter; the default is equal weights.
PAPER_RESNET50_WEIGHTS = (0.18, 0.15, 0.37, 0.40, 0.72)
SMOE_OUTPUT_PREFIX = "smoe_"
_NEWTON_STEPS = 10
_TORCH_NDTR_FROM = 4096  # values; see standard_normal_cdf
# LOVI hue per depth: violet (270°) for the first scale down to red (0°) for the last.
_LOVI_FIRST_HUE = 0.75


# ---- the maths, on numpy arrays ---------------------------------------------------------------


def smoe_scale(activations: np.ndarray) -> np.ndarray:
    """SMOE Scale of N×C×h×w activations over channels → float32 N×h×w (ReLU applied first).

    Written as few passes over the activations as possible (sums, in-place operations): on
    small networks this loop, not the forward pass, bounds the fast path. The ReLU copy is
    OpenCV's threshold, one SIMD pass: 13 µs for 16×112×112 values against 75 µs for
    ``np.maximum`` with a scalar, the slowest step here.
    """
    n, c, h, w = activations.shape
    flat = np.ascontiguousarray(activations, np.float32).reshape(n * c, h * w)
    x = cv2.threshold(flat, 0.0, 0.0, cv2.THRESH_TOZERO)[1].reshape(n, c, h, w)
    x += np.float32(EPSILON)
    inverse_channels = np.float32(1.0 / x.shape[1])
    mean = x.sum(axis=1)
    mean *= inverse_channels
    mean_log = np.log2(x, out=x).sum(axis=1)  # x is a private copy: reuse it
    mean_log *= inverse_channels
    out = np.log2(mean)
    out -= mean_log
    out *= mean
    return out


def gaussian_cdf_normalize(maps: np.ndarray) -> np.ndarray:
    """Φ of each N×h×w map's z-score (mean and unbiased std per map); a flat map → 0.5.

    OpenCV's ``meanStdDev`` takes both moments in one float64-accumulating pass, half the
    time of numpy's mean and sum of squares on the fast path's small maps.
    """
    maps = np.ascontiguousarray(maps, np.float32)  # read only; OpenCV wants contiguous rows
    z = np.empty(maps.shape, np.float32)
    count = maps[0].size
    unbiased = math.sqrt(count / max(count - 1, 1))
    for index, single in enumerate(maps):
        mean, std = cv2.meanStdDev(single)
        spread = float(std[0, 0]) * unbiased
        np.subtract(single, np.float32(mean[0, 0]), out=z[index])
        z[index] *= np.float32(1.0 / spread if spread > 0 else 0.0)  # z = 0 for a flat map
    return standard_normal_cdf(z)


def standard_normal_cdf(z: np.ndarray) -> np.ndarray:
    """Φ(z) for float32 z. From a few thousand values on, torch's vectorized ``ndtr`` beats
    scipy's (one thread: 30 vs 97 µs for 12.5 k values, 0.15 vs 1.2 ms for 100 k; below 3 k
    its call overhead loses), with error 6e-8; scipy serves where torch is not installed."""
    if z.size < _TORCH_NDTR_FROM:
        return special.ndtr(z)
    try:
        import torch  # noqa: PLC0415 - optional here: the handler itself runs on ONNX Runtime
    except ImportError:
        return special.ndtr(z)
    return torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(z))).numpy()


def gamma_fit(values: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood Gamma shape k and scale θ of positive values (Choi & Wette 1969).

    Solves log k − ψ(k) = s with s = log mean − mean log by Newton's method from the
    closed-form start (3 − s + √((s − 3)² + 24 s)) / 12 s; θ = mean / k.
    """
    mean = float(values.mean())
    s = math.log(mean) - float(np.log(values).mean())
    if not (s > 1e-12 and math.isfinite(s)):
        return math.inf, 0.0
    k = (3.0 - s + math.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
    for _ in range(_NEWTON_STEPS):
        step = (math.log(k) - float(special.digamma(k)) - s) / (1.0 / k - float(
            special.polygamma(1, k)))
        k = max(k - step, k / 10.0)  # stay positive
    return k, mean / k


def gamma_cdf_normalize(maps: np.ndarray) -> np.ndarray:
    """Gamma CDF of each N×h×w map shifted to start just above 0, with fitted shape/scale.

    A flat map (no spread to fit) → 0.5, as the Gaussian normalization gives.
    """
    out = np.empty(maps.shape, np.float32)
    for index, single in enumerate(maps.astype(np.float64)):
        shifted = single - single.min() + EPSILON
        shape, scale = gamma_fit(shifted.ravel())
        if not math.isfinite(shape) or scale <= 0:
            out[index] = 0.5
        else:
            out[index] = special.gammainc(shape, shifted / scale)
    return out


def normalize(maps: np.ndarray, method: str) -> np.ndarray:
    if method == "gamma_cdf":
        return gamma_cdf_normalize(maps)
    return gaussian_cdf_normalize(maps)


def combine(layer_maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average Σ wᵢ Mᵢ / Σ wᵢ of N×S×H×W maps → N×H×W."""
    weights = np.asarray(weights, np.float64)
    total = np.zeros(layer_maps.shape[:1] + layer_maps.shape[2:], np.float32)
    for index, weight in enumerate(weights):
        if weight:
            total += np.float32(weight) * layer_maps[:, index]
    return total / np.float32(weights.sum())


def layer_maps(smoe_maps: list[np.ndarray], normalization: str, height: int,
               width: int) -> np.ndarray:
    """Per-scale SMOE maps (N×hᵢ×wᵢ) → normalized and upsampled N×S×H×W in [0, 1]."""
    return np.stack([upsample(normalize(m, normalization), height, width)
                     for m in smoe_maps], axis=1)


def combined_map(smoe_maps: list[np.ndarray], normalization: str, weights: np.ndarray,
                 height: int, width: int) -> np.ndarray:
    """``combine(layer_maps(...), weights)`` without the N×S×H×W stack: each scale is
    normalized at its own resolution, upsampled and accumulated in place."""
    weights = np.asarray(weights, np.float64)
    total: np.ndarray | None = None
    for smoe, weight in zip(smoe_maps, weights, strict=True):
        if weight:
            layer = upsample(normalize(smoe, normalization), height, width)
            if weight != 1.0:  # equal weights (the default) skip the multiplications
                layer *= np.float32(weight)
            if total is None:
                total = layer
            else:
                total += layer
    if total is None:
        raise ValueError(f"weights must not all be zero, got {weights.tolist()}")
    total *= np.float32(1.0 / weights.sum())
    return total


def lovi_rgb(maps: np.ndarray) -> np.ndarray:
    """LOVI of one image's S×H×W per-scale maps → uint8 H×W×3.

    Hue is the map-weighted mean depth (first scale violet … last scale red), saturation
    1 − min/max over scales (grey where all scales agree), value the max over scales.
    """
    scales = maps.shape[0]
    depth = np.linspace(0.0, 1.0, scales, dtype=np.float32).reshape(-1, 1, 1)
    total = maps.sum(axis=0)
    mean_depth = np.where(total > 0, (maps * depth).sum(axis=0) / np.where(total > 0, total, 1),
                          0.0)
    high = maps.max(axis=0)
    low = maps.min(axis=0)
    saturation = np.where(high > 0, 1.0 - low / np.where(high > 0, high, 1.0), 0.0)
    hsv = np.stack([_LOVI_FIRST_HUE * (1.0 - mean_depth), saturation, high], axis=-1)
    hsv8 = (np.clip(hsv, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv8, mode="HSV").convert("RGB"))


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


# ---- the linear head, read from model.onnx ----------------------------------------------------


@dataclass(frozen=True)
class LinearHead:
    """logits = GAP(scale) @ weight.T + bias, read from the package's ONNX graph."""

    weight: np.ndarray  # classes × features
    bias: np.ndarray  # classes

    def cam(self, activations: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """ReLU(Σ_k W[c,k] A_k) / (h·w): the Grad-CAM of this head, N×h×w."""
        _, _, height, width = activations.shape
        rows = self.weight[targets].astype(np.float32)[:, :, None, None]  # N × C × 1 × 1
        cam = (rows * activations.astype(np.float32, copy=False)).sum(axis=1)
        return np.maximum(cam, 0.0) / np.float32(height * width)

    def logits(self, activations: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
        """All logits (N×classes), or only ``classes[n]`` of each item (N) — the latter with
        no matrix product, which BLAS threads make slow on a busy machine."""
        pooled = activations.mean(axis=(2, 3))
        if classes is None:
            return pooled @ self.weight.T + self.bias
        return (pooled * self.weight[classes]).sum(axis=1) + self.bias[classes]


_HEADS: dict[tuple[str, str], LinearHead | None] = {}
_HEADS_LOCK = threading.Lock()


def linear_head(model: ModelHandle) -> LinearHead | None:
    """The package's GAP+linear head weights, or None; read once per package and cached.

    Read from ``model.onnx`` (already checksum-verified, no unpickling, no torch): the
    initializers named after the manifest's linear module, else the Gemm (or MatMul + Add)
    producing the logits. Reading the graph rather than a file written beside it keeps
    every package exported so far usable, and the weights can never disagree with the
    network that served the prediction (each request also checks the logits, see FastCAM).
    """
    spec = model.spec()
    if spec.head.get("type") != "gap_linear":
        return None
    key = (str(model.path), spec.files.get(ONNX_FILE, ""))
    with _HEADS_LOCK:
        if key not in _HEADS:
            try:
                _HEADS[key] = _read_linear_head(model, str(spec.head.get("linear", "")),
                                                spec.logits_output)
            except Exception as exc:  # noqa: BLE001 - an unreadable head means the slow path
                log.warning("model %s: cannot read the linear head (%s); FastCAM will use "
                            "Grad-CAM", model.name, exc)
                _HEADS[key] = None
        return _HEADS[key]


def _read_linear_head(model: ModelHandle, linear: str, logits_name: str) -> LinearHead | None:
    import onnx  # noqa: PLC0415 - only needed once per package
    from onnx import numpy_helper  # noqa: PLC0415

    graph = onnx.load(str(model.path / ONNX_FILE)).graph
    initializers = {t.name: t for t in graph.initializer}
    for prefix in ("model.", ""):
        weight = initializers.get(f"{prefix}{linear}.weight")
        if weight is not None:
            bias = initializers.get(f"{prefix}{linear}.bias")
            w = numpy_helper.to_array(weight).astype(np.float32)
            b = (numpy_helper.to_array(bias).astype(np.float32) if bias is not None
                 else np.zeros(w.shape[0], np.float32))
            return LinearHead(w, b)
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(logits_name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and node.input[1] in initializers and not attrs.get("transA", 0):
        b_matrix = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        w = b_matrix if attrs.get("transB", 0) else b_matrix.T
        w = w * np.float32(attrs.get("alpha", 1.0))
        bias = np.zeros(w.shape[0], np.float32)
        if len(node.input) > 2 and node.input[2] in initializers:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            bias = np.broadcast_to(bias * np.float32(attrs.get("beta", 1.0)), w.shape[:1])
        return LinearHead(w, np.array(bias, np.float32))
    if node.op_type == "Add":
        matmul = next((producers[i] for i in node.input if i in producers
                       and producers[i].op_type == "MatMul"), None)
        bias_name = next((i for i in node.input if i in initializers), None)
        if matmul is not None and matmul.input[1] in initializers:
            w = numpy_helper.to_array(initializers[matmul.input[1]]).astype(np.float32).T
            bias = (numpy_helper.to_array(initializers[bias_name]).astype(np.float32)
                    if bias_name else np.zeros(w.shape[0], np.float32))
            return LinearHead(w, bias)
    return None


# ---- SMOE inside the ONNX graph (measured, not adopted) -------------------------------------


def add_smoe_outputs(model: Any, scale_names: list[str]) -> Any:
    """Adds ``smoe_i`` = SMOE Scale of ``scale_i`` (N×h×w) as outputs of an ONNX ModelProto.

    One session run then returns the logits and the per-scale maps, and only the maps (not
    the C×h×w activations) leave ONNX Runtime. ``benchmarks/multiscale.py`` compares it with
    numpy after the run; it was not faster, so the exporter does not add these outputs.
    """
    from onnx import TensorProto, helper  # noqa: PLC0415 - export time only

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph = model.graph
    eps = helper.make_tensor("smoe_eps", TensorProto.FLOAT, [], [EPSILON])
    inv_ln2 = helper.make_tensor("smoe_inv_ln2", TensorProto.FLOAT, [], [1.0 / math.log(2.0)])
    graph.initializer.extend([eps, inv_ln2])
    if opset >= 18:
        graph.initializer.append(helper.make_tensor("smoe_axes", TensorProto.INT64, [1], [1]))

    def mean_over_channels(source: str, target: str) -> Any:
        if opset >= 18:
            return helper.make_node("ReduceMean", [source, "smoe_axes"], [target], keepdims=0)
        return helper.make_node("ReduceMean", [source], [target], axes=[1], keepdims=0)

    for index, scale in enumerate(scale_names):
        p = f"smoe{index}_"
        graph.node.extend([
            helper.make_node("Relu", [scale], [p + "relu"]),
            helper.make_node("Add", [p + "relu", "smoe_eps"], [p + "x"]),
            mean_over_channels(p + "x", p + "mean"),
            helper.make_node("Log", [p + "x"], [p + "log_x"]),
            mean_over_channels(p + "log_x", p + "mean_log"),
            helper.make_node("Log", [p + "mean"], [p + "log_mean"]),
            helper.make_node("Sub", [p + "log_mean", p + "mean_log"], [p + "gap"]),
            helper.make_node("Mul", [p + "mean", p + "gap"], [p + "nats"]),
            helper.make_node("Mul", [p + "nats", "smoe_inv_ln2"],
                             [f"{SMOE_OUTPUT_PREFIX}{index}"]),
        ])
        graph.output.append(helper.make_tensor_value_info(
            f"{SMOE_OUTPUT_PREFIX}{index}", TensorProto.FLOAT, ["batch", None, None]))
    return model


# ---- the handlers ---------------------------------------------------------------------------


class MultiScaleHandler(Handler):
    """Shared by SMOE Scale, FastCAM and LOVI: parameters and the per-scale maps."""

    engine = ENGINE_ONNX
    needs_scales = True
    wants_scale_outputs = True
    defaults: ClassVar[dict[str, Any]] = {"weights": [], "normalization": "gaussian_cdf"}
    paper = "https://arxiv.org/abs/1911.11293"

    def validate(self, params: dict[str, Any], job: ExplainJob) -> None:
        if params["normalization"] == "unspecified":
            params["normalization"] = "gaussian_cdf"
        self.require_choice(params, "normalization", NORMALIZATIONS)
        scales = len(job.model.spec().scale_outputs)
        weights = [float(w) for w in params["weights"]] or [1.0] * scales
        if len(weights) != scales:
            raise InvalidInput(
                f"weights has {len(weights)} values but model {job.model.name!r} has {scales} "
                f"scale outputs {list(job.model.spec().scale_outputs)}: give one weight per "
                "scale, or none for equal weights")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise InvalidInput(f"weights must be finite, non-negative and sum to > 0, "
                               f"got {weights}")
        params["weights"] = weights

    def outputs(self, job: ExplainJob, names: list[str]) -> dict[str, np.ndarray]:
        """The named ONNX outputs of the prediction run; runs the network only if missing."""
        have = dict(job.scale_outputs or {})
        missing = [n for n in names if n not in have]
        if missing:
            have.update(zip(missing, run_onnx_batched(job, job.inputs, missing), strict=True))
        return have

    def smoe_maps(self, job: ExplainJob) -> list[np.ndarray]:
        """SMOE Scale of every scale output, N×hᵢ×wᵢ, at each scale's own resolution."""
        names = list(job.model.spec().scale_outputs)
        found = self.outputs(job, names)
        return [smoe_scale(found[n]) for n in names]

    def per_scale(self, job: ExplainJob) -> np.ndarray:
        """Normalized, upsampled SMOE maps N×S×H×W in [0, 1]."""
        height, width = job.inputs.shape[2:]
        return layer_maps(self.smoe_maps(job), job.params["normalization"], height, width)

    def combined(self, job: ExplainJob) -> np.ndarray:
        """The weighted average of the normalized, upsampled per-scale maps, N×H×W."""
        height, width = job.inputs.shape[2:]
        return combined_map(self.smoe_maps(job), job.params["normalization"],
                            np.asarray(job.params["weights"]), height, width)


@register
class SmoeScale(MultiScaleHandler):
    """SMOE Scale fast path: the weighted average of the normalized per-scale maps."""

    method = pb.METHOD_SMOE_SCALE
    name = "smoe_scale"
    params_field = "smoe_scale"
    description = ("SMOE Scale of every scale output, normalized and averaged; reuses the "
                   "prediction's forward pass (1 forward, 0 backward).")

    def _compute(self, job: ExplainJob) -> np.ndarray:
        """The combined map N×H×W, or the per-scale maps N×S×H×W (the raw attribution)
        when the request wants them as raw output or pictures."""
        if not (job.wants_raw or self.renders(job)):
            return self.combined(job)
        layers = self.per_scale(job)
        if self.renders(job):
            job.overlays = [png(lovi_rgb(item)) for item in layers]
        return layers

    def renders(self, job: ExplainJob) -> bool:
        return False

    def to_maps(self, raw: np.ndarray, job: ExplainJob) -> np.ndarray:
        maps = combine(raw, np.asarray(job.params["weights"])) if raw.ndim == 4 else raw
        return np.clip(maps, 0.0, 1.0)


@register
class Lovi(SmoeScale):
    """LOVI: the per-scale maps as one picture (hue = depth), the combined map as saliency."""

    method = pb.METHOD_LOVI
    name = "lovi"
    params_field = "lovi"
    description = ("Per-scale SMOE maps rendered as one PNG overlay (hue by depth, violet = "
                   "early, red = late); saliency is the combined map (1 forward, 0 backward).")

    def renders(self, job: ExplainJob) -> bool:
        return job.wants_overlays  # the pictures are the point of LOVI, but only when asked


@register
class FastCam(MultiScaleHandler):
    """FastCAM: the combined SMOE map × a class activation map of the target class.

    On a GAP+linear head the CAM is W[target] · A over the last scale output, which equals
    Grad-CAM there (∂ logit / ∂ A_k(i,j) = W[target,k] / hw), so no backward pass runs.
    Other heads fall back to Grad-CAM on the torch program.
    """

    method = pb.METHOD_FASTCAM
    name = "fastcam"
    params_field = "fastcam"
    description = ("Combined SMOE map × class activation map; 1 forward on a GAP+linear "
                   "head, otherwise + 1 torch forward/backward for Grad-CAM.")

    def available_for(self, model: ModelHandle) -> bool:
        if not super().available_for(model):
            return False
        return model.spec().head.get("type") == "gap_linear" or model.has_torch

    def _compute(self, job: ExplainJob) -> np.ndarray:
        cam = self.cam(job)
        height, width = job.inputs.shape[2:]
        return self.combined(job) * upsample(cam, height, width)

    def to_maps(self, raw: np.ndarray, job: ExplainJob) -> np.ndarray:
        return scale_by_max(raw)

    def cam(self, job: ExplainJob) -> np.ndarray:
        """Raw ReLU'd CAM N×h×w: from the linear head when its logits check out, else
        Grad-CAM on the torch program."""
        head = linear_head(job.model)
        name = cam_output(job.model)
        if head is not None:
            activations = self.outputs(job, [name])[name]
            rows = np.arange(job.batch)
            if job.base_logits is None or _logits_match(
                    head.logits(activations, job.targets), job.base_logits[rows, job.targets]):
                job.diagnostics["cam_backward_free"] = 1.0
                return head.cam(activations, job.targets)
            log.warning("model %s: the linear head does not reproduce the logits; using "
                        "Grad-CAM", job.model.name)
        job.diagnostics["cam_backward_free"] = 0.0
        return grad_cam_fallback(job, name)


def cam_output(model: ModelHandle) -> str:
    spec = model.spec()
    return str(spec.head.get("scale_output") or spec.cam_output or spec.scale_outputs[-1])


def _logits_match(predicted: np.ndarray, actual: np.ndarray) -> bool:
    tolerance = 1e-3 * max(1.0, float(np.abs(actual).max()))
    return predicted.shape == actual.shape and float(np.abs(predicted - actual).max()) <= tolerance


def grad_cam_fallback(job: ExplainJob, output_name: str) -> np.ndarray:
    """Grad-CAM (raw, ReLU'd, N×h×w) from ``handlers.cam`` when present, else by autograd."""
    try:
        from handlers.cam import grad_cam  # noqa: PLC0415 - optional module, loaded lazily
    except ImportError:
        return autograd_grad_cam(job, output_name)
    return np.asarray(grad_cam(job, output_name), np.float32)


def autograd_grad_cam(job: ExplainJob, output_name: str) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., https://arxiv.org/abs/1610.02391) on the torch program:
    α_k = mean_ij ∂ logit / ∂ A_k(i,j), CAM = ReLU(Σ_k α_k A_k); 1 forward + 1 backward."""
    import torch  # noqa: PLC0415 - only the fallback needs torch

    module = job.model.torch_module()
    position = 1 + list(job.model.spec().scale_outputs).index(output_name)
    cams = []
    size = job.items_per_chunk(backward=True)
    for start in range(0, job.batch, size):
        part = slice(start, min(job.batch, start + size))
        job.state.check()
        batch = torch.from_numpy(np.ascontiguousarray(job.inputs[part])).requires_grad_(True)
        outputs = module(batch)
        activations = outputs[position]
        index = torch.from_numpy(job.targets[part].astype(np.int64)).view(-1, 1)
        selected = outputs[0].gather(1, index).sum()
        (gradient,) = torch.autograd.grad(selected, activations)
        alpha = gradient.mean(dim=(2, 3), keepdim=True)
        cams.append(torch.relu((alpha * activations).sum(dim=1)).detach().numpy())
        count = part.stop - part.start
        job.cost.forward(count, ENGINE_TORCH)
        job.cost.backward(count)
    return np.concatenate(cams).astype(np.float32)
