"""Structured-kernel math: box bases, separable least squares, structure search.

Pure numpy, no ONNX. Conventions (Bhalgat et al., NeurIPS 2020, and
DESIGN.md section 1):

* A weight tensor ``W`` has shape ``(O, C, K_1, .., K_r)``: ``O`` filters,
  ``C`` input channels per group, ``r`` spatial axes.
* A *structure* is the tuple of underlying sizes ``(c, n_1, .., n_r)`` with
  ``1 <= c <= C`` and ``1 <= n_i <= K_i``.  ``W`` has the structure when

      W = alpha x_1 A(C, c) x_2 A(K_1, n_1) .. x_{r+1} A(K_r, n_r)

  for some ``alpha`` of shape ``(O, c, n_1, .., n_r)``, where ``A(K, k)`` is
  the ``K x k`` box basis whose column ``j`` holds ones at rows
  ``j .. j + K - k`` and ``x_m`` multiplies along axis ``m``.
* A size equal to the full axis length (``k == K``) makes ``A`` the identity:
  that axis carries no structure.  Every weight therefore has the trivial
  structure ``(C, K_1, .., K_r)``.
* Least squares separates per axis: ``alpha = W x_m pinv(A_m)`` for each
  structured axis, and the projection ``A alpha`` applies ``A_m pinv(A_m)``
  per axis.  All math runs in float64.
* The relative residual ``||W - A alpha||_F / ||W||_F`` is a layer's distance
  from the structure (0 for an all-zero weight).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

#: Channel-axis candidates whose exact residual is computed, at most, per
#: layer (after the cheap lower-bound screen); keeps loose tolerances fast.
MAX_EXACT_CHANNEL_CHECKS = 16
#: Columns kept when sketching a large weight for the channel screen.
SKETCH_COLUMNS = 32
#: A sketched lower bound may undershoot by random chance; screen with slack.
SKETCH_SLACK = 2.0


@functools.lru_cache(maxsize=4096)
def box_basis(size: int, under: int) -> np.ndarray:
    """Return ``A(size, under)``: column ``j`` has ones at rows ``j .. j+size-under``."""
    if not 1 <= under <= size:
        raise ValueError(f"underlying size {under} must be in 1..{size}")
    window = size - under + 1
    basis = np.zeros((size, under))
    for j in range(under):
        basis[j : j + window, j] = 1.0
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=4096)
def box_pinv(size: int, under: int) -> np.ndarray:
    """Moore-Penrose pseudo-inverse of :func:`box_basis` (``under x size``)."""
    pinv = np.linalg.pinv(box_basis(size, under))
    pinv.setflags(write=False)
    return pinv


@functools.lru_cache(maxsize=4096)
def box_gram(size: int, under: int) -> np.ndarray:
    """``A(size, under)^T A(size, under)`` (``under x under``): ``max(0, size-under+1 - |i-j|)``."""
    basis = box_basis(size, under)
    gram = basis.T @ basis
    gram.setflags(write=False)
    return gram


def _along(matrix: np.ndarray, tensor: np.ndarray, axis: int) -> np.ndarray:
    """Multiply ``tensor`` by ``matrix`` along ``axis`` (``tensor x_axis matrix``)."""
    moved = np.tensordot(matrix, tensor, axes=([1], [axis]))
    return np.moveaxis(moved, 0, axis)


def fit_alpha(weight: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Least-squares underlying weights for ``sizes = (c, n_1, .., n_r)``.

    Returns ``alpha`` of shape ``(O, *sizes)`` in float64.
    """
    alpha = np.asarray(weight, dtype=np.float64)
    for axis, under in enumerate(sizes, start=1):
        full = alpha.shape[axis]
        if under != full:
            alpha = _along(box_pinv(full, under), alpha, axis)
    return alpha


