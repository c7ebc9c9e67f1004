"""Calibration-data planning: output errors per layer, and a MAC budget for plain weights.

With calibration data every Conv, Gemm and MatMul of the main graph gets
its input patches sampled (:mod:`sconv_onnx.calibration`,
:mod:`sconv_onnx.datafit`), so that a structure's cost in accuracy is
measured as the relative error of the layer's *output*, not of its weight.

The budget (``target_macs = R``) is for models trained without Structural
Regularization: layers are forced onto structures they only approximate.
Each eligible layer offers the candidates of :func:`candidate_sizes`, each
with its alpha (data-aware by default) and output error ``e``.  Starting
from the model's plan (exact structures are taken first, at no error), the
greedy step takes, over all layers, the move to a cheaper candidate with the
least ``(e_new^2 - e_now^2) / (MACs_now - MACs_new)``: output error added
per MAC saved, in the spirit of AIMET's greedy per-layer ratio selection.
It stops once the Conv/Gemm/MatMul MACs are at most ``R`` times the
original's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import onnx

from . import datafit
from .calibration import sample_tensors
from .passes import structured_conv, structured_linear
from .plan import REWRITE, LayerPlan, Plan
from .structure import Structure, fit_alpha, relative_residual

#: Channel candidates: ``c = ceil(C / divisor)``.
CHANNEL_DIVISORS = (1, 2, 4)
ALPHA_FITS = ("data", "weights")


def candidate_sizes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Structures offered for a weight ``(O, C, *K)``: ``c`` in ``C, C/2, C/4`` (rounded
    up) times ``n = K`` or ``n = K - 1`` on every axis longer than 1; never the full shape."""
    channels, kernel = shape[1], tuple(shape[2:])
    channel_options = sorted({math.ceil(channels / d) for d in CHANNEL_DIVISORS}, reverse=True)
    kernel_options = [kernel]
    if any(k > 1 for k in kernel):
        kernel_options.append(tuple(k - 1 if k > 1 else k for k in kernel))
    sizes = [(c, *n) for c in channel_options for n in kernel_options]
    return [s for s in sizes if s != tuple(shape[1:])]


@dataclass
class Option:
    """One candidate of a layer: its plan with the choice filled in, and its alpha."""

    layer: LayerPlan
    alpha: np.ndarray
    error: float

    @property
    def macs(self) -> int:
        return self.layer.macs_after


def _calibrated(rewrite_pass, site, layer: LayerPlan, main_graph) -> bool:
    """Whether ``site`` can be calibrated: a Conv, Gemm or MatMul of the main graph
    with a constant float weight and known shapes."""
    return (rewrite_pass in (structured_conv, structured_linear) and site.graph is main_graph
            and site.skip_reason is None and site.weight is not None
            and layer.macs_before is not None)


