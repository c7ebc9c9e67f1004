"""A MAC budget for weights that are not structured: the greedy choice of approximations.

The budget (``target_macs = R``) is for models trained without Structural
Regularization: layers are forced onto structures they only approximate.
With calibration data, each family offers *approximate* candidates per
layer, each with the relative error of the layer's output on the data
(:meth:`sconv_onnx.passes.base.Family.calibrate`).  Starting from the plan
(exact structures are taken first, at no error), the greedy step takes,
over all layers, the move to a cheaper candidate with the least
``(e_new^2 - e_now^2) / (MACs_now - MACs_new)``: output error added per MAC
saved, in the spirit of AIMET's greedy per-layer ratio selection.  It stops
once the layers' MACs are at most ``R`` times the original's.  Weighted by each
layer's measured sensitivity, and cut short where the model's output leaves
its bound, it is the end-to-end budget of :mod:`sconv_onnx.endtoend`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

from .plan import Candidate

ALPHA_FITS = ("data", "weights")


def greedy(options: dict[Hashable, list[Candidate]], current: dict[Hashable, tuple[int, float]],
           total: int, target: float, sensitivity: dict[Hashable, float] | None = None,
           ) -> list[tuple[Hashable, Candidate, int]]:
    """Moves, least error per MAC saved first, until ``total <= target``.

    ``options`` maps a layer to its approximate candidates (with ``output_error``);
    ``current`` each layer to its (MACs, output error) now; ``sensitivity`` each
    layer to how much of its output error (squared) reaches the model's output
    (:mod:`sconv_onnx.endtoend`; 1 where not given, and a layer whose is not finite
    is never moved).  Returns the moves in order, each ``(layer, candidate, MAC
    total after it)`` (MACs counted without shared parts: an upper bound); a
    layer may move more than once, its last move standing.
    """
    sensitivity = sensitivity or {}
    moves: list[tuple[Hashable, Candidate, int]] = []
    current = dict(current)
    while total > target:
        best = None
        for layer, layer_options in options.items():
            weight = sensitivity.get(layer, 1.0)
            if not math.isfinite(weight):
                continue
            macs, error = current[layer]
            for option in layer_options:
                option_macs = option.macs()
                if option_macs < macs:
                    slope = weight * (option.output_error**2 - error**2) / (macs - option_macs)
                    if best is None or slope < best[0]:
                        best = (slope, layer, option)
        if best is None:
            break
        _, layer, option = best
        total -= current[layer][0] - option.macs()
        current[layer] = (option.macs(), option.output_error)
        moves.append((layer, option, total))
    return moves
