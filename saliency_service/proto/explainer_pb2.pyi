from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_AUTO: _ClassVar[Method]
    METHOD_VANILLA_GRADIENT: _ClassVar[Method]
    METHOD_INPUT_X_GRADIENT: _ClassVar[Method]
    METHOD_SMOOTHGRAD: _ClassVar[Method]
    METHOD_VARGRAD: _ClassVar[Method]
    METHOD_INTEGRATED_GRADIENTS: _ClassVar[Method]
    METHOD_GUIDED_BACKPROP: _ClassVar[Method]
    METHOD_GUIDED_ABSOLUTEGRAD: _ClassVar[Method]
    METHOD_GRADCAM: _ClassVar[Method]
    METHOD_GRADCAM_PLUS_PLUS: _ClassVar[Method]
    METHOD_GUIDED_GRADCAM: _ClassVar[Method]
    METHOD_XGRADCAM: _ClassVar[Method]
    METHOD_SMOE_SCALE: _ClassVar[Method]
    METHOD_FASTCAM: _ClassVar[Method]
    METHOD_LOVI: _ClassVar[Method]
    METHOD_DECAM: _ClassVar[Method]
    METHOD_OCCLUSION: _ClassVar[Method]
    METHOD_RISE: _ClassVar[Method]
    METHOD_DRISE: _ClassVar[Method]

