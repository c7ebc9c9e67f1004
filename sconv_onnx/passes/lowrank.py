"""The low-rank family: a weight as the product of two thin ones.

*Channel split.* ``W`` as ``OUT x IN`` (``IN = C prod(K)`` for a conv)
is ``W ~ U V`` with ``U`` (``OUT x r``) and ``V`` (``r x IN``): a fully
connected layer ``x W^T`` becomes ``(x V^T) U^T``, two MatMuls, and a conv a
conv with the original kernel to ``r`` channels then a 1x1 conv, with
``r (IN + OUT)`` multiply-adds per output position instead of ``IN OUT``.
It pays below the break-even rank ``IN OUT / (IN + OUT)``.

*Spatial split* (2-D kernels ``kh x kw``, both above 1): a ``kh x 1`` conv to
``r`` channels then a ``1 x kw`` conv, ``W[o, c, i, j] ~ sum_r H[o, r, j]
V[r, c, i]`` (:class:`SpatialFactors`): the truncated SVD of ``W`` arranged as
``(OUT kw) x (C kh)``, the second factor then fitted on the data
(:func:`fit_horizontal`).  It pays below ``OUT C kh kw / (C kh w + OUT kw)``,
``w`` the first conv's positions per output position.

Pretrained weights are rarely low rank, so today the family offers
*approximate* candidates to a MAC budget only (issue 12), never exact ones: a
structured weight stays the box family's.  The channel split is fitted on the
layer's calibration inputs (``alpha_fit="data"``): with the input patches
``P`` (``m x IN``) and their second moment ``S = P^T P / m``, the output
error ``||(W - U V) P^T||_F`` is ``sqrt(m) ||(W - U V) L||_F`` for ``L L^T = S``,
which the truncated SVD of ``W L`` minimizes (``U = U_r S_r``,
``V = V_r^T L^-1``).  Few patches would be matched and nothing else (a
classifier sees one row per sample, often fewer than its inputs), so ``S``
is shrunk toward the weight-space metric as the box family's alphas are
(:mod:`sconv_onnx.datafit`): ``S + lambda mu I`` with ``lambda = IN / m``
(times :data:`~sconv_onnx.datafit.SHRINK`) and ``mu`` the mean squared
patch entry; with little data the fit tends to the truncated SVD of ``W``,
which is the fit in weight space (``alpha_fit="weights"``).
Ranks are :data:`RANK_FRACTIONS` of the break-even rank rounded up to a
multiple of :data:`RANK_STEP` (whole NCHWc blocks of 8 or 16 floats on every
x86 machine seen), those still below it.

Sites: ``MatMul`` ``x @ W``, ``Gemm`` without ``transA``, and ``Conv`` of
one group (1-D, 2-D or 3-D) with no BatchNormalization to fold; the readers
are the box family's (:mod:`.box.conv`, :mod:`.box.linear`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import cost, datafit
from ..plan import Candidate, Part
from .base import CalibrationRequest, Emitter, Family, Site
from .box import calibrate as box_calibrate
from .box import conv, linear
from .graphs import drop_if_unused

#: Ranks are multiples of this (the NCHWc block is 8 floats with AVX2, 16 with AVX-512).
RANK_STEP = 16
#: The ranks offered, as fractions of the break-even rank ``IN OUT / (IN + OUT)``.
RANK_FRACTIONS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclass(frozen=True)
class Factors:
    """``W ~ up @ down`` for ``W`` as ``OUT x IN`` (``IN = C prod(K)`` for a conv):
    ``up`` (``OUT x r``) and ``down`` (``r x IN``).  A conv becomes a conv with the
    original kernel to ``r`` channels, then a 1x1 conv (*channel* split)."""

    up: np.ndarray
    down: np.ndarray

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "split": "channel"}

    def outputs(self, patches: np.ndarray) -> np.ndarray:
        """The two layers on ``patches`` (``m x IN``): ``m x OUT``, bias excluded."""
        return (patches @ self.down.T) @ self.up.T

    def expand(self, shape: tuple[int, ...]) -> np.ndarray:
        """The weight the two layers compute together, in the original ``shape``."""
        return (self.up @ self.down).reshape(shape)


@dataclass(frozen=True)
class SpatialFactors:
    """A 2-D ``kh x kw`` conv as a ``kh x 1`` conv to ``r`` channels, then a ``1 x kw``
    conv: ``W[o, c, i, j] ~ sum_r horizontal[o, r, j] vertical[r, c, i]``.

    ``vertical`` is ``r x C x kh``, ``horizontal`` ``OUT x r x kw``.  Per output
    position the pair costs ``r C kh w + OUT r kw`` multiply-adds (``w`` the
    first conv's positions per output position: the input's width over the
    output's) instead of ``OUT C kh kw``.
    """

    vertical: np.ndarray
    horizontal: np.ndarray

    @property
    def rank(self) -> int:
        return self.vertical.shape[0]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "split": "spatial"}

    def outputs(self, patches: np.ndarray) -> np.ndarray:
        """The two convs on ``patches`` (``m x C kh kw``, the conv's layout): ``m x OUT``."""
        return spatial_features(patches, self.vertical) @ self.horizontal.reshape(
            self.horizontal.shape[0], -1).T

    def expand(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.einsum("orj,rci->ocij", self.horizontal, self.vertical).reshape(shape)


def ranks(in_features: int, out_features: int) -> list[int]:
    """The ranks offered for an ``OUT x IN`` weight: below the break-even rank, largest
    first (see :data:`RANK_FRACTIONS`)."""
    even = in_features * out_features / (in_features + out_features)
    offered = {RANK_STEP * math.ceil(even * fraction / RANK_STEP) for fraction in RANK_FRACTIONS}
    return sorted((r for r in offered if 0 < r < even), reverse=True)


def metric_root(patches: np.ndarray) -> np.ndarray:
    """``L`` (lower triangular, ``IN x IN``) with ``L L^T = P^T P / m + lambda mu I``: the
    patches' second moment shrunk toward the identity (module doc)."""
    count, features = patches.shape
    moment = patches.T @ patches / count
    shrink = datafit.pull(count, features, float(np.mean(patches**2)))
    return np.linalg.cholesky(moment + shrink * np.eye(features))


def truncations(matrix: np.ndarray, wanted: list[int], lower: np.ndarray | None = None) -> list[Factors]:
    """Per rank of ``wanted``, the factors of ``matrix`` (``OUT x IN``) of least error in
    the metric ``L L^T`` (``lower``; the plain Frobenius norm without): the truncated
    SVD of ``matrix L``, one decomposition for all ranks."""
    matrix = np.asarray(matrix, np.float64)
    u, s, vt = np.linalg.svd(matrix if lower is None else matrix @ lower, full_matrices=False)
    if lower is not None:
        vt = np.linalg.solve(lower.T, vt.T).T  # V^T L^-1
    return [Factors(u[:, :rank] * s[:rank], vt[:rank]) for rank in wanted]


def factor(weight: np.ndarray, rank: int, patches: np.ndarray | None = None) -> Factors:
    """The rank-``rank`` factors of ``weight`` (``OUT x IN``) of least output error on
    ``patches`` (``m x IN``), or of least weight-space error without (module doc)."""
    return truncations(weight, [rank], None if patches is None else metric_root(patches))[0]


def regression(weight: np.ndarray, inputs: np.ndarray, originals: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The sequential fit's full-rank map and metric: ``(B, L)``.

    The layer receives ``X`` (``inputs``, ``m x IN``) where the original saw
    ``X0`` (``originals``, the same positions), and should still give
    ``Y = X0 W^T``.  Shrunk as the one-shot fit is, the least-squares map is
    ``B^T = S^-1 (X^T Y / m + lambda mu W^T)`` with ``S = X^T X / m + lambda mu I
    = L L^T``; the best rank-``r`` map is then the truncated SVD of ``B L``
    (reduced-rank regression: the error splits into the full-rank fit's and
    ``||(B - U V) L||_F^2``).  With ``X = X0``, ``B = W``: the one-shot fit.
    """
    weight = np.asarray(weight, np.float64)
    lower = metric_root(inputs)
    count, features = inputs.shape
    shrink = datafit.pull(count, features, float(np.mean(inputs**2)))
    rhs = inputs.T @ (originals @ weight.T) / count + shrink * weight.T
    mapped = np.linalg.solve(lower.T, np.linalg.solve(lower, rhs))  # S^-1 rhs: B^T
    return mapped.T, lower


def spatial_features(patches: np.ndarray, vertical: np.ndarray) -> np.ndarray:
    """The first (``kh x 1``) conv's outputs that the second reads at each patch:
    ``Z[m, r, j] = sum_{c, i} vertical[r, c, i] X[m, c, i, j]``, as ``m x r kw``."""
    channels, height = vertical.shape[1:]
    grid = patches.reshape(len(patches), channels, height, -1)
    return np.einsum("mcij,rci->mrj", grid, vertical, optimize=True).reshape(len(patches), -1)


def spatial_truncations(weight: np.ndarray, wanted: list[int]) -> list[SpatialFactors]:
    """Per rank of ``wanted``, the spatial factors of least weight-space error: the
    truncated SVD of ``W`` arranged as ``(OUT kw) x (C kh)`` (Jaderberg et al.'s scheme
    2), one decomposition for all ranks."""
    out_ch, in_ch, height, width = weight.shape
    matrix = np.asarray(weight, np.float64).transpose(0, 3, 1, 2).reshape(out_ch * width, -1)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return [SpatialFactors(vt[:rank].reshape(rank, in_ch, height),
                           (u[:, :rank] * s[:rank]).reshape(out_ch, width, rank).transpose(0, 2, 1))
            for rank in wanted]


def fit_horizontal(weight: np.ndarray, factors: SpatialFactors, inputs: np.ndarray,
                   originals: np.ndarray) -> SpatialFactors:
    """``factors`` with the second conv fitted on the data, the first kept.

    With ``Z`` the first conv's outputs on ``inputs`` (:func:`spatial_features`,
    ``m x r kw``) and ``Y = X0 W^T`` the original layer's on ``originals``, the
    horizontal factor ``H`` (``OUT x r kw``) solves the shrunk least squares
    ``H^T = (Z^T Z / m + lambda mu I)^-1 (Z^T Y / m + lambda mu H_0^T)``, pulled
    toward the weight-space ``H_0`` as far as there are few patches
    (:func:`~sconv_onnx.datafit.pull`).  Fitting the first factor too would
    solve for ``r C kh`` unknowns at once; it stays the weight-space one.
    """
    features = spatial_features(inputs, factors.vertical)
    count, width = features.shape
    targets = originals @ np.asarray(weight, np.float64).reshape(len(weight), -1).T
    start = factors.horizontal.reshape(len(weight), -1)
    shrink = datafit.pull(count, width, float(np.mean(features**2)))
    gram = features.T @ features / count + shrink * np.eye(width)
    fitted = np.linalg.solve(gram, features.T @ targets / count + shrink * start.T).T
    return SpatialFactors(factors.vertical, fitted.reshape(factors.horizontal.shape))


def output_error(weight: np.ndarray, factors: Factors | SpatialFactors, patches: np.ndarray,
                 originals: np.ndarray | None = None) -> float:
    """``||X0 W^T - f(X)||_F / ||X0 W^T||_F``: the layer's relative output error on
    ``patches`` ``X`` against the original layer on ``originals`` ``X0`` (the same
    patches without), bias excluded; ``W`` as ``OUT x IN``."""
    weight = np.asarray(weight, np.float64).reshape(len(weight), -1)
    reference = (patches if originals is None else originals) @ weight.T
    scale = float(np.linalg.norm(reference))
    error = float(np.linalg.norm(reference - factors.outputs(patches)))
    return error / scale if scale > 0 else 0.0


def _applies(site: Site) -> bool:
    if site.skip_reason or site.weight is None or site.weight.dtype not in (np.float32,
                                                                            np.float64):
        return False
    if isinstance(site, linear.LinearSite):
        return site.feature_axis == -1
    return isinstance(site, conv.ConvSite) and site.batchnorm is None and site.geometry.group == 1


def _spatial_applies(site: Site) -> bool:
    """A 2-D conv whose kernel is wider and taller than 1."""
    return isinstance(site, conv.ConvSite) and len(site.geometry.kernel) == 2 and min(
        site.geometry.kernel) > 1


def _matrix(site: Site) -> np.ndarray:
    """The site's weight as ``OUT x IN``."""
    return site.weight.reshape(site.weight.shape[0], -1)


def _first_conv_positions(geom) -> float:
    """Positions of a spatial split's first (``kh x 1``) conv per output position: the
    input's width over the output's (its rows are the output's, its columns the input's)."""
    if geom.in_spatial is None or geom.out_spatial is None:
        return float(geom.strides[1])
    return geom.in_spatial[1] / max(1, geom.out_spatial[1])


def spatial_ranks(site: Site) -> list[int]:
    """The spatial split's ranks: :data:`RANK_FRACTIONS` of its break-even rank
    ``OUT C kh kw / (C kh w + OUT kw)``, whole blocks, at most the full rank."""
    out_ch, in_ch, height, width = site.weight.shape
    positions = _first_conv_positions(site.geometry)
    even = out_ch * in_ch * height * width / (in_ch * height * positions + out_ch * width)
    full = min(out_ch * width, in_ch * height)
    offered = {RANK_STEP * math.ceil(even * fraction / RANK_STEP) for fraction in RANK_FRACTIONS}
    return sorted((r for r in offered if 0 < r < even and r <= full), reverse=True)


def _parts(site: Site, factors: Factors | SpatialFactors) -> tuple[Part, ...]:
    """The two thin layers' constants and operators (bias on the second)."""
    rank, geom = factors.rank, site.geometry
    out_features = site.weight.shape[0]
    if isinstance(site, linear.LinearSite):
        in_features = _matrix(site).shape[1]
        down_op = cost.linear_op(cost.LinearGeometry(geom.rows, in_features, rank), in_features)
        up_op = cost.linear_op(cost.LinearGeometry(geom.rows, rank, out_features), rank)
        down_params, up_params = rank * in_features, out_features * rank
    elif isinstance(factors, SpatialFactors):
        channels, height, width = site.weight.shape[1:]
        between = _first_conv_positions(geom)
        down_op = cost.conv_op(rank, channels, channels, (height, 1), geom.input_positions, between)
        up_op = cost.conv_op(out_features, rank, rank, (1, width), between)
        down_params, up_params = rank * channels * height, out_features * rank * width
    else:
        channels, kernel = site.weight.shape[1], geom.kernel
        down_op = cost.conv_op(rank, channels, channels, kernel, geom.input_positions)
        up_op = cost.conv_op(out_features, rank, rank, (1,) * len(kernel), 1.0)
        down_params, up_params = rank * channels * math.prod(kernel), out_features * rank
    return (Part("down", down_params, (down_op,), geom.positions),
            Part("up", up_params + site.bias_size, (up_op,), geom.positions))


class LowRankFamily(Family):
    """Two thin layers for a MAC budget (see the module doc)."""

    name = "lowrank"
    description = ("low-rank factorization: a fully connected or conv weight as two thin "
                   "layers (MAC budget only, fitted on the calibration data)")

    def find(self, view) -> list[Site]:
        sites = conv.find(view, self.name) + linear.find(view, self.name)
        return [site for site in sites if _applies(site)]

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        return []  # exact low rank is left to the families of exact structure

    def calibration(self, site: Site, seed: int) -> CalibrationRequest | None:
        return box_calibrate.request(site, seed)

    def calibrate(self, site: Site, candidates: list[Candidate], sample: np.ndarray,
                  budget: bool, alpha_fit: str) -> list[Candidate]:
        if not budget:
            return candidates
        weight, patches = _matrix(site), sample.reshape(-1, sample.shape[-1])
        wanted = ranks(weight.shape[1], weight.shape[0])
        plain = truncations(weight, wanted)
        fitted = truncations(weight, wanted, metric_root(patches)) if alpha_fit == "data" else plain
        if _spatial_applies(site):
            spatial = spatial_truncations(site.weight, spatial_ranks(site))
            plain = plain + spatial
            fitted = fitted + ([fit_horizontal(site.weight, fit, patches, patches) for fit in spatial]
                               if alpha_fit == "data" else spatial)
        return candidates + [
            self._candidate(site, fit, output_error(weight, fit, patches),
                            output_error(weight, weight_fit, patches))
            for fit, weight_fit in zip(fitted, plain)]

    def refit(self, site: Site, candidate: Candidate, inputs: np.ndarray,
              originals: np.ndarray) -> Candidate:
        weight = _matrix(site)
        inputs, originals = (a.reshape(-1, a.shape[-1]) for a in (inputs, originals))
        if isinstance(candidate.payload, SpatialFactors):  # from the weight-space SVD again
            start = spatial_truncations(site.weight, [candidate.payload.rank])[0]
            fit = fit_horizontal(site.weight, start, inputs, originals)
        else:
            mapped, lower = regression(weight, inputs, originals)
            fit = truncations(mapped, [candidate.payload.rank], lower)[0]
        return self._candidate(site, fit, output_error(weight, fit, inputs, originals),
                               candidate.output_error_weight_alpha)

    def _candidate(self, site: Site, fit: Factors | SpatialFactors, error: float,
                   weight_space_error: float) -> Candidate:
        weight = np.asarray(site.weight, np.float64)
        residual = float(np.linalg.norm(weight - fit.expand(weight.shape))) / max(
            float(np.linalg.norm(weight)), 1e-300)
        spatial = isinstance(fit, SpatialFactors)
        label = f"spatial rank {fit.rank}" if spatial else f"rank {fit.rank}"
        depth = (weight.shape[1] * weight.shape[2] + fit.rank * weight.shape[3] if spatial
                 else _matrix(site).shape[1] + fit.rank)
        return Candidate(self.name, label, residual, _parts(site, fit), payload=fit,
                         rounding_depth=depth, approximate=True, output_error=error,
                         output_error_weight_alpha=weight_space_error)

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        factors: Factors | SpatialFactors = candidate.payload
        node, at = emitter.node(site.node), emitter.at(site.node, site.name)
        old_weight, dtype = node.inputs[1], site.weight.dtype
        if isinstance(site, linear.LinearSite):
            node.inputs[0] = at.node("MatMul", "lowrank_down", [
                node.inputs[0], at.constant("lowrank_down_w", factors.down.T.astype(dtype))])
            node.inputs[1] = at.constant("lowrank_up_w",
                                         linear.stored_weight(node, factors.up.astype(dtype)))
        elif isinstance(factors, SpatialFactors):
            self._emit_spatial(site, factors, node, at)
        else:
            kernel, rank = site.geometry.kernel, factors.rank
            first = at.constant("lowrank_down_w",
                                factors.down.reshape(rank, -1, *kernel).astype(dtype))
            node.inputs[0] = at.node("Conv", "lowrank_down", [node.inputs[0], first],
                                     dict(node.attrs))
            node.inputs[1] = at.constant("lowrank_up_w", factors.up.reshape(
                len(factors.up), rank, *(1,) * len(kernel)).astype(dtype))
            node.attrs = {}  # a plain 1x1 conv: the kernel, strides and pads went to the first
        drop_if_unused(emitter.graph_of(site.node), old_weight)

    @staticmethod
    def _emit_spatial(site: Site, factors: SpatialFactors, node, at) -> None:
        """``kh x 1`` conv (the rows' stride, dilation and pads), then ``1 x kw`` (the
        columns'), the bias on the second; the columns' zero pads commute with the first
        conv, which has no bias."""
        geom, dtype = site.geometry, site.weight.dtype
        (stride_h, stride_w), (dilation_h, dilation_w) = geom.strides, geom.dilations
        top, left, bottom, right = geom.pads
        vertical = factors.vertical[..., None].astype(dtype)  # r x C x kh x 1
        node.inputs[0] = at.node("Conv", "lowrank_vertical", [
            node.inputs[0], at.constant("lowrank_vertical_w", vertical)],
            {"strides": [stride_h, 1], "dilations": [dilation_h, 1], "pads": [top, 0, bottom, 0]})
        node.inputs[1] = at.constant("lowrank_horizontal_w",
                                     factors.horizontal[:, :, None, :].astype(dtype))
        node.attrs = {"strides": [1, stride_w], "dilations": [1, dilation_w],
                      "pads": [0, left, 0, right]}


__all__ = ["LowRankFamily", "SpatialFactors", "factor", "ranks", "spatial_ranks"]