def _sampler(rewrite_pass, site, seed: int):
    """A function keeping a chunk's share of the layer's input patches."""
    if rewrite_pass is structured_linear:
        return lambda value, chunks: datafit.sample_rows(
            value, site.feature_axis, datafit.MAX_POSITIONS // chunks, seed)
    geom = site.geometry
    return lambda value, chunks: datafit.sample_conv_patches(
        value, geom.kernel, geom.strides, geom.dilations, geom.pads, geom.group,
        datafit.MAX_POSITIONS // chunks, seed)


def _with_choice(rewrite_pass, site, layer: LayerPlan, structure: Structure) -> LayerPlan:
    trial = dataclasses.replace(layer)
    if rewrite_pass is structured_conv:
        lowering, ops = structured_conv.cheapest_lowering(site, structure)
        structured_conv.fill_choice(trial, site, structure, lowering, ops)
    else:
        structured_linear.fill_choice(trial, site, structure)
    return trial


def _options(rewrite_pass, site, layer: LayerPlan, sample: datafit.LayerSample,
             alpha_fit: str) -> list[Option]:
    """The layer's candidates that save MACs, cheapest last."""
    options = []
    for sizes in candidate_sizes(site.weight.shape):
        structure = Structure(sizes, relative_residual(site.weight, sizes))
        trial = _with_choice(rewrite_pass, site, layer, structure)
        if trial.macs_after >= layer.macs_before:
            continue
        data_alpha, data_error = sample.fit(sizes)
        weight_error = sample.weight_space_error(sizes)
        alpha, error = ((data_alpha, data_error) if alpha_fit == "data"
                        else (fit_alpha(site.weight, sizes), weight_error))
        trial.output_error, trial.output_error_weight_alpha = error, weight_error
        options.append(Option(trial, alpha, error))
    return sorted(options, key=lambda option: -option.macs)


def _greedy(options: dict[int, list[Option]], current: dict[int, tuple[int, float]],
            total: int, target: float) -> tuple[dict[int, Option], int]:
    """Moves, cheapest in error per MAC saved first, until ``total <= target``.

    ``current`` maps each layer index to its (MACs, error) now.  Returns the
    chosen option per moved layer and the MAC total reached.
    """
    chosen: dict[int, Option] = {}
    while total > target:
        best = None
        for index, layer_options in options.items():
            macs, error = current[index]
            for option in layer_options:
                if option.macs < macs:
                    slope = (option.error**2 - error**2) / (macs - option.macs)
                    if best is None or slope < best[0]:
                        best = (slope, index, option)
        if best is None:
            break
        _, index, option = best
        total -= current[index][0] - option.macs
        current[index] = (option.macs, option.error)
        chosen[index] = option
    return chosen, total


def calibrate(model: onnx.ModelProto, analysis_sites, plan: Plan, graph, batches,
              target_macs: float | None = None, alpha_fit: str = "data", seed: int = 0) -> list[str]:
    """Output errors for the plan's layers and, with ``target_macs``, the budget.

    ``analysis_sites``: the (pass, site) pairs in plan order; ``graph``: the
    main graph.  Chosen layers get ``decision = rewrite`` and their site's
    ``alpha``.  Returns notes for the report.
    """
    entries = [(index, rewrite_pass, site, plan.layers[index])
               for index, (rewrite_pass, site) in enumerate(analysis_sites)
               if _calibrated(rewrite_pass, site, plan.layers[index], graph)]
    requests = [(site.node.inputs[0].name, _sampler(rewrite_pass, site, seed))
                for _, rewrite_pass, site, _ in entries]
    samples = sample_tensors(model, batches, requests)
    notes = []
    options: dict[int, list[Option]] = {}
    current: dict[int, tuple[int, float]] = {}
    for position, (index, rewrite_pass, site, layer) in enumerate(entries):
        sample = datafit.LayerSample(site.weight, samples[position])
        if layer.chosen is not None:
            layer.output_error = layer.output_error_weight_alpha = sample.error(
                layer.chosen.sizes, fit_alpha(site.weight, layer.chosen.sizes))
        if target_macs is not None and not layer.rewritten:
            options[index] = _options(rewrite_pass, site, layer, sample, alpha_fit)
        current[index] = ((layer.macs_after if layer.rewritten else layer.macs_before),
                          (layer.output_error or 0.0) if layer.rewritten else 0.0)
    if target_macs is None:
        return notes
    known = [layer for layer in plan.layers if layer.macs_before is not None]
    original = sum(layer.macs_before for layer in known)
    total = sum(layer.macs_after if layer.rewritten else layer.macs_before for layer in known)
    chosen, total = _greedy(options, current, total, target_macs * original)
    for index in set(options) - set(chosen):
        plan.layers[index].reason += "; not needed for the MAC budget"
    for index, option in chosen.items():
        rewrite_pass, site = analysis_sites[index]
        layer = option.layer
        layer.decision = REWRITE
        layer.reason = (f"budget: output error {layer.output_error:.3g} "
                        f"(weight-space alpha: {layer.output_error_weight_alpha:.3g})")
        plan.layers[index] = layer
        site.alpha = option.alpha
    plan.target_macs, plan.alpha_fit = target_macs, alpha_fit
    reached = total / original if original else 1.0
    if reached > target_macs:
        notes.append(f"MAC budget {target_macs:g} not reachable: every candidate taken, "
                     f"{reached:.3f} of the original Conv/Gemm/MatMul MACs")
    unknown = len(plan.layers) - len(known)
    if unknown:
        notes.append(f"{unknown} layers with unknown MACs are outside the budget")
    return notes