class Baseline(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASELINE_UNSPECIFIED: _ClassVar[Baseline]
    BASELINE_BLACK: _ClassVar[Baseline]
    BASELINE_BLUR: _ClassVar[Baseline]
    BASELINE_UNIFORM_NOISE: _ClassVar[Baseline]
    BASELINE_MEAN: _ClassVar[Baseline]
    BASELINE_ZERO: _ClassVar[Baseline]
    BASELINE_DESATURATED_BLUR: _ClassVar[Baseline]
    BASELINE_LEAST_SCORE: _ClassVar[Baseline]

class QuadratureRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUADRATURE_UNSPECIFIED: _ClassVar[QuadratureRule]
    QUADRATURE_RIEMANN_LEFT: _ClassVar[QuadratureRule]
    QUADRATURE_RIEMANN_RIGHT: _ClassVar[QuadratureRule]
    QUADRATURE_RIEMANN_MIDDLE: _ClassVar[QuadratureRule]
    QUADRATURE_RIEMANN_TRAPEZOID: _ClassVar[QuadratureRule]
    QUADRATURE_GAUSS_LEGENDRE: _ClassVar[QuadratureRule]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_GAUSSIAN_CDF: _ClassVar[Normalization]
    NORMALIZATION_GAMMA_CDF: _ClassVar[Normalization]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_UINT8: DType
DTYPE_FLOAT16: DType
METHOD_UNSPECIFIED: Method
METHOD_AUTO: Method
METHOD_VANILLA_GRADIENT: Method
METHOD_INPUT_X_GRADIENT: Method
METHOD_SMOOTHGRAD: Method
METHOD_VARGRAD: Method
METHOD_INTEGRATED_GRADIENTS: Method
METHOD_GUIDED_BACKPROP: Method
METHOD_GUIDED_ABSOLUTEGRAD: Method
METHOD_GRADCAM: Method
METHOD_GRADCAM_PLUS_PLUS: Method
METHOD_GUIDED_GRADCAM: Method
METHOD_XGRADCAM: Method
METHOD_SMOE_SCALE: Method
METHOD_FASTCAM: Method
METHOD_LOVI: Method
METHOD_DECAM: Method
METHOD_OCCLUSION: Method
METHOD_RISE: Method
METHOD_DRISE: Method
BASELINE_UNSPECIFIED: Baseline
BASELINE_BLACK: Baseline
BASELINE_BLUR: Baseline
BASELINE_UNIFORM_NOISE: Baseline
BASELINE_MEAN: Baseline
BASELINE_ZERO: Baseline
BASELINE_DESATURATED_BLUR: Baseline
BASELINE_LEAST_SCORE: Baseline
QUADRATURE_UNSPECIFIED: QuadratureRule
QUADRATURE_RIEMANN_LEFT: QuadratureRule
QUADRATURE_RIEMANN_RIGHT: QuadratureRule
QUADRATURE_RIEMANN_MIDDLE: QuadratureRule
QUADRATURE_RIEMANN_TRAPEZOID: QuadratureRule
QUADRATURE_GAUSS_LEGENDRE: QuadratureRule
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_GAUSSIAN_CDF: Normalization
NORMALIZATION_GAMMA_CDF: Normalization

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("tensor", "images")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    images: EncodedImages
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., images: _Optional[_Union[EncodedImages, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("predicted", "class_index", "per_item", "detection", "min_score", "region")
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    predicted: bool
    class_index: int
    per_item: ClassIndices
    detection: DetectionTarget
    min_score: float
    region: RegionTarget
    def __init__(self, predicted: _Optional[bool] = ..., class_index: _Optional[int] = ..., per_item: _Optional[_Union[ClassIndices, _Mapping]] = ..., detection: _Optional[_Union[DetectionTarget, _Mapping]] = ..., min_score: _Optional[float] = ..., region: _Optional[_Union[RegionTarget, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class DetectionTarget(_message.Message):
    __slots__ = ("box", "class_index", "label")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    box: Box
    class_index: int
    label: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class RegionTarget(_message.Message):
    __slots__ = ("class_index", "label", "box", "mask")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    box: Box
    mask: Tensor
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "class_index", "label", "score")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    box: Box
    class_index: int
    label: str
    score: float
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Detections(_message.Message):
    __slots__ = ("detections",)
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class ExplainedTarget(_message.Message):
    __slots__ = ("item", "class_index", "label", "box", "score", "region_pixels")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REGION_PIXELS_FIELD_NUMBER: _ClassVar[int]
    item: int
    class_index: int
    label: str
    box: Box
    score: float
    region_pixels: int
    def __init__(self, item: _Optional[int] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., region_pixels: _Optional[int] = ...) -> None: ...

class ClassIndices(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_latency_ms", "best_effort")
    MAX_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    BEST_EFFORT_FIELD_NUMBER: _ClassVar[int]
    max_latency_ms: float
    best_effort: bool
    def __init__(self, max_latency_ms: _Optional[float] = ..., best_effort: _Optional[bool] = ...) -> None: ...

class VanillaGradientParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputXGradientParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SmoothGradParams(_message.Message):
    __slots__ = ("samples", "noise_level")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise_level: float
    def __init__(self, samples: _Optional[int] = ..., noise_level: _Optional[float] = ...) -> None: ...

class IntegratedGradientsParams(_message.Message):
    __slots__ = ("steps", "baseline", "rule")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    baseline: Baseline
    rule: QuadratureRule
    def __init__(self, steps: _Optional[int] = ..., baseline: _Optional[_Union[Baseline, str]] = ..., rule: _Optional[_Union[QuadratureRule, str]] = ...) -> None: ...

class GuidedBackpropParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuidedAbsoluteGradParams(_message.Message):
    __slots__ = ("samples", "noise_level", "quantile")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise_level: float
    quantile: float
    def __init__(self, samples: _Optional[int] = ..., noise_level: _Optional[float] = ..., quantile: _Optional[float] = ...) -> None: ...

class GradCamParams(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: str
    def __init__(self, layer: _Optional[str] = ...) -> None: ...

class GuidedGradCamParams(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: str
    def __init__(self, layer: _Optional[str] = ...) -> None: ...

class MultiScaleParams(_message.Message):
    __slots__ = ("weights", "normalization")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    normalization: Normalization
    def __init__(self, weights: _Optional[_Iterable[float]] = ..., normalization: _Optional[_Union[Normalization, str]] = ...) -> None: ...

class DecamParams(_message.Message):
    __slots__ = ("grid", "population", "generations", "mutation", "crossover", "sparsity", "deletion_weight", "preservation_weight", "baseline", "strategy", "refine", "patience", "max_forward_passes", "aggregate", "spread")
    GRID_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    MUTATION_FIELD_NUMBER: _ClassVar[int]
    CROSSOVER_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    DELETION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRESERVATION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REFINE_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    grid: int
    population: int
    generations: int
    mutation: float
    crossover: float
    sparsity: float
    deletion_weight: float
    preservation_weight: float
    baseline: Baseline
    strategy: str
    refine: bool
    patience: int
    max_forward_passes: int
    aggregate: str
    spread: str
    def __init__(self, grid: _Optional[int] = ..., population: _Optional[int] = ..., generations: _Optional[int] = ..., mutation: _Optional[float] = ..., crossover: _Optional[float] = ..., sparsity: _Optional[float] = ..., deletion_weight: _Optional[float] = ..., preservation_weight: _Optional[float] = ..., baseline: _Optional[_Union[Baseline, str]] = ..., strategy: _Optional[str] = ..., refine: _Optional[bool] = ..., patience: _Optional[int] = ..., max_forward_passes: _Optional[int] = ..., aggregate: _Optional[str] = ..., spread: _Optional[str] = ...) -> None: ...

class OcclusionParams(_message.Message):
    __slots__ = ("window", "stride", "baseline")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    window: int
    stride: int
    baseline: Baseline
    def __init__(self, window: _Optional[int] = ..., stride: _Optional[int] = ..., baseline: _Optional[_Union[Baseline, str]] = ...) -> None: ...

class RiseParams(_message.Message):
    __slots__ = ("masks", "cells", "keep_probability")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    KEEP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    masks: int
    cells: int
    keep_probability: float
    def __init__(self, masks: _Optional[int] = ..., cells: _Optional[int] = ..., keep_probability: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "version", "input", "method", "target", "vanilla_gradient", "input_x_gradient", "smoothgrad", "vargrad", "integrated_gradients", "guided_backprop", "guided_absolutegrad", "gradcam", "gradcam_plus_plus", "guided_gradcam", "xgradcam", "smoe_scale", "fastcam", "lovi", "decam", "occlusion", "rise", "drise", "seed", "budget", "return_raw", "return_overlay", "top_k", "resize", "precision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VANILLA_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_X_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    SMOOTHGRAD_FIELD_NUMBER: _ClassVar[int]
    VARGRAD_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_BACKPROP_FIELD_NUMBER: _ClassVar[int]
    GUIDED_ABSOLUTEGRAD_FIELD_NUMBER: _ClassVar[int]
    GRADCAM_FIELD_NUMBER: _ClassVar[int]
    GRADCAM_PLUS_PLUS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_GRADCAM_FIELD_NUMBER: _ClassVar[int]
    XGRADCAM_FIELD_NUMBER: _ClassVar[int]
    SMOE_SCALE_FIELD_NUMBER: _ClassVar[int]
    FASTCAM_FIELD_NUMBER: _ClassVar[int]
    LOVI_FIELD_NUMBER: _ClassVar[int]
    DECAM_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    DRISE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RETURN_RAW_FIELD_NUMBER: _ClassVar[int]
    RETURN_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    input: Input
    method: Method
    target: Target
    vanilla_gradient: VanillaGradientParams
    input_x_gradient: InputXGradientParams
    smoothgrad: SmoothGradParams
    vargrad: SmoothGradParams
    integrated_gradients: IntegratedGradientsParams
    guided_backprop: GuidedBackpropParams
    guided_absolutegrad: GuidedAbsoluteGradParams
    gradcam: GradCamParams
    gradcam_plus_plus: GradCamParams
    guided_gradcam: GuidedGradCamParams
    xgradcam: GradCamParams
    smoe_scale: MultiScaleParams
    fastcam: MultiScaleParams
    lovi: MultiScaleParams
    decam: DecamParams
    occlusion: OcclusionParams
    rise: RiseParams
    drise: RiseParams
    seed: int
    budget: Budget
    return_raw: bool
    return_overlay: bool
    top_k: int
    resize: str
    precision: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., method: _Optional[_Union[Method, str]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., vanilla_gradient: _Optional[_Union[VanillaGradientParams, _Mapping]] = ..., input_x_gradient: _Optional[_Union[InputXGradientParams, _Mapping]] = ..., smoothgrad: _Optional[_Union[SmoothGradParams, _Mapping]] = ..., vargrad: _Optional[_Union[SmoothGradParams, _Mapping]] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsParams, _Mapping]] = ..., guided_backprop: _Optional[_Union[GuidedBackpropParams, _Mapping]] = ..., guided_absolutegrad: _Optional[_Union[GuidedAbsoluteGradParams, _Mapping]] = ..., gradcam: _Optional[_Union[GradCamParams, _Mapping]] = ..., gradcam_plus_plus: _Optional[_Union[GradCamParams, _Mapping]] = ..., guided_gradcam: _Optional[_Union[GuidedGradCamParams, _Mapping]] = ..., xgradcam: _Optional[_Union[GradCamParams, _Mapping]] = ..., smoe_scale: _Optional[_Union[MultiScaleParams, _Mapping]] = ..., fastcam: _Optional[_Union[MultiScaleParams, _Mapping]] = ..., lovi: _Optional[_Union[MultiScaleParams, _Mapping]] = ..., decam: _Optional[_Union[DecamParams, _Mapping]] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., rise: _Optional[_Union[RiseParams, _Mapping]] = ..., drise: _Optional[_Union[RiseParams, _Mapping]] = ..., seed: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., return_raw: _Optional[bool] = ..., return_overlay: _Optional[bool] = ..., top_k: _Optional[int] = ..., resize: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("method", "forward_passes", "backward_passes", "wall_seconds", "cpu_seconds", "truncated", "remote_calls", "remote_bytes", "precision")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    REMOTE_CALLS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    method: Method
    forward_passes: int
    backward_passes: int
    wall_seconds: float
    cpu_seconds: float
    truncated: bool
    remote_calls: int
    remote_bytes: int
    precision: str
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., forward_passes: _Optional[int] = ..., backward_passes: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., truncated: _Optional[bool] = ..., remote_calls: _Optional[int] = ..., remote_bytes: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "version", "saliency", "predictions", "targets", "cost", "raw", "overlays", "diagnostics", "request_id", "explained")
    class DiagnosticsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    OVERLAYS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    saliency: Tensor
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    targets: _containers.RepeatedScalarFieldContainer[int]
    cost: Cost
    raw: Tensor
    overlays: _containers.RepeatedScalarFieldContainer[bytes]
    diagnostics: _containers.ScalarMap[str, float]
    request_id: str
    explained: _containers.RepeatedCompositeFieldContainer[ExplainedTarget]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., saliency: _Optional[_Union[Tensor, _Mapping]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., targets: _Optional[_Iterable[int]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., raw: _Optional[_Union[Tensor, _Mapping]] = ..., overlays: _Optional[_Iterable[bytes]] = ..., diagnostics: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ..., explained: _Optional[_Iterable[_Union[ExplainedTarget, _Mapping]]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "best_fitness", "forward_passes", "saliency")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BEST_FITNESS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    best_fitness: float
    forward_passes: int
    saliency: Tensor
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., best_fitness: _Optional[float] = ..., forward_passes: _Optional[int] = ..., saliency: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExplainUpdate(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ExplainResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ExplainResponse, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "input", "top_k", "resize", "precision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    input: Input
    top_k: int
    resize: str
    precision: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., top_k: _Optional[int] = ..., resize: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "predictions", "logits", "cost", "detections", "class_map")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_MAP_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    logits: Tensor
    cost: Cost
    detections: _containers.RepeatedCompositeFieldContainer[Detections]
    class_map: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., detections: _Optional[_Iterable[_Union[Detections, _Mapping]]] = ..., class_map: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "version", "ready", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ready: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ready: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("method", "name", "engine", "defaults", "mean_seconds", "measured_requests", "description")
    class DefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    method: Method
    name: str
    engine: str
    defaults: _containers.ScalarMap[str, str]
    mean_seconds: float
    measured_requests: int
    description: str
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., name: _Optional[str] = ..., engine: _Optional[str] = ..., defaults: _Optional[_Mapping[str, str]] = ..., mean_seconds: _Optional[float] = ..., measured_requests: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("shape", "dtype", "layout", "mean", "std", "value_range", "name", "batch_size", "resize")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    VALUE_RANGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    layout: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    value_range: _containers.RepeatedScalarFieldContainer[float]
    name: str
    batch_size: int
    resize: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., value_range: _Optional[_Iterable[float]] = ..., name: _Optional[str] = ..., batch_size: _Optional[int] = ..., resize: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("status", "input", "class_labels", "scale_outputs", "cam_layer", "methods", "metadata", "output_kind", "unavailable_methods")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    SCALE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_METHODS_FIELD_NUMBER: _ClassVar[int]
    status: ModelStatus
    input: InputSpec
    class_labels: _containers.RepeatedScalarFieldContainer[str]
    scale_outputs: _containers.RepeatedScalarFieldContainer[str]
    cam_layer: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    metadata: _containers.ScalarMap[str, str]
    output_kind: str
    unavailable_methods: _containers.RepeatedCompositeFieldContainer[UnavailableMethod]
    def __init__(self, status: _Optional[_Union[ModelStatus, _Mapping]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., class_labels: _Optional[_Iterable[str]] = ..., scale_outputs: _Optional[_Iterable[str]] = ..., cam_layer: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., output_kind: _Optional[str] = ..., unavailable_methods: _Optional[_Iterable[_Union[UnavailableMethod, _Mapping]]] = ...) -> None: ...

class UnavailableMethod(_message.Message):
    __slots__ = ("method", "name", "reason")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    method: Method
    name: str
    reason: str
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
