"""Interleaved group convolutions (IGC-V1, Zhang et al. 2017): the math, numpy only.

A dense conv weight ``W`` (``O x C x K..``, ``t = prod(K)`` taps) is a
*two-factor interleaved product* when it is computed exactly by

    x -> grouped conv (G1 groups, C/G1 -> R G2 channels each, kernel K)
      -> channel permutation (interleave)
      -> grouped 1x1 conv (G2 groups, R G1 -> O/G2 channels each)

with ``M = R G1 G2`` channels in between: each of the ``G2`` output groups
reaches each of the ``G1`` input groups through exactly ``R`` channels (IGC-V1's
complementary condition, "one path from each input to each output", is
``R = 1``).  The first conv's group ``g`` writes channel ``g R G2 + j R + r``
for output group ``j``, the second conv's group ``j`` reads it as its channel
``j R G1 + g R + r``.  Then the block of ``W`` from input group ``g`` to
output group ``j``, ``B_jg`` (``O/G2 x C t / G1``), is ``U_jg V_jg`` with
``U_jg`` (``O/G2 x R``, the second conv's weights) and ``V_jg`` (``R x C t /
G1``, the first's), so:

* ``W`` is such a product iff every block has rank at most ``R``;
* the blocks share no parameters, so the truncated SVD of each block is the
  global least-squares fit, and the relative residual is
  ``sqrt(sum of the blocks' tail singular values squared) / ||W||_F``;
* it costs ``R (G2 C t + G1 O)`` weights and multiply-adds per output
  position, against ``O C t``.

The output groups are contiguous (group ``j`` holds channels ``j O/G2 ..``)
or *strided* (channels ``j, j + G2, ..``, as IGC-V1 reorders after its second
conv); the rewrite then ends with a permutation back.  When neither order
fits, :func:`recover_orders` finds permuted input and output groups for
``R = 1`` and kernels of more than one tap: output channels share a group iff
their kernels from any one input channel are collinear.

A conv of ``G`` groups factors group by group at one layout (``groups``): the
first conv then has ``G G1`` groups, the second ``G G2``, and the blocks of
all groups are fitted and counted together.  Longer chains (a depthwise first
factor, a first factor factored again) are :mod:`sconv_onnx.chains`'; every
layout is a sequence of :class:`Stage` s, which is what the rewrite emits,
what its cost counts and what :func:`expand` multiplies back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Hypothesis:
    """A layout: ``in_groups`` (G1), ``out_groups`` (G2), ``rank`` (R), the channel orders
    (``None``: the identity), and for chains what comes before.

    ``out_order[p]`` is the output channel at position ``p`` of the last conv's
    outputs (its groups in turn); ``in_order[q]`` the input channel the first conv
    reads at its channel ``q``.  ``groups``: the original conv's (each of its
    groups factored alike).  ``depthwise``: a depthwise conv with the original
    kernel comes first and G1, G2, R factor the 1x1 rest (G1 = G2 = 1 there: one
    dense 1x1 conv, R unused); ``inner``: the layout of the first conv's groups,
    factored again (:mod:`sconv_onnx.chains`).
    """

    in_groups: int
    out_groups: int
    rank: int
    out_order: tuple[int, ...] | None = None
    in_order: tuple[int, ...] | None = None
    strided: bool = False
    groups: int = 1
    depthwise: bool = False
    inner: Hypothesis | None = None
    #: the relative residual of a weight's fit at this layout (set by :func:`search`)
    residual: float = field(default=0.0, compare=False)

    @property
    def channels_between(self) -> int:
        """``M = G R G1 G2``: the channels between the first conv and the last."""
        return self.groups * self.rank * self.in_groups * self.out_groups

    @property
    def pointwise_dense(self) -> bool:
        """A depthwise conv then one dense (per group) 1x1 conv."""
        return self.depthwise and self.in_groups * self.out_groups == 1

    def params(self, out_channels: int, in_per_group: int, taps: int) -> int:
        """Weights of the convs (no bias); ``R (G2 C t + G1 O)`` for a two-factor layout of
        one group (``C = in_per_group``)."""
        return sum(stage.weights(taps) for stage in stages(self, out_channels, in_per_group))

    def label(self) -> str:
        order = ("" if self.out_order is None and self.in_order is None
                 else " strided" if self.strided and self.in_order is None else " permuted")
        pair = ("1x1" if self.pointwise_dense
                else f"G1={self.in_groups} G2={self.out_groups} R={self.rank}")
        inner = (f" (first conv: G1={self.inner.in_groups} G2={self.inner.out_groups} "
                 f"R={self.inner.rank})" if self.inner is not None else "")
        grouped = f" per group of {self.groups}" if self.groups > 1 else ""
        return f"{'depthwise + ' if self.depthwise else ''}{pair}{inner}{order}{grouped}"

    def to_dict(self) -> dict:
        return {"in_groups": self.in_groups, "out_groups": self.out_groups, "rank": self.rank,
                "strided": self.strided, "groups": self.groups, "depthwise": self.depthwise,
                "inner": self.inner.to_dict() if self.inner is not None else None,
                "out_order": list(self.out_order) if self.out_order is not None else None,
                "in_order": list(self.in_order) if self.in_order is not None else None}


@dataclass(frozen=True)
class Stage:
    """One conv of a layout, and the permutation of its input before it.

    ``spatial``: it has the original kernel, strides, pads and dilations (the
    first conv; the others are 1x1); ``reorder``: ``"input order"`` or
    ``"interleave"`` when a ``Gather`` on axis 1 permutes its input, else None.
    """

    out_channels: int
    in_per_group: int
    groups: int
    spatial: bool
    reorder: str | None

    @property
    def in_channels(self) -> int:
        return self.in_per_group * self.groups

    def weights(self, taps: int) -> int:
        return self.out_channels * self.in_per_group * (taps if self.spatial else 1)


def stages(hyp: Hypothesis, out_channels: int, in_per_group: int) -> tuple[Stage, ...]:
    """The convs ``hyp`` runs, first to last, for a weight ``out_channels x in_per_group x K``."""
    if not hyp.depthwise:
        return _pair_stages(hyp, out_channels, in_per_group, spatial=True)
    channels = in_per_group * hyp.groups
    depthwise = Stage(channels, 1, channels, True, None)
    if hyp.pointwise_dense:
        return depthwise, Stage(out_channels, in_per_group, hyp.groups, False, None)
    return depthwise, *_pair_stages(hyp, out_channels, in_per_group, spatial=False)


def _pair_stages(hyp: Hypothesis, out_channels: int, in_per_group: int, spatial: bool
                 ) -> tuple[Stage, ...]:
    g1, g2 = hyp.in_groups, hyp.out_groups
    between = hyp.channels_between
    if hyp.inner is None:
        first: tuple[Stage, ...] = (Stage(between, in_per_group // g1, hyp.groups * g1, spatial,
                                          "input order" if hyp.in_order is not None else None),)
    else:
        first = _pair_stages(hyp.inner, between, in_per_group // g1, spatial)
    second = Stage(out_channels, hyp.rank * g1, hyp.groups * g2, False,
                   "interleave" if g1 > 1 and g2 > 1 else None)
    return (*first, second)


@dataclass(frozen=True)
class Factors:
    """The convs of a :class:`Hypothesis` (its :func:`stages`), ready to emit.

    ``convs[i]``: stage ``i``'s weight, ``out x in_per_group x K..`` for the first
    (the original kernel) and ``out x in_per_group`` for the 1x1 convs after it,
    the last one's rows in the hypothesis's output order; ``gathers[i]``: the
    ``Gather`` indices of stage ``i``'s input (the channel it reads at each of its
    channels), None when it reads them in order; ``groups[i]``: its group count.
    """

    hypothesis: Hypothesis
    convs: tuple[np.ndarray, ...]
    groups: tuple[int, ...]
    gathers: tuple[np.ndarray | None, ...]
    residual: float

    def to_dict(self) -> dict:
        """The layout (the report's details of a fitted candidate) and its residual."""
        return {**self.hypothesis.to_dict(), "residual": self.residual}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.cache
def strided_order(out_channels: int, out_groups: int, groups: int = 1) -> tuple[int, ...]:
    """Output group ``j`` holds channels ``j, j + G2, ..``: position ``j O/G2 + i`` is
    channel ``i G2 + j`` (within each of the original conv's ``groups``)."""
    per = out_channels // (groups * out_groups)
    order = np.arange(out_channels).reshape(groups, per, out_groups).transpose(0, 2, 1)
    return tuple(order.ravel().tolist())


def blocks(weight: np.ndarray, hyp: Hypothesis) -> np.ndarray:
    """``B_jg`` for every output group ``j`` (of every one of the original conv's groups in
    turn) and input group ``g``: ``G G2 x G1 x O/(G G2) x C t/G1`` (float64, ``C`` the
    input channels per group), in the hypothesis's orders."""
    w = np.asarray(weight, np.float64)
    if hyp.out_order is not None:
        w = w[list(hyp.out_order)]
    if hyp.in_order is not None:
        w = w[:, list(hyp.in_order)]
    out_ch, in_ch = w.shape[:2]
    taps = w[0, 0].size
    g1, g2 = hyp.in_groups, hyp.groups * hyp.out_groups
    w = w.reshape(g2, out_ch // g2, g1, (in_ch // g1) * taps)
    return w.transpose(0, 2, 1, 3)


def interleave(hyp: Hypothesis) -> np.ndarray | None:
    """The second conv's channel ``j R G1 + g R + r`` is the first's ``g R G2 + j R + r``
    (plus ``s M`` in the original conv's group ``s``, ``M = R G1 G2``): ``Gather``
    indices, or None when that is the identity (G1 or G2 is 1)."""
    r, g1, g2 = hyp.rank, hyp.in_groups, hyp.out_groups
    if g1 == 1 or g2 == 1:
        return None
    # axes (group, g, j, r) of the first conv's outputs, read in the order (group, j, g, r)
    order = np.arange(hyp.channels_between).reshape(hyp.groups, g1, g2, r).transpose(0, 2, 1, 3)
    return order.ravel().astype(np.int64)


def energies(stack: np.ndarray) -> np.ndarray:
    """The squared singular values of each matrix of ``stack`` (``... x a x b``), largest
    first: the eigenvalues of the Gram matrix of the shorter side (5-10x faster than an
    SVD; absolute error about ``1e-16`` of the largest, far below the ``tol^2`` of
    the tails compared with them for any tolerance above ``1e-7``)."""
    gram = (stack @ stack.swapaxes(-1, -2) if stack.shape[-2] <= stack.shape[-1]
            else stack.swapaxes(-1, -2) @ stack)
    return np.clip(np.linalg.eigvalsh(gram)[..., ::-1], 0.0, None)


def _tails(energy: np.ndarray) -> np.ndarray:
    """``tails[R]``: the energy beyond rank ``R``, summed over the blocks of ``energy``
    (their squared singular values), for ``R = 0 .. width``."""
    summed = energy.reshape(-1, energy.shape[-1]).sum(axis=0)
    return np.append(np.cumsum(summed[::-1])[::-1], 0.0)


def _least_tail_rank(energy: np.ndarray, budget: float) -> int:
    """The least rank (at least 1) whose tail energy is within ``budget``."""
    return max(1, int(np.argmax(_tails(energy) <= budget)))


def least_rank(energy: np.ndarray, total: float, tol: float, limit: int) -> tuple[int, float] | None:
    """The least rank ``R < limit`` whose blocks' tail energy leaves a relative residual
    within ``tol`` of ``sqrt(total)``, and that residual; None if there is none.
    ``energy``: the blocks' squared singular values (:func:`energies`)."""
    rank = _least_tail_rank(energy, tol * tol * total)
    if rank >= limit:
        return None
    return rank, math.sqrt(_tails(energy)[rank] / total) if total > 0 else 0.0


#: Rows and columns a screen's sub-block has beyond the rank it tests.
SCREEN_MARGIN = 4


@functools.cache
def _spread(count: int, size: int) -> np.ndarray:
    """``min(count, size)`` indices spread evenly over ``range(count)`` (read-only: cached)."""
    spread = np.unique(np.linspace(0, count - 1, min(count, size)).round().astype(np.int64))
    spread.setflags(write=False)
    return spread


def _sub_blocks(weight: np.ndarray, hyp: Hypothesis, size: int, first_only: bool = False
                ) -> np.ndarray:
    """A ``size x size`` sub-block of every block of :func:`blocks` (of ``B_00`` alone
    with ``first_only``; all of a smaller block), its rows and columns spread evenly
    over the block's (the leading ones would be a few channels' taps alone, of lower
    rank than the block), float64, without reordering the whole weight."""
    out_ch, in_ch = weight.shape[:2]
    g1, g2 = (1, 1) if first_only else (hyp.in_groups, hyp.groups * hyp.out_groups)
    per_out, per_in = out_ch // (hyp.groups * hyp.out_groups), in_ch // hyp.in_groups
    kept = _spread(per_out, size)
    positions = (np.arange(g2)[:, None] * per_out + kept).ravel()
    rows = np.asarray(hyp.out_order)[positions] if hyp.out_order is not None else positions
    w = weight[rows]
    if hyp.in_order is not None:
        w = w[:, list(hyp.in_order)]
    w = np.asarray(w[:, :per_in * g1], np.float64).reshape(g2, len(kept), g1, -1)
    w = w[..., _spread(w.shape[-1], size)]
    return w.transpose(0, 2, 1, 3)


def rank_bound(weight: np.ndarray, hyp: Hypothesis, limit: int, total: float, tol: float
               ) -> int | None:
    """A lower bound on the least rank within ``tol`` at layout ``hyp`` from sub-blocks,
    or None when it is ``limit`` or more (the layout cannot pay).

    The sub-blocks (:func:`_sub_blocks`, ``(limit - 1 + SCREEN_MARGIN)``-square) have
    singular values at most their blocks' (interlacing), so the rank their tails
    need is at most the blocks': the bound never refuses a layout the full check
    would accept.  The first block's sub-block alone refutes an unstructured weight
    at the cost of one small SVD; every block's is tried next where they are much
    smaller than the blocks (a weight of low rank can pass the first).
    """
    size = limit - 1 + SCREEN_MARGIN
    budget = tol * tol * total
    out_ch = weight.shape[0]
    block_shape = (out_ch // (hyp.groups * hyp.out_groups), weight[0].size // hyp.in_groups)
    if min(block_shape) < limit:
        return 1  # every rank up to the full one pays: no bound from a screen
    bound = _least_tail_rank(energies(_sub_blocks(weight, hyp, size, first_only=True)), budget)
    if bound >= limit:
        return None
    if 2 * size <= min(block_shape) and hyp.groups * hyp.in_groups * hyp.out_groups > 1:
        bound = max(bound, _least_tail_rank(energies(_sub_blocks(weight, hyp, size)), budget))
    return bound if bound < limit else None


def layouts(out_channels: int, in_per_group: int, groups: int = 1) -> list[Hypothesis]:
    """Every group layout (rank 0: to be found) in contiguous and strided output order,
    G1 G2 > 1 (G1 = G2 = 1 is a plain low-rank split, the ``lowrank`` family's; of a
    grouped conv too, whose groups it would leave as they are)."""
    found = []
    out_per_group = out_channels // groups
    for g1 in divisors(in_per_group):
        for g2 in divisors(out_per_group):
            if g1 * g2 == 1:
                continue
            found.append(Hypothesis(g1, g2, 0, groups=groups))
            if 1 < g2 < out_per_group:
                found.append(Hypothesis(g1, g2, 0, strided_order(out_channels, g2, groups),
                                        strided=True, groups=groups))
    return found


#: Layouts :func:`search` returns at most: those with the fewest weights.
MAX_CANDIDATES = 6


def search(weight: np.ndarray, tol: float, orders: list[Hypothesis] | None = None,
           groups: int = 1) -> list[Hypothesis]:
    """The layouts of ``orders`` (default: :func:`layouts` of a conv of ``groups``), each at
    its least rank within
    ``tol`` (and its residual there), that have fewer weights than ``W``: the
    :data:`MAX_CANDIDATES` with the fewest, fewest first.

    Every layout is screened (:func:`rank_bound`); the survivors get the full check
    (the blocks' SVDs) in the order of the weights their rank bound allows, until
    that bound reaches the weights of the last layout kept: no layout left could
    have fewer.
    """
    out_ch, in_ch = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:], dtype=np.int64))
    total = float(np.sum(np.asarray(weight, np.float64) ** 2))
    dense = out_ch * in_ch * taps
    screened = []
    for layout in orders if orders is not None else layouts(out_ch, in_ch, groups):
        per_rank = replace(layout, rank=1).params(out_ch, in_ch, taps)
        limit = -(-dense // per_rank) if per_rank else 0  # the rank at which it stops paying
        low = rank_bound(weight, layout, limit, total, tol) if limit > 1 else None
        if low is not None:
            screened.append((low * per_rank, layout, limit))
    found: list[tuple[int, Hypothesis]] = []
    for weights, layout, limit in sorted(screened, key=lambda item: item[0]):
        if len(found) >= MAX_CANDIDATES and weights >= found[-1][0]:
            break
        hit = least_rank(energies(blocks(weight, layout)), total, tol, limit)
        if hit is not None:
            hyp = replace(layout, rank=hit[0], residual=hit[1])
            found = sorted([*found, (hyp.params(out_ch, in_ch, taps), hyp)],
                           key=lambda item: item[0])[:MAX_CANDIDATES]
    return [hyp for _, hyp in found]


def factor(weight: np.ndarray, hyp: Hypothesis, metric: np.ndarray | None = None) -> Factors:
    """The least-squares factors at a two-factor ``hyp``: the truncated SVD of every block.

    ``metric`` (``G1 x C t/G1 x C t/G1``, lower triangular, one conv group only): block
    ``B_jg`` is fitted in the metric ``L_g L_g^T`` instead (the truncated SVD of
    ``B_jg L_g``, its row factor multiplied back by ``L_g^-1``; the residual is then
    measured on the weight).
    """
    if hyp.depthwise or hyp.inner is not None:
        raise ValueError(f"{hyp.label()} is a chain: factored by sconv_onnx.chains.factor")
    out_ch, in_ch = weight.shape[:2]
    kernel = weight.shape[2:]
    g1, g2, r = hyp.in_groups, hyp.out_groups, hyp.rank
    grouped = blocks(weight, hyp)
    u, s, vt = np.linalg.svd(grouped if metric is None else grouped @ metric[None],
                             full_matrices=False)
    left = u[..., :r] * s[..., None, :r]  # G G2 x G1 x O/(G G2) x R
    right = vt[..., :r, :]  # G G2 x G1 x R x C t/G1
    if metric is not None:  # V^T L^-1: solve L^T Z = V, then Z^T
        right = np.linalg.solve(metric.transpose(0, 2, 1)[None],
                                right.swapaxes(-1, -2)).swapaxes(-1, -2)
    right = right.reshape(hyp.groups, g2, g1, r, -1).transpose(0, 2, 1, 3, 4)
    first = right.reshape(hyp.channels_between, in_ch // g1, *kernel)
    second = left.transpose(0, 2, 1, 3).reshape(out_ch, g1 * r)
    factors = Factors(hyp, (first, second), (hyp.groups * g1, hyp.groups * g2), gathers(hyp),
                      0.0)
    w = np.asarray(weight, np.float64)
    total = float(np.sum(w**2))
    if metric is None:
        tail = float(np.sum(s[..., r:] ** 2))
    else:
        tail = float(np.sum((expand(factors, w.shape) - w) ** 2))
    return replace(factors, residual=math.sqrt(tail / total) if total > 0 else 0.0)


def random_product(rng: np.random.Generator, shape: tuple[int, ...], hyp: Hypothesis
                   ) -> np.ndarray:
    """A weight of ``shape`` that is exactly the layout ``hyp`` (float64): standard normal
    convs, each 1x1 conv scaled by ``1 / sqrt(its inputs per group)`` (entries of order 1)."""
    out_ch, in_ch, *kernel = shape
    convs, groups = [], []
    for stage in stages(hyp, out_ch, in_ch):
        if stage.spatial:
            convs.append(rng.standard_normal((stage.out_channels, stage.in_per_group, *kernel)))
        else:
            convs.append(rng.standard_normal((stage.out_channels, stage.in_per_group))
                         / math.sqrt(stage.in_per_group))
        groups.append(stage.groups)
    return expand(Factors(hyp, tuple(convs), tuple(groups), gathers(hyp), 0.0), tuple(shape))


def gathers(hyp: Hypothesis) -> tuple[np.ndarray | None, ...]:
    """The ``Gather`` indices before each of ``hyp``'s :func:`stages` (None: no reorder)."""
    if hyp.pointwise_dense:
        return None, None
    return ((None,) if hyp.depthwise else ()) + _pair_gathers(hyp)


def _pair_gathers(hyp: Hypothesis) -> tuple[np.ndarray | None, ...]:
    if hyp.inner is not None:
        first = _pair_gathers(hyp.inner)
    else:
        first = (np.array(hyp.in_order, np.int64) if hyp.in_order is not None else None,)
    return (*first, interleave(hyp))


def _block_diagonal(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight (``out x in_per_group x t``) as a dense one (``out x in x t``)."""
    out_ch, in_per_group, taps = weight.shape
    dense = np.zeros((groups, out_ch // groups, groups, in_per_group, taps))
    index = np.arange(groups)
    dense[index, :, index] = weight.reshape(groups, out_ch // groups, in_per_group, taps)
    return dense.reshape(out_ch, groups * in_per_group, taps)


def _reading(matrix: np.ndarray, gather: np.ndarray | None) -> np.ndarray:
    """``matrix`` (``out x in ..``) applied after the ``Gather`` ``gather`` of its input:
    column ``q`` moves to the channel it reads, ``gather[q]``."""
    if gather is None:
        return matrix
    moved = np.zeros_like(matrix)
    moved[:, gather] = matrix
    return moved


def expand(factors: Factors, shape: tuple[int, ...]) -> np.ndarray:
    """The weight (``shape``: ``O x C x K..``, ``C`` per group) the convs compute together,
    in the original channel order."""
    hyp = factors.hypothesis
    out_ch, in_ch = shape[:2]
    taps = math.prod(shape[2:])
    mix = None  # the 1x1 convs after the first, multiplied out: positions x first's outputs
    for conv, groups, gather in zip(factors.convs[1:], factors.groups[1:], factors.gathers[1:]):
        matrix = _reading(_block_diagonal(conv.reshape(*conv.shape[:2], 1), groups)[..., 0], gather)
        mix = matrix if mix is None else matrix @ mix
    first, first_groups = factors.convs[0], factors.groups[0]
    if hyp.depthwise:  # the rest is 1x1 per group: W[o, c] = rest[o, c] * depthwise[c]
        rest = mix.reshape(out_ch, hyp.groups, in_ch)[np.arange(out_ch),
                                                       np.arange(out_ch) // (out_ch // hyp.groups)]
        channel = (np.arange(out_ch) // (out_ch // hyp.groups))[:, None] * in_ch + np.arange(in_ch)
        grouped = rest[..., None] * first.reshape(-1, taps)[channel]
    else:
        dense = _reading(_block_diagonal(first.reshape(*first.shape[:2], taps), first_groups),
                         factors.gathers[0])
        dense = (mix @ dense.reshape(dense.shape[0], -1)).reshape(out_ch, -1, taps)
        own = np.arange(out_ch) // (out_ch // hyp.groups)  # each output's group
        grouped = dense.reshape(out_ch, hyp.groups, in_ch, taps)[np.arange(out_ch), own]
    weight = np.empty_like(grouped)
    weight[list(hyp.out_order) if hyp.out_order is not None else slice(None)] = grouped
    return weight.reshape(shape)


def _collinear(rows: np.ndarray, tol: float) -> np.ndarray | None:
    """``together[i, k]``: rows ``i`` and ``k`` point the same way (up to sign), within an
    angle of about ``4 tol`` (``1 - cos <= 8 tol^2``: a row off by ``tol`` of its norm
    turns by about ``tol``); None if a row is zero.  Looser, the directions of two
    groups that differ by a few thousandths of a radian merged by chance (2 taps,
    ``tol = 1e-4``: ``1 - cos = 8e-6``)."""
    norms = np.linalg.norm(rows, axis=1)
    if np.any(norms <= 1e-12 * max(float(norms.max()), 1e-300)):
        return None
    unit = rows / norms[:, None]
    return np.abs(unit @ unit.T) >= 1 - max(8 * tol * tol, 1e-12)


def _groups(together: np.ndarray | None, min_size: int = 1) -> list[list[int]] | None:
    """The classes of ``together`` in groups of one size of at least ``min_size``; None
    if they are not."""
    if together is None:
        return None
    free = np.ones(len(together), bool)
    groups: list[list[int]] = []
    for index in range(len(together)):
        if not free[index]:
            continue
        members = np.flatnonzero(together[index] & free)
        if len(members) < min_size or (groups and len(members) != len(groups[0])):
            return None
        groups.append(members.tolist())
        free[members] = False
    return groups


#: Input channels at which :func:`recover_orders` compares the outputs' kernels.
COMPARED_INPUTS = 8


def recover_orders(weight: np.ndarray, tol: float) -> Hypothesis | None:
    """Permuted input and output groups for ``R = 1`` (module doc), as a hypothesis of
    rank 1 to check with :func:`search`; None when the kernels have one tap or the
    channels do not fall into equal groups.

    With ``R = 1`` the kernel ``W[o, c]`` is ``U[o] V[c]`` within a block: for a
    fixed input ``c``, outputs of one group have collinear kernels (compared at
    :data:`COMPARED_INPUTS` inputs).  With the output
    groups known, the kernels ``W[J, c]`` from input ``c`` to output group ``J``
    form a rank-1 matrix whose left singular vector is ``U_Jg``: inputs of one
    group share it for every ``J`` (compared on all, since one small group's
    vectors of a few entries can line up by chance).
    """
    w = np.asarray(weight, np.float64)
    out_ch, in_ch = w.shape[:2]
    taps = w[0, 0].size
    if taps < 2:
        return None
    flat = w.reshape(out_ch, in_ch, taps)
    # outputs of one group are collinear at every input: compared at the strongest few
    # (at one input, a few taps' directions of two groups can line up by chance)
    strongest = np.argsort(np.linalg.norm(flat, axis=(0, 2)))[::-1][:COMPARED_INPUTS]
    together = np.ones((out_ch, out_ch), bool)
    for channel in strongest:
        same = _collinear(flat[:, channel], tol)
        if same is None:
            return None
        together &= same
    out_groups = _groups(together, min_size=2)
    if out_groups is None:
        return None
    # inputs of one group share U_Jg for every output group J: compare them on all
    together = np.ones((in_ch, in_ch), bool)
    for group in out_groups:
        lefts = np.linalg.svd(flat[group].transpose(1, 0, 2), full_matrices=False)[0][..., 0]
        same = _collinear(lefts, tol)
        if same is None:
            return None
        together &= same
    in_groups = _groups(together)
    if in_groups is None:
        return None
    if len(in_groups) * len(out_groups) == 1:
        return None
    out_order = tuple(c for group in sorted(out_groups) for c in sorted(group))
    in_order = tuple(c for group in sorted(in_groups) for c in sorted(group))
    g1, g2 = len(in_groups), len(out_groups)
    in_order = None if in_order == tuple(range(in_ch)) else in_order
    if out_order == tuple(range(out_ch)):
        return Hypothesis(g1, g2, 0, None, in_order)
    strided = out_order == strided_order(out_ch, g2)
    return Hypothesis(g1, g2, 0, out_order, in_order, strided=strided)