def expand(alpha: np.ndarray, full_shape: tuple[int, ...]) -> np.ndarray:
    """Structured weight ``A alpha`` of shape ``full_shape`` (float64)."""
    weight = np.asarray(alpha, dtype=np.float64)
    for axis in range(1, weight.ndim):
        full, under = full_shape[axis], weight.shape[axis]
        if under != full:
            weight = _along(box_basis(full, under), weight, axis)
    return weight


def relative_residual(weight: np.ndarray, sizes: tuple[int, ...]) -> float:
    """``||W - A alpha||_F / ||W||_F`` for the least-squares ``alpha``."""
    weight = np.asarray(weight, dtype=np.float64)
    norm = float(np.linalg.norm(weight))
    if norm == 0.0:
        return 0.0
    projected = expand(fit_alpha(weight, sizes), weight.shape)
    return float(np.linalg.norm(weight - projected)) / norm


def _residual_of_fit(alpha: np.ndarray, full_shape: tuple[int, ...], norm: float) -> float:
    """Relative residual from a least-squares ``alpha`` without expanding it.

    ``A alpha`` is the orthogonal projection of ``W``, so
    ``||W - A alpha||^2 = ||W||^2 - ||A alpha||^2`` and
    ``||A alpha||^2 = <alpha, (A^T A) alpha>`` works on the small ``alpha``.
    The difference loses digits below about ``1e-7`` relative residual, far
    below any useful tolerance.
    """
    if norm == 0.0:
        return 0.0
    applied = alpha
    for axis in range(1, alpha.ndim):
        if alpha.shape[axis] != full_shape[axis]:
            applied = _along(box_gram(full_shape[axis], alpha.shape[axis]), applied, axis)
    energy = float(np.vdot(alpha, applied))
    return math.sqrt(max(0.0, norm * norm - energy)) / norm


def _axis_residual(weight: np.ndarray, axis: int, under: int, norm: float) -> float:
    """Relative residual of structuring only ``axis`` at size ``under``."""
    full = weight.shape[axis]
    if under == full or norm == 0.0:
        return 0.0
    return _residual_of_fit(_along(box_pinv(full, under), weight, axis), weight.shape, norm)


