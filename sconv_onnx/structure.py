"""Structured-kernel math: box bases, separable least squares, structure search.

Pure numpy, no ONNX. Conventions (Bhalgat et al., NeurIPS 2020, and
docs/DESIGN.md section 1):

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
  from the structure (0 for an all-zero weight).  It does not change when
  ``W`` is scaled, so the search works on ``W`` scaled by a power of two to
  ``max|W|`` in ``[0.5, 1)`` (exact; no square overflows).  A weight holding
  NaN or Inf has no residual: :func:`search` and :func:`relative_residual`
  raise ``ValueError`` for it.
* The search's work grows with ``prod(K)^3`` and ``C^2`` (:func:`search_flops`);
  :func:`search_problem` says when a weight's shape is beyond
  :data:`MAX_KERNEL_ELEMENTS` or :data:`MAX_SEARCH_FLOPS`, and :func:`search`
  refuses such a weight.
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
SKETCH_COLUMNS = 8
#: From this many channels the screen's trigonometry runs in float32 and its
#: bounds are lowered by ``WIDE_MARGIN`` to cover the rounding.
WIDE_CHANNELS = 512
WIDE_MARGIN = 1e-5
#: A sketched lower bound may overshoot by random chance (with 8 columns the
#: squared bound exceeds 4x its expectation with probability about 1e-4);
#: screen with slack.
SKETCH_SLACK = 2.0
#: Largest kernel, in elements ``prod(K)``, the search takes: it holds ``prod(K)^2``
#: spatial Gram matrices and projectors (8 MiB each at 1024).  Kernels in use are far
#: smaller (7x7x7 = 343, 11x11 = 121); a 128x128 kernel (16384) would need 2 GiB per
#: projector and ran for minutes.
MAX_KERNEL_ELEMENTS = 1024
#: :func:`search_flops` counts flops of large matrix products; the other steps are
#: weighted by how much slower they ran on the 2-core test machine.  An elementwise
#: numpy pass (the projectors' Kronecker products, the screen's trigonometry) costs
#: about 1.4 ns per element, 50 product flops (which ran at about 3.5e10 per second).
ELEMENTWISE_FLOPS = 50
#: The per-axis pseudo-inverses are small dense solves: about 1e10 flops per second,
#: 3 times slower than large products (every ``n`` of a 1-D kernel of 400: 4e10 flops
#: in 3.1 s).
SOLVE_FLOPS = 3
#: Elementwise passes per entry of the channel screen's ``(C-1) x C`` phase matrix:
#: the product, the float32 cast, cos and sin.
SCREEN_PASSES = 4
#: Exact channel checks :func:`search_flops` counts: a structured weight passes the
#: screen at its own size and a few more (a 1000 x 2048 weight structured at 1024: 2
#: checks, at 1024 and 1844); twice that for margin.  At most
#: :data:`MAX_EXACT_CHANNEL_CHECKS` run.
EXPECTED_CHANNEL_CHECKS = 4
#: Largest :func:`search_flops` the search takes.  On the 2-core test machine (busy),
#: the slowest searches ran at 2.5e10 to 4e10 estimated flops per second (1-D kernels
#: of 250-400 taps, a 24x24 kernel where every size fits): 2.5-4 s at this cap; most
#: ran faster (a random 1000 x 2048 fully connected layer: 7e10 in 0.1-0.2 s, 1.4-3 s
#: when structured).  Below it: a 512x512x3x3 conv (1e10, 0.1 s), a 7x7x7 3-D conv at 64
#: channels (2e10, 0.5 s when every size fits), 11x11 kernels (9e8).  Above it: fully
#: connected layers with 4096 inputs (4.5e11; the screen alone holds a 134 MB matrix),
#: 1-D kernels of 400 taps (1.4e11, 3.4 s), 32x32 kernels (1.7e11, 0.9-2.7 s).
MAX_SEARCH_FLOPS = 1e11


def window(size: int, under: int) -> int:
    """``size - under + 1``: the entries each column of ``A(size, under)`` sums, i.e. the
    sum-pool's window along an axis of length ``size`` structured at ``under``."""
    return size - under + 1


def windows(full: tuple[int, ...], under: tuple[int, ...]) -> tuple[int, ...]:
    """:func:`window` per axis (e.g. a kernel ``K`` and its underlying sizes ``n``)."""
    return tuple(window(size, n) for size, n in zip(full, under))


