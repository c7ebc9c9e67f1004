"""Chains of group convs with a depthwise first factor (IGC-V2, Xie et al. 2018; IGCV3,
Sun et al. 2018): the math, numpy only.

A dense conv weight ``W`` (``O x C x K..`` per group, ``t`` taps, ``G`` groups) is
a chain when it is computed exactly by

    x -> depthwise conv (the original kernel, one filter per input channel)
      -> 1x1 group convs with channel permutations between them

Then ``W[o, c, :] = P[o, c] D[c, :]`` with ``D`` the depthwise filters and
``P`` (``O x C``) the 1x1 convs multiplied out:

* for each input channel ``c`` the matrix ``W[:, c, :]`` (the outputs of its
  group by the taps) has rank 1, and its truncated SVD gives ``D[c]`` (a unit
  vector) and ``P[:, c]`` in one step.  What it leaves is orthogonal to every
  ``D[c]``, and an error of ``P`` reaches ``W`` times a unit vector, so the
  squared residuals of the two steps add;
* ``P`` as a 1x1 weight is then a two-factor interleaved product, or not
  (:mod:`sconv_onnx.interleave`): three factors in all (IGC-V2 with two 1x1
  group convs; one dense 1x1 conv when it is not, two factors);
* the first 1x1 conv of that product, ``F`` (``M x C/G1``, ``G G1`` groups) can
  itself be a two-factor product group by group (its ``inner`` layout): four
  factors.  With ``R = 1`` its rows are those of the exact product up to scale,
  which keeps every layout; with ``R > 1`` rows within a path are mixed, and a
  layout survives only where its groups hold whole paths.  Inner layouts keep
  their outputs in order (a reordered one would have to be composed into the
  interleave after it).

The squared residuals of the last step do not add exactly (an error of ``F``
reaches ``W`` through the last conv), so every chain's residual is measured
on the weight it expands to (:func:`factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import interleave
from .interleave import Factors, Hypothesis


@dataclass(frozen=True)
class Separable:
    """``W[o, c, :] = pointwise[o, c] * depthwise[c', :]`` within ``tail`` (the squared
    norm left out), ``c'`` the input channel ``c`` of ``o``'s group."""

    depthwise: np.ndarray  # C G x 1 x K..  (unit filters)
    pointwise: np.ndarray  # O x C
    tail: float


def separable(weight: np.ndarray, groups: int) -> Separable | None:
    """The depthwise-then-1x1 split of ``weight`` (least squares: the SVD of each input
    channel's ``outputs x taps`` matrix); None for kernels of one tap."""
    w = np.asarray(weight, np.float64)
    out_ch, in_ch, *kernel = w.shape
    taps = math.prod(kernel)
    if taps < 2:
        return None
    per_channel = w.reshape(groups, out_ch // groups, in_ch, taps).transpose(0, 2, 1, 3)
    u, s, vt = np.linalg.svd(per_channel, full_matrices=False)
    depthwise = vt[..., 0, :].reshape(groups * in_ch, 1, *kernel)
    pointwise = (u[..., 0] * s[..., :1]).transpose(0, 2, 1).reshape(out_ch, in_ch)
    return Separable(depthwise, pointwise, float(np.sum(s[..., 1:] ** 2)))


def _screen(weight: np.ndarray, groups: int, budget: float) -> bool:
    """Whether every input channel's ``outputs x taps`` matrix is within ``budget`` of rank 1
    (the Gram eigenvalues of the first channel's first: a dense conv fails there)."""
    out_ch, in_ch = weight.shape[:2]
    taps = weight[0, 0].size
    per_channel = np.asarray(weight, np.float64).reshape(groups, out_ch // groups, in_ch, taps)
    per_channel = per_channel.transpose(0, 2, 1, 3)
    if taps < 2 or out_ch // groups < 2:
        return False
    first = interleave.energies(per_channel[0, :1])
    if float(np.sum(first[..., 1:])) > budget:
        return False
    return float(np.sum(interleave.energies(per_channel)[..., 1:])) <= budget


def search(weight: np.ndarray, tol: float, groups: int = 1) -> list[Hypothesis]:
    """The chains (module doc) within ``tol`` that have fewer weights than ``weight``, each
    with its measured residual: the :data:`interleave.MAX_CANDIDATES` with the fewest."""
    out_ch, in_ch = weight.shape[:2]
    taps = weight[0, 0].size
    total = float(np.sum(np.asarray(weight, np.float64) ** 2))
    budget = tol * tol * total
    if total == 0 or not _screen(weight, groups, budget):
        return []
    split = separable(weight, groups)
    pointwise_total = total - split.tail
    pointwise_tol = math.sqrt(max(budget - split.tail, 0.0) / pointwise_total)
    options: list[tuple[Hypothesis, Factors | None]] = [
        (Hypothesis(1, 1, 0, groups=groups, depthwise=True), None)]
    for pair in interleave.search(split.pointwise, pointwise_tol, groups=groups):
        chain, factors = replace(pair, depthwise=True), interleave.factor(split.pointwise, pair)
        options.append((chain, factors))
        left = max(budget - split.tail - pair.residual**2 * pointwise_total, 0.0)
        # inner layouts in order only: a reordered inner output would need the next
        # interleave composed with its order
        inner_orders = [layout for layout in interleave.layouts(
            pair.channels_between, in_ch // pair.in_groups, groups * pair.in_groups)
            if layout.out_order is None]
        for inner in interleave.search(factors.convs[0], math.sqrt(left / pointwise_total),
                                       inner_orders):
            options.append((replace(chain, inner=replace(inner, residual=0.0)), factors))
    options = [option for option in options if option[0].params(out_ch, in_ch, taps) < weight.size]
    options.sort(key=lambda option: option[0].params(out_ch, in_ch, taps))
    kept = []
    for chain, pair_factors in options:  # fewest weights first: measured until enough hold
        residual = factor(weight, chain, split, pair_factors).residual
        if residual <= tol:
            kept.append(replace(chain, residual=residual))
            if len(kept) == interleave.MAX_CANDIDATES:
                break
    return kept


def factor(weight: np.ndarray, hyp: Hypothesis, split: Separable | None = None,
           pair: Factors | None = None) -> Factors:
    """The factors of any layout (a two-factor one: :func:`interleave.factor`), with the
    residual measured on the weight they expand to for chains.  ``split`` and ``pair``
    (the 1x1 pair's factors) may be given when they are known already."""
    if not hyp.depthwise:
        if hyp.inner is not None:
            raise ValueError("an inner layout is factored after a depthwise conv only")
        return interleave.factor(weight, hyp)
    split = split if split is not None else separable(weight, hyp.groups)
    channels = split.depthwise.shape[0]
    if hyp.pointwise_dense:
        convs: tuple[np.ndarray, ...] = (split.pointwise,)
        groups: tuple[int, ...] = (hyp.groups,)
    else:
        if pair is None:
            pair = interleave.factor(split.pointwise, replace(hyp, depthwise=False, inner=None))
        convs, groups = pair.convs, pair.groups
        if hyp.inner is not None:
            first = interleave.factor(convs[0], hyp.inner)
            convs, groups = (*first.convs, *convs[1:]), (*first.groups, *groups[1:])
    factors = Factors(hyp, (split.depthwise, *convs), (channels, *groups),
                      interleave.gathers(hyp), 0.0)
    w = np.asarray(weight, np.float64)
    norm = float(np.linalg.norm(w))
    error = float(np.linalg.norm(interleave.expand(factors, w.shape) - w))
    return replace(factors, residual=error / norm if norm > 0 else 0.0)


__all__ = ["Separable", "factor", "search", "separable"]
