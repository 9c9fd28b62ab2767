"""ROAD: RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", https://arxiv.org/abs/2202.00449).

Deletion and insertion replace pixels with black or blur, which leaks the removed shape into
the image (a black hole where the object was) and puts it off the training distribution. ROAD
removes a share of the pixels, most relevant first (MoRF: the probability should fall fast,
lower is better) or least relevant first (LeRF: it should stay, higher is better), and fills
each removed pixel with the weighted mean of its eight neighbours, solved jointly as one sparse
linear system ("noisy linear imputation": the solution plus a little Gaussian noise), as the
authors' ``NoisyLinearImputer`` (tleemann/road_evaluation, also in pytorch-grad-cam).

Removal shares follow pytorch-grad-cam's ``ROADMostRelevantFirst(percentile=p)``: removing a
share f keeps the pixels below the (1 − f) percentile of the saliency (linear interpolation);
ties are broken by the metrics' seeded permutation (``metrics._order``), so a flat map removes
as many pixels as any other.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve

from saliency_service.evaluation.metrics import Probabilities, _order, _target_probability

ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
ROAD_NOISE = 0.01  # standard deviation added to imputed pixels, in [0, 1] pixel units
ROAD_SEED = 20220201
# (row offset, column offset, weight): edge neighbours count twice the diagonal ones.
NEIGHBOUR_WEIGHTS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
                     (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))


def impute(image: np.ndarray, known: np.ndarray, noise: float = ROAD_NOISE,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Fills the pixels of ``image`` (H×W×C float) where ``known`` (H×W bool) is False.

    Each unknown pixel equals the weighted mean of its in-image neighbours, known or not: one
    sparse system over all unknown pixels, solved for every channel at once; then ``noise``
    × N(0, 1) is added to the imputed values. Needs at least one known pixel.
    """
    height, width, channels = image.shape
    flat_known = np.asarray(known, bool).reshape(-1)
    unknown = np.flatnonzero(~flat_known)
    out = np.array(image, np.float64).reshape(-1, channels)
    if len(unknown) == 0:
        return out.reshape(image.shape).astype(image.dtype)
    if len(unknown) == flat_known.size:
        raise ValueError("noisy linear imputation needs at least one known pixel")
    variable = np.full(flat_known.size, -1, np.int64)
    variable[unknown] = np.arange(len(unknown))
    rows0, cols0 = np.divmod(unknown, width)
    weight_sum = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), channels))
    entries_row, entries_col, entries_value = [], [], []
    for dr, dc, weight in NEIGHBOUR_WEIGHTS:
        rows, cols = rows0 + dr, cols0 + dc
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        equation = np.flatnonzero(inside)
        neighbour = rows[inside] * width + cols[inside]
        weight_sum[equation] += weight
        given = flat_known[neighbour]
        rhs[equation[given]] -= weight * out[neighbour[given]]
        entries_row.append(equation[~given])
        entries_col.append(variable[neighbour[~given]])
        entries_value.append(np.full(int((~given).sum()), weight))
    diagonal = np.arange(len(unknown))
    system = coo_matrix(
        (np.concatenate([*entries_value, -weight_sum]),
         (np.concatenate([*entries_row, diagonal]), np.concatenate([*entries_col, diagonal]))),
        shape=(len(unknown), len(unknown))).tocsc()
    solution = spsolve(system, rhs).reshape(len(unknown), channels)
    if noise:
        rng = rng if rng is not None else np.random.default_rng(ROAD_SEED)
        solution = solution + noise * rng.standard_normal(solution.shape)
    out[unknown] = solution
    return out.reshape(image.shape).astype(image.dtype)


def removal_masks(maps: np.ndarray, fraction: float, most_relevant_first: bool) -> np.ndarray:
    """N×H×W bool, True where a pixel stays: pytorch-grad-cam's percentile rule on the ranks."""
    count, height, width = maps.shape
    pixels = height * width
    order = _order(maps if most_relevant_first else -np.asarray(maps, np.float64))
    rank = np.empty_like(order)  # 0 = first to go
    np.put_along_axis(rank, order, np.arange(pixels)[None].repeat(count, 0), axis=1)
    ascending = pixels - 1 - rank  # 0 = the last to go, as np.percentile sorts
    threshold = np.percentile(np.arange(pixels), 100.0 * (1.0 - fraction))
    return (ascending < threshold).reshape(count, height, width)


def road(images: np.ndarray, maps: np.ndarray, targets: np.ndarray, model: Probabilities,
         fractions: tuple[float, ...] = ROAD_FRACTIONS, noise: float = ROAD_NOISE,
         seed: int = ROAD_SEED) -> dict[str, np.ndarray]:
    """Target probability after noisy linear imputation of each share of ``fractions``.

    Returns per image ``road_morf`` (mean over shares, most relevant removed first; lower is
    better), ``road_lerf`` (least relevant first; higher is better) and the per-share curves
    ``road_morf_curve``/``road_lerf_curve`` (N × shares). Images are N×H×W×C in [0, 1].
    """
    images = np.asarray(images, np.float32)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, first in (("morf", True), ("lerf", False)):
        imputed = np.empty((len(images), len(fractions), *images.shape[1:]), np.float32)
        for step, fraction in enumerate(fractions):
            keep = removal_masks(maps, fraction, first)
            for index in range(len(images)):
                imputed[index, step] = impute(images[index], keep[index], noise, rng)
        curve = _target_probability(model, imputed.reshape(-1, *images.shape[1:]),
                                    np.asarray(targets), len(fractions))
        out[f"road_{name}_curve"] = curve
        out[f"road_{name}"] = curve.mean(axis=1)
    return out