@functools.lru_cache(maxsize=4096)
def box_basis(size: int, under: int) -> np.ndarray:
    """Return ``A(size, under)``: column ``j`` has ones at rows ``j .. j+size-under``."""
    if not 1 <= under <= size:
        raise ValueError(f"underlying size {under} must be in 1..{size}")
    span = window(size, under)
    basis = np.zeros((size, under))
    for j in range(under):
        basis[j : j + span, j] = 1.0
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=4096)
def box_pinv(size: int, under: int) -> np.ndarray:
    """Moore-Penrose pseudo-inverse of :func:`box_basis` (``under x size``).

    ``A`` has full column rank, so ``A^+ = (A^T A)^-1 A^T``; solving with the
    banded Gram matrix is about ten times faster than an SVD for wide layers.
    """
    basis = box_basis(size, under)
    pinv = np.linalg.solve(basis.T @ basis, basis.T)
    pinv.setflags(write=False)
    return pinv


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


def is_finite(array: np.ndarray) -> bool:
    """Whether every entry of ``array`` is finite: any numeric dtype, ml_dtypes' bfloat16
    and float8 included (numpy's kind ``V``); arrays that are not numbers (text,
    records) count as finite."""
    array = np.asarray(array)
    if array.dtype.kind in "iub":
        return True
    if array.dtype.kind not in "fc":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):  # not a number type
            return True
    return bool(np.isfinite(array).all())


