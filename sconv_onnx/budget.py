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
once the layers' MACs are at most ``R`` times the original's.
"""

from __future__ import annotations

from collections.abc import Hashable

from .plan import Candidate

ALPHA_FITS = ("data", "weights")


def greedy(options: dict[Hashable, list[Candidate]], current: dict[Hashable, tuple[int, float]],
           total: int, target: float) -> tuple[dict[Hashable, Candidate], int]:
    """Moves, least error per MAC saved first, until ``total <= target``.

    ``options`` maps a layer to its approximate candidates (with ``output_error``);
    ``current`` each layer to its (MACs, output error) now.  Returns the candidate
    chosen per moved layer and the MAC total reached (MACs counted without shared
    parts: an upper bound).
    """
    chosen: dict[Hashable, Candidate] = {}
    current = dict(current)
    while total > target:
        best = None
        for layer, layer_options in options.items():
            macs, error = current[layer]
            for option in layer_options:
                option_macs = option.macs()
                if option_macs < macs:
                    slope = (option.output_error**2 - error**2) / (macs - option_macs)
                    if best is None or slope < best[0]:
                        best = (slope, layer, option)
        if best is None:
            break
        _, layer, option = best
        total -= current[layer][0] - option.macs()
        current[layer] = (option.macs(), option.output_error)
        chosen[layer] = option
    return chosen, total