def channel_lower_bounds(weight: np.ndarray, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Cheap lower bounds on the channel-axis residual for every ``c``.

    ``v`` lies in the range of ``A(C, c)`` (window ``L = C - c + 1``) exactly
    when, with ``d[i] = v[i] - v[i-1]`` (``v[-1] = v[C] = 0``), the sum of
    ``d`` over each residue class modulo ``L`` is zero.  Each such sum is
    ``<b_r, v>`` for a +/-1 vector ``b_r`` orthogonal to the range, and
    ``b_r`` with disjoint supports are orthogonal, so
    ``sum_r <b_r, v>^2 / ||b_r||^2`` over such a family bounds the squared
    projection residual from below.

    Large weights are sketched to :data:`SKETCH_COLUMNS` random columns first
    (the channel structure survives right-multiplication); the bound is then
    an estimate, flagged by the second return value.

    Returns ``(bounds, sketched)`` with ``bounds[c - 1]`` for ``c = 1..C``.
    """
    channels = weight.shape[1]
    matrix = np.moveaxis(np.asarray(weight, dtype=np.float64), 1, 0).reshape(channels, -1)
    sketched = matrix.shape[1] > SKETCH_COLUMNS
    if sketched:
        rng = np.random.default_rng(seed)
        gauss = rng.standard_normal((matrix.shape[1], SKETCH_COLUMNS))
        matrix = matrix @ gauss / math.sqrt(SKETCH_COLUMNS)
    norm_sq = float(np.sum(matrix * matrix))
    bounds = np.zeros(channels)
    if norm_sq == 0.0:
        return bounds, sketched
    padded = np.zeros((channels + 2, matrix.shape[1]))
    padded[1:-1] = matrix
    diff = np.diff(padded, axis=0)  # d[i] = v[i] - v[i-1], i = 0..C
    positions = np.arange(channels)
    for window in range(2, channels + 1):
        under = channels - window + 1
        whole = (channels + 1) // window * window
        class_sums = diff[:whole].reshape(-1, window, diff.shape[1]).sum(axis=0)
        tail = diff[whole:]
        class_sums[: len(tail)] += tail
        counts = np.bincount(positions % window, minlength=window)
        b_norm_sq = counts + np.roll(counts, 1)  # ||b_r||^2 = n_r + n_(r-1)
        energy = np.sum(class_sums * class_sums, axis=1) / b_norm_sq
        odd = energy[1::2].sum()
        even = energy[2::2].sum() + (energy[0] if window % 2 == 0 else 0.0)
        bounds[under - 1] = math.sqrt(max(odd, even) / norm_sq)
    return bounds, sketched


@dataclass(frozen=True)
class Structure:
    """Underlying sizes ``(c, n_1, .., n_r)`` and the weight's residual at them."""

    sizes: tuple[int, ...]
    residual: float

    @property
    def channels(self) -> int:
        return self.sizes[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.sizes[1:]

    @property
    def dof(self) -> int:
        """Degrees of freedom per filter: ``c * prod(n_i)``."""
        return math.prod(self.sizes)

    def label(self) -> str:
        """Human notation, e.g. ``c=16 n=2x2``."""
        return f"c={self.channels} n={'x'.join(map(str, self.kernel))}"


def _feasible_channels(weight: np.ndarray, tol: float, norm: float) -> list[tuple[int, float]]:
    """Smallest channel sizes ``c`` whose single-axis residual is within ``tol``."""
    channels = weight.shape[1]
    if channels == 1:
        return [(1, 0.0)]
    bounds, sketched = channel_lower_bounds(weight)
    slack = SKETCH_SLACK if sketched else 1.0
    feasible: list[tuple[int, float]] = []
    checks = 0
    for under in range(1, channels):
        if bounds[under - 1] > tol * slack:
            continue
        checks += 1
        residual = _axis_residual(weight, 1, under, norm)
        if residual <= tol:
            feasible.append((under, residual))
            if len(feasible) >= 2:
                break
        if checks >= MAX_EXACT_CHANNEL_CHECKS:
            break
    feasible.append((channels, 0.0))
    return feasible


def search(weight: np.ndarray, tol: float) -> list[Structure]:
    """Every structure of ``weight`` within ``tol``, fewest degrees of freedom first.

    The trivial structure (all axes full) is always last-but-feasible, so the
    list is never empty.  Per axis, the single-axis residual is a lower bound
    of the joint residual (the joint subspace lies inside each single-axis
    subspace), so axes are screened one by one and only surviving
    combinations get the exact joint least squares.  The subspaces for
    different ``n`` are not nested; every size is tried.
    """
    weight = np.asarray(weight, dtype=np.float64)
    norm = float(np.linalg.norm(weight))
    per_axis: list[list[int]] = [[c for c, _ in _feasible_channels(weight, tol, norm)]]
    for axis in range(2, weight.ndim):
        full = weight.shape[axis]
        per_axis.append(
            [n for n in range(1, full + 1) if _axis_residual(weight, axis, n, norm) <= tol]
        )
    channel_fits: dict[int, np.ndarray] = {}
    found: list[Structure] = []
    for sizes in sorted(itertools.product(*per_axis), key=lambda s: (math.prod(s), s)):
        if sizes == weight.shape[1:]:
            found.append(Structure(sizes, 0.0))
            continue
        if sizes[0] not in channel_fits:
            channel_fits[sizes[0]] = fit_alpha(weight, sizes[:1] + weight.shape[2:])
        alpha = fit_alpha(channel_fits[sizes[0]], (sizes[0],) + sizes[1:])
        residual = _residual_of_fit(alpha, weight.shape, norm)
        if residual <= tol:
            found.append(Structure(sizes, residual))
    return found
