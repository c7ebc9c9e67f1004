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
#: Elementwise passes per length and ``sqrt(C)`` rows of the channel screen's tables
#: (:func:`_phase_products`): the phases, their cos and sin, the rotations.
SCREEN_PASSES = 4
#: Exact channel checks :func:`search_flops` counts: a structured weight passes the
#: screen at its own size and a few more (a 1000 x 2048 weight structured at 1024: 2
#: sizes, 1024 and 1844; VGG's 4096 x 25088 at 12544: 16 sizes, all folded in one
#: pass, where 14 drop out within a few blocks, :func:`_channel_grams`).  At most
#: :data:`MAX_EXACT_CHANNEL_CHECKS` run; the
#: estimate bounds a run, it does not predict one.
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


#: :func:`box_basis` and :func:`box_pinv` keep matrices of at most this many rows (128 KiB
#: each), :data:`CACHED_MATRICES` of each: their caches hold at most 256 MiB.  Wider
#: bases are built when asked: the channel axis's fits and search use :func:`box_solve`
#: and :func:`box_sum`, which need none; a kernel axis's projector is cached itself
#: (:func:`_projector`); the data-aware fits (:mod:`sconv_onnx.datafit`) build theirs.
CACHED_SIZE = 128
CACHED_MATRICES = 1024


def box_basis(size: int, under: int) -> np.ndarray:
    """Return ``A(size, under)``: column ``j`` has ones at rows ``j .. j+size-under``."""
    if not 1 <= under <= size:
        raise ValueError(f"underlying size {under} must be in 1..{size}")
    return _cached_basis(size, under) if size <= CACHED_SIZE else _basis(size, under)


def box_pinv(size: int, under: int) -> np.ndarray:
    """Moore-Penrose pseudo-inverse of :func:`box_basis` (``under x size``).

    ``A`` has full column rank, so ``A^+ = (A^T A)^-1 A^T``; solving with the
    banded Gram matrix is about ten times faster than an SVD for wide layers.
    """
    return _cached_pinv(size, under) if size <= CACHED_SIZE else _pinv(size, under)


def _basis(size: int, under: int) -> np.ndarray:
    span = window(size, under)
    basis = np.zeros((size, under))
    for j in range(under):
        basis[j : j + span, j] = 1.0
    basis.setflags(write=False)
    return basis


def _pinv(size: int, under: int) -> np.ndarray:
    basis = box_basis(size, under)
    pinv = np.linalg.solve(basis.T @ basis, basis.T)
    pinv.setflags(write=False)
    return pinv


_cached_basis = functools.lru_cache(maxsize=CACHED_MATRICES)(_basis)
_cached_pinv = functools.lru_cache(maxsize=CACHED_MATRICES)(_pinv)


