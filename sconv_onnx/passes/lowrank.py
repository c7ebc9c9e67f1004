"""The low-rank family: a weight ``W`` (``OUT x IN``) as the product of two thin ones.

``W ~ U V`` with ``U`` (``OUT x r``) and ``V`` (``r x IN``): a fully connected
layer ``x W^T`` becomes ``(x V^T) U^T``, two MatMuls, and a 1x1 convolution two
1x1 convolutions, with ``r (IN + OUT)`` multiply-adds per position instead of
``IN OUT``.  It pays below the break-even rank ``IN OUT / (IN + OUT)``.

Pretrained weights are rarely low rank, so today the family offers
*approximate* candidates to a MAC budget only (issue 12), never exact ones: a
structured weight stays the box family's.  The factors are fitted on the
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

Sites: ``MatMul`` ``x @ W``, ``Gemm`` without ``transA``, and ``Conv`` with a
1x1 kernel, one group and no BatchNormalization to fold; the readers are the
box family's (:mod:`.box.conv`, :mod:`.box.linear`).
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
    """``W ~ up @ down``: ``up`` (``OUT x r``) and ``down`` (``r x IN``)."""

    up: np.ndarray
    down: np.ndarray

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def to_dict(self) -> dict:
        return {"rank": self.rank}


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


def output_error(weight: np.ndarray, factors: Factors, patches: np.ndarray,
                 originals: np.ndarray | None = None) -> float:
    """``||X0 W^T - X V^T U^T||_F / ||X0 W^T||_F``: the layer's relative output error on
    ``patches`` ``X`` against the original layer on ``originals`` ``X0`` (the same
    patches without), bias excluded."""
    reference = (patches if originals is None else originals) @ np.asarray(weight, np.float64).T
    approximate = (patches @ factors.down.T) @ factors.up.T
    scale = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - approximate)) / scale if scale > 0 else 0.0


def _applies(site: Site) -> bool:
    if site.skip_reason or site.weight is None or site.weight.dtype not in (np.float32,
                                                                            np.float64):
        return False
    if isinstance(site, linear.LinearSite):
        return site.feature_axis == -1
    return (isinstance(site, conv.ConvSite) and site.batchnorm is None
            and site.geometry.group == 1 and all(k == 1 for k in site.geometry.kernel))


def _matrix(site: Site) -> np.ndarray:
    """The site's weight as ``OUT x IN``."""
    return site.weight.reshape(site.weight.shape[0], -1)


def _parts(site: Site, rank: int) -> tuple[Part, ...]:
    """The two thin layers' constants and operators (bias on the second)."""
    out_features, in_features = _matrix(site).shape
    geom = site.geometry
    if isinstance(site, linear.LinearSite):
        down_op = cost.linear_op(cost.LinearGeometry(geom.rows, in_features, rank), in_features)
        up_op = cost.linear_op(cost.LinearGeometry(geom.rows, rank, out_features), rank)
    else:
        down_op = cost.conv_op(rank, in_features, in_features, geom.kernel, geom.input_positions)
        up_op = cost.conv_op(out_features, rank, rank, geom.kernel, 1.0)
    return (Part("down", rank * in_features, (down_op,), geom.positions),
            Part("up", out_features * rank + site.bias_size, (up_op,), geom.positions))


class LowRankFamily(Family):
    """Two thin layers for a MAC budget (see the module doc)."""

    name = "lowrank"
    description = ("low-rank factorization: a fully connected or 1x1 conv weight as two thin "
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
        return candidates + [
            self._candidate(site, weight, fit, output_error(weight, fit, patches),
                            output_error(weight, weight_fit, patches))
            for fit, weight_fit in zip(fitted, plain)]

    def refit(self, site: Site, candidate: Candidate, inputs: np.ndarray,
              originals: np.ndarray) -> Candidate:
        weight = _matrix(site)
        inputs, originals = (a.reshape(-1, a.shape[-1]) for a in (inputs, originals))
        mapped, lower = regression(weight, inputs, originals)
        fit = truncations(mapped, [candidate.payload.rank], lower)[0]
        return self._candidate(site, weight, fit, output_error(weight, fit, inputs, originals),
                               candidate.output_error_weight_alpha)

    def _candidate(self, site: Site, weight: np.ndarray, fit: Factors, error: float,
                   weight_space_error: float) -> Candidate:
        residual = float(np.linalg.norm(weight - fit.up @ fit.down)) / max(
            float(np.linalg.norm(weight)), 1e-300)
        return Candidate(self.name, f"rank {fit.rank}", residual, _parts(site, fit.rank),
                         payload=fit, rounding_depth=weight.shape[1] + fit.rank,
                         approximate=True, output_error=error,
                         output_error_weight_alpha=weight_space_error)

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        factors: Factors = candidate.payload
        node, at = emitter.node(site.node), emitter.at(site.node, site.name)
        old_weight = node.inputs[1]
        down, up = factors.down.astype(site.weight.dtype), factors.up.astype(site.weight.dtype)
        if isinstance(site, linear.LinearSite):
            node.inputs[0] = at.node("MatMul", "lowrank_down",
                                     [node.inputs[0], at.constant("lowrank_down_w", down.T)])
            node.inputs[1] = at.constant("lowrank_up_w", linear.stored_weight(node, up))
        else:
            ones = (1,) * len(site.geometry.kernel)
            first = at.constant("lowrank_down_w", down.reshape(factors.rank, -1, *ones))
            node.inputs[0] = at.node("Conv", "lowrank_down", [node.inputs[0], first],
                                     dict(node.attrs))
            node.inputs[1] = at.constant("lowrank_up_w",
                                         up.reshape(up.shape[0], factors.rank, *ones))
            node.attrs = {}  # a plain 1x1 conv: strides, pads and auto_pad went to the first
        drop_if_unused(emitter.graph_of(site.node), old_weight)


__all__ = ["LowRankFamily", "factor", "ranks"]