def scaled(weight: np.ndarray) -> np.ndarray:
    """``weight`` in float64, scaled by a power of two so that ``max|W|`` lies in
    ``[0.5, 1)`` (exact; an all-zero weight stays zero).

    Residuals are scale-free, and the scaled weight's squares neither overflow
    (a float64 weight of 1e200) nor underflow.  ``ValueError`` if the weight
    holds NaN or Inf: no structure fits it, and its residuals would be NaN.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if not is_finite(weight):
        raise ValueError("weight holds NaN or Inf: it has no structure")
    largest = float(np.max(np.abs(weight), initial=0.0))
    if largest == 0.0:
        return weight
    return np.ldexp(weight, -math.frexp(largest)[1])


def relative_residual(weight: np.ndarray, sizes: tuple[int, ...]) -> float:
    """``||W - A alpha||_F / ||W||_F`` for the least-squares ``alpha`` (``ValueError``
    for a weight holding NaN or Inf)."""
    weight = scaled(weight)
    norm = float(np.linalg.norm(weight))
    if norm == 0.0:
        return 0.0
    projected = expand(fit_alpha(weight, sizes), weight.shape)
    return float(np.linalg.norm(weight - projected)) / norm


def _projector(size: int, under: int) -> np.ndarray:
    """Orthogonal projector ``A A^+`` onto the range of ``A(size, under)``."""
    return box_basis(size, under) @ box_pinv(size, under)


def _spatial_projector(kernel: tuple[int, ...], under: tuple[int, ...]) -> np.ndarray:
    """``P_1 (x) .. (x) P_r`` on the flattened spatial axes (identity where ``n = K``)."""
    projector = np.ones((1, 1))
    for size, n in zip(kernel, under):
        projector = np.kron(projector, _projector(size, n) if n != size else np.eye(size))
    return projector


def _channel_gram(weight3: np.ndarray, under: int) -> np.ndarray:
    """Spatial Gram matrix of the weight projected on the channel structure ``under``.

    ``weight3`` is ``W`` as ``(O, C, S)`` with the spatial axes flattened.
    With ``Y_o = A^+ W_o`` and ``U_o = A^T W_o`` (``c x S`` per filter ``o``),
    ``H = sum_o Y_o^T U_o`` (``S x S``), and for any spatial projector
    ``P_S`` the joint projection has energy
    ``||(A A^+ (x) P_S) W||^2 = trace(P_S H)``.  For ``under == C``, ``H`` is
    the plain Gram ``sum_(o,c) w_oc w_oc^T``.
    """
    channels, spatial = weight3.shape[1], weight3.shape[2]
    if under == channels:
        flat = weight3.reshape(-1, spatial)
        return flat.T @ flat
    # channels first, filters and space as columns: one matrix product each (a product
    # per filter ran 10x slower on a 4096 x 4096 weight)
    columns = np.moveaxis(weight3, 1, 0).reshape(channels, -1)
    fitted = box_pinv(channels, under) @ columns
    summed = box_basis(channels, under).T @ columns
    return fitted.reshape(-1, spatial).T @ summed.reshape(-1, spatial)


def _residual(gram: np.ndarray, projector: np.ndarray, norm_sq: float) -> float:
    """Relative residual ``sqrt(1 - trace(P H) / ||W||^2)``.

    The difference loses digits below about ``1e-7`` relative residual, far
    below any useful tolerance.
    """
    if norm_sq == 0.0:
        return 0.0
    left = 1.0 - float(np.sum(projector * gram.T)) / norm_sq
    if not math.isfinite(left):  # never a NaN read as a fit
        return math.inf
    return math.sqrt(max(0.0, left))


def _sketch(weight: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
    """The channel-major matrix ``(C, rest)`` of ``weight``, right-multiplied by a
    Gaussian ``(rest, SKETCH_COLUMNS)`` sketch when wider than that."""
    channels = weight.shape[1]
    matrix = np.moveaxis(np.asarray(weight, dtype=np.float64), 1, 0).reshape(channels, -1)
    if matrix.shape[1] <= SKETCH_COLUMNS:
        return matrix, False
    gauss = np.random.default_rng(seed).standard_normal((matrix.shape[1], SKETCH_COLUMNS))
    return matrix @ gauss / math.sqrt(SKETCH_COLUMNS), True


def channel_lower_bounds(weight: np.ndarray, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Cheap lower bounds on the channel-axis residual for every ``c``.

    ``v`` (length ``C``) lies in the range of ``A(C, c)`` exactly when its
    transform ``V(w) = sum_i v_i exp(-2 pi i w i)`` vanishes at ``w = j/L``,
    ``j = 1 .. L-1``, where ``L = C - c + 1`` is the window: the first
    difference of ``v``, folded modulo ``L``, must vanish, and its transform
    is ``V(w) (1 - exp(-2 pi i w))``.  So the real vectors
    ``cos(2 pi i / L)`` and ``sin(2 pi i / L)`` are orthogonal to the range,
    and the energy of ``v`` in their span bounds the squared projection
    residual from below.  One matrix product gives it for every ``L``.

    Large weights are sketched to :data:`SKETCH_COLUMNS` random columns first
    (the channel structure survives right-multiplication); the bound is then
    an estimate, flagged by the second return value.

    Returns ``(bounds, sketched)`` with ``bounds[c - 1]`` for ``c = 1..C``.
    """
    channels = weight.shape[1]
    matrix, sketched = _sketch(weight, seed)
    norm_sq = float(np.sum(matrix * matrix))
    bounds = np.zeros(channels)
    if norm_sq == 0.0 or channels < 2:
        return bounds, sketched
    lengths = np.arange(2, channels + 1)  # every window L = C - c + 1 > 1
    theta = 2 * np.pi / lengths
    # wide layers: float32 trigonometry (4x faster), its rounding covered by a margin
    wide = channels >= WIDE_CHANNELS
    phase = theta[:, None] * np.arange(channels)[None, :]
    if wide:
        phase = phase.astype(np.float32)
    a, b = np.cos(phase) @ matrix, np.sin(phase) @ matrix  # (lengths, columns)
    # sum_i cos^2, sin^2, cos*sin over i < C in closed form: half-sums of exp(2 i theta i)
    ratio = np.exp(2j * theta)
    geometric = np.where(
        np.isclose(ratio, 1.0), channels, (1 - ratio**channels) / np.where(ratio == 1, 2, 1 - ratio)
    )
    cc = channels / 2 + geometric.real / 2
    ss = channels / 2 - geometric.real / 2
    cs = geometric.imag / 2
    det = cc * ss - cs * cs
    # sin(pi i) (L = 2) is rounding noise, not a direction: use cos alone there
    plane = (ss > 1e-12 * cc) & (det > 1e-9 * cc * ss)
    safe = np.where(plane, det, 1.0)
    energy_plane = np.sum(ss[:, None] * a * a - 2 * cs[:, None] * a * b + cc[:, None] * b * b, 1) / safe
    energy_line = np.sum(a * a, 1) / cc  # sin vanishes (L = 2) or is parallel to cos
    energy = np.where(plane, energy_plane, energy_line)
    bound = np.sqrt(np.clip(energy / norm_sq, 0.0, 1.0))
    if wide:
        bound = np.maximum(bound - WIDE_MARGIN, 0.0)
    bounds[channels - lengths] = bound  # c - 1 = C - L
    return bounds, sketched


#: The smallest tolerance that makes sense for weights stored in a dtype:
#: twice its unit roundoff, since rounding alone moves a structured weight
#: about ``u / sqrt(3)`` (relative, Frobenius) off its structure.
DTYPE_TOL_FLOOR = {"float16": 2 * 2.0**-11, "bfloat16": 2 * 2.0**-8}


