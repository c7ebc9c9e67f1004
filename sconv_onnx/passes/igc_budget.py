"""Approximate interleaved products for a MAC budget (pretrained weights).

A weight that is no interleaved product still has a nearest one at each
layout: the blocks' truncated SVDs (:func:`sconv_onnx.interleave.factor`).
For a MAC budget the fit that matters is the layer's output on the data, not
the weight: with ``X_g`` the calibration patches of input group ``g`` and
``L_g L_g^T = X_g^T X_g / m + lambda mu I`` (their shrunk second moment,
:func:`sconv_onnx.passes.lowrank.metric_root`), the block ``B_jg`` is fitted
as the truncated SVD of ``B_jg L_g``, multiplied back by ``L_g^-1`` (the
first conv's rows).  It leaves out the correlation *between* input groups
(each block is fitted as if the others were exact), so it is the better fit
only where that is weak; both are measured on the patches and the budget
sees the data-aware one's error (``alpha_fit="data"``) next to the
weight-space one's.

Layouts offered: ``G1, G2`` in :data:`GROUPS` whose channels per group are
whole NCHWc blocks on this machine (elsewhere a grouped conv runs 3x slower
per MAC, section 2 of the design notes), at ranks of :data:`RANK_FRACTIONS` of the
rank where the layout stops paying.
"""

from __future__ import annotations

import math

import numpy as np

from .. import cost, interleave
from ..interleave import Factors, Hypothesis
from .lowrank import metric_root

#: (G1, G2) offered to a budget.
GROUPS = ((2, 2), (4, 2), (2, 4), (4, 4))
#: Ranks offered, as fractions of the rank at which a layout stops paying.
RANK_FRACTIONS = (0.75, 0.5, 0.25)


def layouts(out_channels: int, in_channels: int, taps: int) -> list[Hypothesis]:
    """The budget's layouts for a conv ``out x in x K`` of one group (module doc)."""
    found = []
    dense = out_channels * in_channels * taps
    for g1, g2 in GROUPS:
        if in_channels % g1 or out_channels % g2:
            continue
        per_rank = Hypothesis(g1, g2, 1).params(out_channels, in_channels, taps)
        limit = dense / per_rank
        for rank in sorted({math.ceil(limit * fraction) for fraction in RANK_FRACTIONS},
                           reverse=True):
            first_out, second_in = rank * g2, rank * g1
            if 0 < rank < limit and cost.blocked(in_channels // g1, first_out, second_in,
                                                 out_channels // g2):
                found.append(Hypothesis(g1, g2, rank))
    return found


def fit(weight: np.ndarray, hyp: Hypothesis, patches: np.ndarray | None) -> Factors:
    """The factors at ``hyp`` (one conv group, no reordering): per block, the truncated
    SVD in the metric of its input group's patches (module doc), or in the plain
    Frobenius norm without patches."""
    if hyp.groups != 1 or hyp.out_order is not None or hyp.in_order is not None:
        raise ValueError(f"budget layouts are of one group in order, not {hyp.label()}")
    if patches is None:
        return interleave.factor(weight, hyp)
    columns = patches.shape[1] // hyp.in_groups
    metric = np.stack([metric_root(patches[:, g * columns:(g + 1) * columns])
                       for g in range(hyp.in_groups)])
    return interleave.factor(weight, hyp, metric)


def output_error(weight: np.ndarray, factors: Factors, inputs: np.ndarray,
                 originals: np.ndarray | None = None) -> float:
    """``||X0 W^T - X W'^T||_F / ||X0 W^T||_F``: the layer's output error on the patches
    ``X`` (``inputs``) against the original layer on ``X0`` (``originals``, the same
    positions; ``X`` itself without), bias excluded."""
    w = np.asarray(weight, np.float64)
    approx = interleave.expand(factors, w.shape).reshape(len(w), -1)
    reference = (inputs if originals is None else originals) @ w.reshape(len(w), -1).T
    scale = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - inputs @ approx.T)) / scale if scale > 0 else 0.0


__all__ = ["GROUPS", "RANK_FRACTIONS", "fit", "layouts", "output_error"]