def fit_alpha(weight: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Least-squares underlying weights for ``sizes = (c, n_1, .., n_r)``.

    Returns ``alpha`` of shape ``(O, *sizes)`` in float64.
    """
    alpha = np.asarray(weight)  # converted by box_solve, a block of filters at a time
    for axis, under in enumerate(sizes, start=1):
        if under != alpha.shape[axis]:
            alpha = np.moveaxis(box_solve(np.moveaxis(alpha, axis, 1), under), 1, axis)
    return np.asarray(alpha, dtype=np.float64)


def box_solve(tensor: np.ndarray, under: int) -> np.ndarray:
    """``A(C, under)^+`` applied along axis 1 of ``tensor`` ``(O, C, ..)``, in ``O(size)``.

    The projection on ``A``'s range is ``v = w - u``, ``u`` the periodic part of
    :func:`complement_fit`; then ``v = A a`` is solved exactly: ``v_i`` sums ``a`` over
    ``i - L < j <= i`` (``L = C - under + 1``), so ``a_i - a_(i-L) = v_i - v_(i-1)``,
    and ``a`` is the running sum, every ``L`` entries, of those differences.  Equal to
    ``box_pinv(C, under) @ w`` (tests/test_structure.py checks both to 1e-10).  Rows are
    independent: they are solved :data:`BLOCK_ELEMENTS` at a time, so that the float64
    temporaries stay small beside a wide layer (8192 x 8192: 32 MiB, not 4 copies of
    512 MiB).
    """
    tensor = np.asarray(tensor)
    shape = tensor.shape
    weight3 = tensor.reshape(shape[0], shape[1], -1)
    alpha = np.empty((shape[0], under, weight3.shape[2]))
    for start, stop in _filter_ranges(weight3):
        alpha[start:stop] = _solved_rows(np.asarray(weight3[start:stop], dtype=np.float64), under)
    return alpha.reshape((shape[0], under) + shape[2:])


def _solved_rows(weight3: np.ndarray, under: int) -> np.ndarray:
    """:func:`box_solve` of ``weight3`` ``(o, C, S)`` in float64, whole; on rows of ``C S``
    entries (channel ``i`` at ``[i S, (i+1) S)``), so that numpy's loops run along the
    rows, not along an axis of length ``S`` (1 for a fully connected layer)."""
    rows, channels, spatial = weight3.shape
    period = channels - under + 1
    width, used = period * spatial, under * spatial
    blocks = -(-under // period)
    _, periodic = complement_fit(weight3, under)
    # v = w - u on the first ``under`` channels, u_i = p_(i mod L)
    fitted = np.zeros((rows, blocks * width))
    np.subtract(weight3.reshape(rows, -1)[:, :used],
                np.tile(periodic.reshape(rows, width), (1, blocks))[:, :used], out=fitted[:, :used])
    # a_i - a_(i-L) = v_i - v_(i-1), then running sums every L channels; the entries past
    # ``under`` only reach alpha past ``under``, cut off
    steps = np.empty_like(fitted)
    steps[:, :spatial] = fitted[:, :spatial]
    np.subtract(fitted[:, spatial:], fitted[:, :-spatial], out=steps[:, spatial:])
    alpha = (np.cumsum(steps.reshape(rows, blocks, width), axis=1).reshape(rows, -1)
             if blocks > 1 else steps)
    return alpha[:, :used].reshape(rows, under, spatial)


def expand(alpha: np.ndarray, full_shape: tuple[int, ...]) -> np.ndarray:
    """Structured weight ``A alpha`` of shape ``full_shape`` (float64)."""
    weight = np.asarray(alpha, dtype=np.float64)
    for axis in range(1, weight.ndim):
        full, under = full_shape[axis], weight.shape[axis]
        if under != full:
            weight = np.moveaxis(box_sum(np.moveaxis(weight, axis, 1), full), 1, axis)
    return weight


def box_sum(tensor: np.ndarray, size: int) -> np.ndarray:
    """``A(size, c)`` applied along axis 1 of ``tensor`` ``(O, c, ..)``: entry ``i`` sums
    ``tensor`` over ``i - L < j <= i`` (``L = size - c + 1``), by running sums, ``O(size)``
    per column (equal to :func:`box_basis` ``@``; as a difference of running sums, its
    rounding is relative to the running sum, not to the window's)."""
    tensor = np.asarray(tensor, dtype=np.float64)
    under = tensor.shape[1]
    period = size - under + 1
    running = np.zeros((tensor.shape[0], size + 1) + tensor.shape[2:])
    np.cumsum(tensor, axis=1, out=running[:, 1:under + 1])
    running[:, under + 1:] = running[:, under:under + 1]
    rows = np.arange(size)
    return running[:, rows + 1] - running[:, np.maximum(rows + 1 - period, 0)]


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
    return np.ldexp(weight, power_of_two_shift(weight))


#: Weight elements :func:`filter_blocks` converts to float64 at once (32 MiB): what the
#: search holds beside the weight itself.
BLOCK_ELEMENTS = 2**22


def power_of_two_shift(weight3: np.ndarray) -> int:
    """The exponent :func:`scaled` shifts by (``max|W| 2^shift`` in ``[0.5, 1)``; 0 for a
    zero weight), read a block of filters at a time; ``ValueError`` for NaN or Inf.  An
    exponent, not a factor: a subnormal float64 weight needs ``2^1029``, above the
    largest double."""
    largest = 0.0
    for start, stop in _filter_ranges(weight3):
        block = np.asarray(weight3[start:stop])
        if not is_finite(block):
            raise ValueError("weight holds NaN or Inf: it has no structure")
        largest = max(largest, float(np.max(np.abs(block), initial=0.0)))
    return 0 if largest == 0.0 else -math.frexp(largest)[1]


def _filter_ranges(weight3: np.ndarray, elements: int | None = None) -> list[tuple[int, int]]:
    """Filter ranges of at most ``elements`` elements (:data:`BLOCK_ELEMENTS` by default, read
    when called), at least one filter each."""
    per_filter = max(1, math.prod(weight3.shape[1:]))
    elements = BLOCK_ELEMENTS if elements is None else elements
    step = max(1, elements // per_filter)
    return [(start, min(start + step, weight3.shape[0]))
            for start in range(0, weight3.shape[0], step)]


def filter_blocks(weight3: np.ndarray, shift: int = 0, elements: int | None = None):
    """``(start, stop, block)``: filters ``start:stop`` of ``weight3`` ``(O, C, S)`` in
    float64 times ``2^shift`` (exact), at most ``elements`` elements at a time.  Every block
    is written into one buffer: a block is valid until the next is asked for (a fresh
    buffer per block cost a page fault per 4 KiB, as much as the conversion itself)."""
    ranges = _filter_ranges(weight3, elements)
    buffer = np.empty((ranges[0][1],) + weight3.shape[1:]) if ranges else None
    for start, stop in ranges:
        block = buffer[:stop - start]
        np.ldexp(weight3[start:stop], shift, out=block, dtype=np.float64)  # one pass
        yield start, stop, block


#: Side of the square tiles :func:`filter_major` copies by.
TILE = 256


def filter_major(weight3: np.ndarray) -> np.ndarray:
    """``weight3`` ``(O, C, S)``, or a copy with each filter contiguous when its filters are
    adjacent in memory (a MatMul's stored ``(in, out)`` weight read as ``(out, in)``).

    Reading such a weight a block of filters at a time takes one element per 4 KiB or
    more: 8.5 ns per element on the 2-core machine, against 0.9 for a contiguous block.
    The copy goes by square tiles that stay in cache (3 ns per element) and is made once
    per search; it holds the weight's size again, in its dtype."""
    filters_apart = weight3.strides[0] >= weight3.strides[1]
    if weight3.shape[2] != 1 or weight3.flags.c_contiguous or filters_apart:
        return weight3
    source, (out, channels) = weight3[:, :, 0], weight3.shape[:2]
    copy = np.empty((out, channels), dtype=weight3.dtype)
    for first in range(0, out, TILE):
        for start in range(0, channels, TILE):
            tile = (slice(first, first + TILE), slice(start, start + TILE))
            copy[tile] = source[tile]
    return copy.reshape(weight3.shape)


def relative_residual(weight: np.ndarray, sizes: tuple[int, ...]) -> float:
    """``||W - A alpha||_F / ||W||_F`` for the least-squares ``alpha`` (``ValueError``
    for a weight holding NaN or Inf)."""
    weight = scaled(weight)
    norm = float(np.linalg.norm(weight))
    if norm == 0.0:
        return 0.0
    projected = expand(fit_alpha(weight, sizes), weight.shape)
    return float(np.linalg.norm(weight - projected)) / norm


@functools.lru_cache(maxsize=32)
def _projector(size: int, under: int) -> np.ndarray:
    """Orthogonal projector ``A A^+`` onto the range of ``A(size, under)`` (a kernel axis:
    at most :data:`MAX_KERNEL_ELEMENTS` rows, so the cache holds at most 256 MiB)."""
    projector = box_basis(size, under) @ box_pinv(size, under)
    projector.setflags(write=False)
    return projector


def _spatial_projector(kernel: tuple[int, ...], under: tuple[int, ...]) -> np.ndarray:
    """``P_1 (x) .. (x) P_r`` on the flattened spatial axes (identity where ``n = K``)."""
    projector = np.ones((1, 1))
    for size, n in zip(kernel, under):
        projector = np.kron(projector, _projector(size, n) if n != size else np.eye(size))
    return projector


def folded_sums(weight3: np.ndarray, period: int, into: np.ndarray | None = None) -> np.ndarray:
    """Sums over the channel axis of ``weight3`` ``(O, C, S)`` by channel index modulo
    ``period``: ``(O, period, S)``, entry ``k`` the sum of channels ``k, k + period, ..``
    (in float64; written into ``into``, ``(O, period S)``, when given).

    One pass over the weight (``O(O C S)``), no copy of it: on the filters flattened
    to ``C S`` entries, the channels ``[b L, (b+1) L)`` are the contiguous entries
    ``[b L S, (b+1) L S)``, so the whole periods are one reshaped sum."""
    out, channels, spatial = weight3.shape
    flat = weight3.reshape(out, channels * spatial)
    width = period * spatial
    whole, left = divmod(flat.shape[1], width)
    sums = np.empty((out, width)) if into is None else into
    # a product with ones: numpy's sum over a middle axis runs 4-20 times slower when the
    # period is short (0.3 against 1.6-9.5 ns per entry for L = 17..2)
    np.matmul(np.ones(whole), flat[:, :whole * width].reshape(out, whole, width), out=sums)
    if left:
        sums[:, :left] += flat[:, whole * width:]
    return sums.reshape(out, period, spatial)


def _inverse_counts(channels: int, period: int) -> np.ndarray:
    """``1 / m_k``: ``m_k`` the number of channel indices ``i < channels`` with
    ``i = k mod period``."""
    whole, left = divmod(channels, period)
    inverse = np.full(period, 1.0 / whole)
    inverse[:left] = 1.0 / (whole + 1)
    return inverse


def complement_fit(weight3: np.ndarray, under: int) -> tuple[np.ndarray, np.ndarray]:
    """The projection of each channel column of ``weight3`` ``(O, C, S)`` on the orthogonal
    complement of the range of ``A(C, under)``, in folded form: ``(sums, periodic)``, both
    ``(O, L, S)`` with ``L = C - under + 1``.

    ``u`` is orthogonal to every column of ``A`` (a window of ``L`` ones) exactly when
    every ``L`` consecutive entries of ``u`` sum to zero, that is when ``u`` repeats with
    period ``L`` and one period sums to zero: ``u_i = p_(i mod L)``, ``sum_k p_k = 0``.
    With ``s_k`` the sum of ``w_i`` over ``i = k mod L`` (:func:`folded_sums`) and
    ``m_k`` the count of such ``i``, the projection of ``w`` minimizes
    ``sum_k m_k p_k^2 - 2 p_k s_k`` under that constraint:
    ``p_k = (s_k - lambda) / m_k``, ``lambda = sum_k (s_k / m_k) / sum_k (1 / m_k)``.
    Its energy is ``sum_k p_k s_k``.  ``O(O C S)`` in all, where a dense
    pseudo-inverse of ``A`` costs ``O(under^2 C)`` to build and ``O(under C O S)`` to
    apply (issue 16: 54 s at C = 4096).  The sums are taken in float64 whatever the
    weight's dtype.
    """
    out, channels, spatial = weight3.shape
    period = channels - under + 1
    sums = folded_sums(weight3, period)
    inverse = _inverse_counts(channels, period)
    # on (O, L S) rows, entry k S + s: long inner loops, also for S = 1
    flat = sums.reshape(out, period * spatial)
    spread = np.repeat(inverse, spatial)
    shift = (flat * spread).reshape(out, period, spatial).sum(axis=1) / inverse.sum()
    periodic = (flat - np.tile(shift, (1, period))) * spread
    return sums, periodic.reshape(out, period, spatial)


class _ComplementGram:
    """``sum_o sum_k s_ok p_ok^T`` of :func:`complement_fit` (``S x S``), summed over blocks
    of at most ``filters`` filters of a weight of ``shape`` ``(O, C, S)``, without the
    projection itself: ``sum_k m_k^-1 s_k s_k^T - t t^T / sum_k m_k^-1`` per filter,
    ``t = sum_k m_k^-1 s_k`` (exact structures cancel to rounding of the weight's energy,
    as :func:`_residual` reads them).  Into buffers made once: the folded sums and their
    weighted copy, ``(filters, L S)`` each (a fresh array per block cost a page fault per
    4 KiB, several times the arithmetic)."""

    def __init__(self, shape: tuple[int, int, int], under: int, filters: int):
        _, self.channels, self.spatial = shape
        self.period = self.channels - under + 1
        inverse = _inverse_counts(self.channels, self.period)
        self.inverse, self.inverse_sum = inverse, float(inverse.sum())
        self.spread = np.repeat(np.sqrt(inverse), self.spatial)  # entry k S + s: 1 / sqrt(m_k)
        self.sums = np.empty((filters, self.period * self.spatial))
        self.weighted = np.empty_like(self.sums)
        self.gram = np.zeros((self.spatial, self.spatial))

    def add(self, block: np.ndarray) -> None:
        """Add the filters of ``block`` (float64 ``(o, C, S)``, ``o <= filters``)."""
        out = block.shape[0]
        sums, weighted = self.sums[:out], self.weighted[:out]
        folded_sums(block, self.period, into=sums)
        totals = np.matmul(sums.reshape(out, self.period, self.spatial).transpose(0, 2, 1),
                           self.inverse)  # (o, S)
        np.multiply(sums, self.spread, out=weighted)
        flat_weighted = weighted.reshape(-1, self.spatial)
        self.gram += flat_weighted.T @ flat_weighted - totals.T @ totals / self.inverse_sum


#: Weight elements an exact channel check folds at once (2 MiB in float64): a block
#: stays in cache while every candidate's fold reads it.
CHECK_BLOCK_ELEMENTS = 2**18


def _channel_grams(weight3: np.ndarray, unders: list[int], full_gram: np.ndarray,
                   shift: int = 0, limit: float = math.inf) -> dict[int, np.ndarray]:
    """Spatial Gram matrices of the weight projected on each channel structure of
    ``unders``, in one pass over the weight; a size whose complement energy passes
    ``limit`` on the filters read so far is dropped there (not in the result).

    ``weight3`` is ``W`` as ``(O, C, S)`` with the spatial axes flattened (any float
    dtype: read in float64 a small block of filters at a time, times ``2^shift``), and
    ``full_gram`` its plain spatial Gram ``sum_(o,c) w_oc w_oc^T`` (of the shifted
    weight).  For any spatial projector ``P_S`` the joint projection has energy
    ``||(A A^+ (x) P_S) W||^2 = trace(P_S H)`` with ``H = sum_o W_o^T A A^+ W_o`` =
    the full Gram less the Gram of the projection on the complement of ``A``'s range
    (:func:`complement_fit`: ``sum_o sum_k s_ok p_ok^T``).  Each block is read once
    and folded for every size while in cache (issue 16: reuse across candidates).

    The complement energy ``trace`` of that Gram is a sum of one nonnegative term per
    filter, so its value on the filters read so far bounds the whole from below: a
    size whose squared relative residual is above ``tol^2`` (``limit = tol^2 ||W||^2``)
    is known to be after a few blocks, not a full pass (VGG's classifier shape: 14 of
    16 screened sizes).
    """
    channels = weight3.shape[1]
    filters = _filter_ranges(weight3, CHECK_BLOCK_ELEMENTS)[0][1]
    live = {under: _ComplementGram(weight3.shape, under, filters)
            for under in unders if under != channels}
    for _, _, block in filter_blocks(weight3, shift, CHECK_BLOCK_ELEMENTS) if live else ():
        for under, complement in list(live.items()):
            complement.add(block)
            if np.trace(complement.gram) > limit:
                del live[under]
        if not live:
            break
    return {under: full_gram - live[under].gram if under in live else full_gram
            for under in unders if under in live or under == channels}


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


def _sketch(weight: np.ndarray, seed: int, shift: int = 0) -> tuple[np.ndarray, bool]:
    """The channel-major matrix ``(C, rest)`` of ``weight``, right-multiplied by a
    Gaussian ``(rest, SKETCH_COLUMNS)`` sketch when wider than that."""
    weight3 = np.reshape(weight, (weight.shape[0], weight.shape[1], -1))
    sketcher = _Sketcher(weight3.shape, seed)
    if sketcher.gauss is None:
        return np.moveaxis(np.ldexp(weight3, shift, dtype=np.float64), 1, 0).reshape(
            weight3.shape[1], -1), False
    for start, stop, block in filter_blocks(weight3, shift):
        sketcher.add(block, start, stop)
    return sketcher.result(), True


class _Sketcher:
    """:func:`_sketch` a block of filters at a time: the columns ``(o, s)`` in the order
    of the channel-major matrix, one Gaussian row each; no float64 copy of the weight."""

    def __init__(self, shape: tuple[int, int, int], seed: int):
        out, channels, spatial = shape
        self.gauss = (None if out * spatial <= SKETCH_COLUMNS else
                      np.random.default_rng(seed).standard_normal((out, spatial, SKETCH_COLUMNS)))
        self.sketch = np.zeros((channels, SKETCH_COLUMNS))

    def add(self, block: np.ndarray, start: int, stop: int) -> None:
        """Add filters ``start:stop`` (``block``, float64 ``(o, C, S)``)."""
        for position in range(block.shape[2]):  # BLAS on a transposed view, no copy at S = 1
            self.sketch += block[:, :, position].T @ self.gauss[start:stop, position]

    def result(self) -> np.ndarray:
        return self.sketch / math.sqrt(SKETCH_COLUMNS)


def channel_lower_bounds(weight: np.ndarray, seed: int = 0,
                         shift: int = 0) -> tuple[np.ndarray, bool]:
    """Cheap lower bounds on the channel-axis residual for every ``c``.

    ``v`` (length ``C``) lies in the range of ``A(C, c)`` exactly when its
    transform ``V(w) = sum_i v_i exp(-2 pi i w i)`` vanishes at ``w = j/L``,
    ``j = 1 .. L-1``, where ``L = C - c + 1`` is the window: the first
    difference of ``v``, folded modulo ``L``, must vanish, and its transform
    is ``V(w) (1 - exp(-2 pi i w))``.  So the real vectors
    ``cos(2 pi i / L)`` and ``sin(2 pi i / L)`` are orthogonal to the range,
    and the energy of ``v`` in their span bounds the squared projection
    residual from below.  Matrix products give it for every ``L``
    (:func:`_phase_products`).

    Large weights are sketched to :data:`SKETCH_COLUMNS` random columns first
    (:func:`_sketch`: the channel structure survives right-multiplication); the
    bound is then an estimate, flagged by the second return value.  The weight is
    read times ``2^shift`` (:func:`power_of_two_shift`: a weight of 1e300 would
    overflow its squares).

    Returns ``(bounds, sketched)`` with ``bounds[c - 1]`` for ``c = 1..C``.
    """
    matrix, sketched = _sketch(weight, seed, shift)
    return _screen_bounds(matrix), sketched


#: Entries of the partial sums :func:`_phase_products` holds at once (32 MiB).
PHASE_ENTRIES = 2**22


def _phase_products(theta: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos(theta_l i) @ matrix`` and ``sin(theta_l i) @ matrix`` (``i`` over the rows of
    ``matrix``), ``(len(theta), columns)`` each, in float64.

    The rows are cut into blocks of ``B = ceil(sqrt(rows))``, row ``i = b B + r``:
    ``sum_i e^(j theta i) m_i = sum_b e^(j theta b B) sum_(r < B) e^(j theta r) m_(b B + r)``.
    The inner sums, for every block at once, are one matrix product of a ``(lengths, B)``
    trigonometric table with the rows regrouped as ``(B, blocks columns)``; the outer
    sums rotate them, ``(lengths, blocks)`` factors.  So the trigonometry is ``O(lengths
    sqrt(rows))``, the products ``O(lengths rows columns)`` flops in large BLAS calls,
    and no ``lengths x rows`` phase matrix is formed (268 MB at C = 8192, 2.5 GB at
    C = 25088); lengths are taken in groups so that the partial sums stay within
    :data:`PHASE_ENTRIES`."""
    channels, columns = matrix.shape
    step = max(1, math.isqrt(channels - 1) + 1)
    blocks = -(-channels // step)
    padded = np.zeros((blocks * step, columns))
    padded[:channels] = matrix
    # row r: entries r of every block, (B, blocks * columns)
    regrouped = padded.reshape(blocks, step, columns).transpose(1, 0, 2).reshape(step, -1)
    starts = np.arange(blocks) * float(step)
    real = np.empty((len(theta), columns))
    imag = np.empty_like(real)
    group = max(1, PHASE_ENTRIES // (2 * blocks * columns))
    for first in range(0, len(theta), group):
        angles = theta[first:first + group]
        local = np.outer(angles, np.arange(step))
        inner = (np.concatenate([np.cos(local), np.sin(local)]) @ regrouped).reshape(
            2, len(angles), blocks, columns)
        turn = np.outer(angles, starts)
        turn_cos, turn_sin = np.cos(turn)[:, None, :], np.sin(turn)[:, None, :]
        inner_cos, inner_sin = inner[0], inner[1]  # (lengths, blocks, columns)
        real[first:first + group] = (np.matmul(turn_cos, inner_cos)
                                     - np.matmul(turn_sin, inner_sin))[:, 0]
        imag[first:first + group] = (np.matmul(turn_sin, inner_cos)
                                     + np.matmul(turn_cos, inner_sin))[:, 0]
    return real, imag


def _screen_bounds(matrix: np.ndarray) -> np.ndarray:
    """:func:`channel_lower_bounds` of the channel-major ``matrix`` ``(C, columns)``."""
    channels = matrix.shape[0]
    norm_sq = float(np.sum(matrix * matrix))
    bounds = np.zeros(channels)
    if norm_sq == 0.0 or channels < 2:
        return bounds
    lengths = np.arange(2, channels + 1)  # every window L = C - c + 1 > 1
    theta = 2 * np.pi / lengths
    a, b = _phase_products(theta, matrix)  # (lengths, columns)
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
    bounds[channels - lengths] = np.sqrt(np.clip(energy / norm_sq, 0.0, 1.0))  # c - 1 = C - L
    return bounds


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


def _feasible_channels(weight3: np.ndarray, shift: int, tol: float) -> dict[int, np.ndarray]:
    """The smallest channel sizes ``c`` within ``tol`` on the channel axis alone, with their
    spatial Gram matrices (:func:`_channel_grams`); ``C`` itself always included, with the
    plain Gram.  ``weight3`` ``(O, C, S)`` is read a block of filters at a time, times
    ``2^shift``: one pass for the Gram and the sketch, one for the exact checks of the
    (at most :data:`MAX_EXACT_CHANNEL_CHECKS`) sizes the screen lets through, where a
    size above ``tol`` drops out as soon as the filters read show it."""
    channels, spatial = weight3.shape[1], weight3.shape[2]
    full_gram = np.zeros((spatial, spatial))
    sketcher = _Sketcher(weight3.shape, 0) if channels > 1 else None
    sketched = sketcher is not None and sketcher.gauss is not None
    for start, stop, block in filter_blocks(weight3, shift):
        flat = block.reshape(-1, spatial)  # one pass over the weight for both
        full_gram += flat.T @ flat
        if sketched:
            sketcher.add(block, start, stop)
    grams = {channels: full_gram}
    if channels == 1:
        return grams
    norm_sq = float(np.trace(full_gram))
    matrix = sketcher.result() if sketched else _sketch(weight3, 0, shift)[0]
    slack = SKETCH_SLACK if sketched else 1.0
    screened = [int(under) for under in np.flatnonzero(_screen_bounds(matrix)[:-1] <= tol * slack) + 1]
    identity = np.eye(spatial)
    # a size above tol is dropped as soon as its energy off the structure shows it; the
    # margin, far above the rounding of the blocks' sums (about 1e-14 of the energy), keeps
    # a size at tol for the exact test below
    limit = tol * tol * norm_sq * (1 + 1e-9) + 1e-12 * norm_sq
    checked = _channel_grams(weight3, screened[:MAX_EXACT_CHANNEL_CHECKS], full_gram, shift, limit)
    for under, gram in checked.items():  # the smallest two within tol
        if _residual(gram, identity, norm_sq) <= tol:
            grams[under] = gram
            if len(grams) > 2:
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
    * the channel screen (``C > 1``): the sketch ``2 C R 8`` (when ``R > 8``), the
      phase products (two products with at most 8 columns per entry of the
      ``(C-1) x C`` phases) and :data:`SCREEN_PASSES` elementwise passes per length
      and ``sqrt(C)`` rows (:func:`_phase_products`' tables);
    * :data:`EXPECTED_CHANNEL_CHECKS` exact checks at ``c = C/2``: the folded sums, one
      elementwise pass over the weight, and the Gram of the complement ``2 L O S^2``
      (``L = C - c + 1``; :func:`complement_fit`);
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
        flops += (channels - 1) * (channels * 4 * columns  # the blocked phase products
                                   + SCREEN_PASSES * ELEMENTWISE_FLOPS * math.sqrt(channels))
        period = channels - max(1, channels // 2) + 1
        flops += min(EXPECTED_CHANNEL_CHECKS, channels - 1) * (
            ELEMENTWISE_FLOPS * channels * rows + 2 * period * out * spatial**2)
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
    of :func:`channel_lower_bounds` (on a sketch), then exactly, every
    survivor in one pass (:func:`_channel_grams`).  Joint residuals come from
    one small spatial Gram matrix per surviving channel size: no combination
    touches the full weight again.  The weight is read a block of filters at a time
    (:func:`filter_blocks`), in place unless its filters are adjacent in memory
    (:func:`filter_major`: one copy in its dtype).
    The subspaces for different ``n`` are not nested; every size is tried.

    ``ValueError`` for a weight holding NaN or Inf (:func:`power_of_two_shift`) or one
    :func:`search_problem` refuses.
    """
    problem = search_problem(np.shape(weight))
    if problem:
        raise ValueError(problem)
    weight = np.asarray(weight)
    kernel = tuple(weight.shape[2:])
    weight3 = filter_major(weight.reshape(weight.shape[0], weight.shape[1], -1))
    grams = _feasible_channels(weight3, power_of_two_shift(weight3), tol)
    full_gram = grams[weight.shape[1]]
    norm_sq = float(np.trace(full_gram))
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