def is_float_dtype(dtype) -> bool:
    """numpy floats, and the low-precision floats numpy lacks (ml_dtypes' bfloat16)."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name in DTYPE_TOL_FLOOR


def narrowest_dtype(*dtypes) -> str:
    """Name of the least precise of ``dtypes`` (a weight's dtype, and those it was
    stored in before a ``Cast``); the first one when none is low precision."""
    names = [np.dtype(dtype).name for dtype in dtypes]
    return max(names, key=lambda name: DTYPE_TOL_FLOOR.get(name, 0.0))


def effective_tol(tol: float, *dtypes) -> float:
    """``tol``, raised to :data:`DTYPE_TOL_FLOOR` of the narrowest of ``dtypes``."""
    return max(tol, DTYPE_TOL_FLOOR.get(narrowest_dtype(*dtypes), 0.0))


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
        """Human notation, e.g. ``c=16 n=2x2`` (``c=16`` for a fully connected layer)."""
        if not self.kernel:
            return f"c={self.channels}"
        return f"c={self.channels} n={'x'.join(map(str, self.kernel))}"


def _feasible_channels(
    weight: np.ndarray, weight3: np.ndarray, tol: float, norm_sq: float
) -> dict[int, np.ndarray]:
    """The smallest channel sizes ``c`` within ``tol`` on the channel axis alone, with their
    spatial Gram matrices (:func:`_channel_gram`); ``C`` itself always included."""
    channels, spatial = weight3.shape[1], weight3.shape[2]
    grams = {channels: _channel_gram(weight3, channels)}
    if channels == 1:
        return grams
    bounds, sketched = channel_lower_bounds(weight)
    slack = SKETCH_SLACK if sketched else 1.0
    identity = np.eye(spatial)
    found = 0
    candidates = np.flatnonzero(bounds[:-1] <= tol * slack) + 1
    for checks, under in enumerate(candidates, start=1):
        gram = _channel_gram(weight3, int(under))
        if _residual(gram, identity, norm_sq) <= tol:
            grams[int(under)] = gram
            found += 1
        if found >= 2 or checks >= MAX_EXACT_CHANNEL_CHECKS:
            break
    return grams


def _solve_flops(size: int, under: int) -> float:
    """Flops of :func:`box_pinv`: the ``under x under`` Gram, its solve for ``size`` columns."""
    return 4.0 * under * under * size + under**3


def search_flops(shape: tuple[int, ...]) -> float:
    """An estimate of the flops :func:`search` does on a weight of ``shape`` ``(O, C, K..)``.

    With ``S = prod(K)`` and ``R = O S`` (filters and kernel positions), the steps are
    (elementwise passes count :data:`ELEMENTWISE_FLOPS` per element):

    * the spatial Gram of the whole weight, ``2 O C S^2``;
    * the channel screen (``C > 1``): the sketch ``2 C R 8`` (when ``R > 8``) and the
      ``(C-1) x C`` phase matrix, :data:`SCREEN_PASSES` elementwise passes and two
      products with at most 8 columns per entry;
    * :data:`EXPECTED_CHANNEL_CHECKS` exact checks at ``c = C/2``: the pseudo-inverse,
      two products ``2 c C R`` and the Gram ``2 c O S^2``;
    * per kernel axis of length ``K``: the pseudo-inverse of every ``n < K`` (small
      solves, :data:`SOLVE_FLOPS` per flop) and a projector per ``n``, three ``S x S``
      passes (the Kronecker product, the product with the Gram and its sum);
    * the joint combinations, three ``S x S`` passes each, in the worst case every
      ``n`` on every axis times up to 3 channel sizes (a weight that fits every size,
      e.g. at a loose tolerance).
    """
    out, channels, kernel = shape[0], shape[1], tuple(shape[2:])
    spatial = math.prod(kernel)
    rows = out * spatial
    square = 3 * ELEMENTWISE_FLOPS * spatial * spatial  # one projector's passes
    flops = 2.0 * out * channels * spatial * spatial
    if channels > 1:
        columns = min(rows, SKETCH_COLUMNS)
        flops += 2 * channels * rows * SKETCH_COLUMNS if rows > SKETCH_COLUMNS else 0
        flops += (channels - 1) * channels * (SCREEN_PASSES * ELEMENTWISE_FLOPS + 4 * columns)
        half = max(1, channels // 2)
        flops += min(EXPECTED_CHANNEL_CHECKS, channels - 1) * (
            _solve_flops(channels, half) + 4 * half * channels * rows + 2 * half * out * spatial**2)
    for size in kernel:
        solves = sum(_solve_flops(size, under) for under in range(1, size))
        flops += SOLVE_FLOPS * solves + size * square
    return flops + min(channels, 3) * spatial * square


def search_problem(shape: tuple[int, ...]) -> str | None:
    """Why :func:`search` refuses a weight of ``shape`` ``(O, C, K..)`` (one line), or None:
    no elements, a kernel above :data:`MAX_KERNEL_ELEMENTS`, or an estimated work
    (:func:`search_flops`) above :data:`MAX_SEARCH_FLOPS`."""
    kernel = tuple(shape[2:])
    if math.prod(shape) == 0:
        return f"weight of shape {'x'.join(map(str, shape))} has no elements"
    if math.prod(kernel) > MAX_KERNEL_ELEMENTS:
        return (f"kernel too large: {'x'.join(map(str, kernel))} = {math.prod(kernel)} elements, "
                f"the search takes at most {MAX_KERNEL_ELEMENTS}")
    flops = search_flops(shape)
    if flops > MAX_SEARCH_FLOPS:
        return (f"search too large: about {flops:.1e} flops for a weight of "
                f"{'x'.join(map(str, shape))}, the cap is {MAX_SEARCH_FLOPS:.0e}")
    return None


def search(weight: np.ndarray, tol: float) -> list[Structure]:
    """Every structure of ``weight`` within ``tol``, fewest degrees of freedom first.

    The trivial structure (all axes full) is always last-but-feasible, so the
    list is never empty.  The single-axis residual is a lower bound of the
    joint one (the joint subspace lies inside each single-axis subspace), so
    each axis is screened alone first; the channel axis by the cheap bounds
    of :func:`channel_lower_bounds`, then exactly.  Joint residuals come from
    one small spatial Gram matrix per surviving channel size
    (:func:`_channel_gram`): no combination touches the full weight again.
    The subspaces for different ``n`` are not nested; every size is tried.

    ``ValueError`` for a weight holding NaN or Inf (:func:`scaled`) or one
    :func:`search_problem` refuses.
    """
    problem = search_problem(np.shape(weight))
    if problem:
        raise ValueError(problem)
    weight = scaled(weight)
    kernel = tuple(weight.shape[2:])
    weight3 = weight.reshape(weight.shape[0], weight.shape[1], -1)
    norm_sq = float(np.sum(weight3 * weight3))
    grams = _feasible_channels(weight, weight3, tol, norm_sq)
    full_gram = grams[weight.shape[1]]
    per_axis: list[list[int]] = [sorted(grams)]
    for axis, size in enumerate(kernel):
        feasible = []
        for under in range(1, size + 1):
            single = tuple(under if i == axis else k for i, k in enumerate(kernel))
            if under == size or _residual(full_gram, _spatial_projector(kernel, single), norm_sq) <= tol:
                feasible.append(under)
        per_axis.append(feasible)
    found: list[Structure] = []
    for sizes in sorted(itertools.product(*per_axis), key=lambda s: (math.prod(s), s)):
        if sizes == weight.shape[1:]:
            found.append(Structure(sizes, 0.0))
            continue
        residual = _residual(grams[sizes[0]], _spatial_projector(kernel, sizes[1:]), norm_sq)
        if residual <= tol and not by_chance(residual, weight.shape, sizes):
            found.append(Structure(sizes, residual))
    return found


#: A structure is not claimed when a random weight would come as close this often.
CHANCE = 1e-6


def by_chance(residual: float, shape: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """Whether a random weight of ``shape`` would lie within ``residual`` of the structure
    ``sizes`` more often than :data:`CHANCE`.

    The structure leaves ``k = O (prod(shape[1:]) - prod(sizes))`` of the ``N`` weight
    dimensions out; a random weight's relative distance ``r`` from it has ``r^2 ~
    Beta(k/2, (N-k)/2)``, so ``P(r <= rho)`` is about ``(rho sqrt(N/k))^k`` for small
    ``rho``.  With few constraints that is not small: a 756-feature MatMul to one output at
    ``c = 755`` (``k = 1``) is within ``1e-4`` of its structure by chance once in about
    400 random weights, and the fuzz tests found such a weight, whose rewrite then
    failed verification (the output is one dot product, far smaller than the weight's
    norm times the input's).  Three or more constraints make a chance fit at any
    useful tolerance negligible.
    """
    return chance_fit(residual, math.prod(shape), shape[0] * (math.prod(shape[1:]) - math.prod(sizes)))


def chance_fit(residual: float, dimensions: int, left_out: int) -> bool:
    """Whether a random point of ``dimensions`` dimensions lies within relative distance
    ``residual`` of a set that leaves ``left_out`` of them out more often than
    :data:`CHANCE` (:func:`by_chance`)."""
    if left_out <= 0 or residual <= 0:
        return False
    log_chance = left_out * (math.log(residual) + 0.5 * math.log(dimensions / left_out))
    return log_chance > math.log(CHANCE)
