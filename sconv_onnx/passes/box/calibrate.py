"""Calibration data for box-structured layers: output errors, and a MAC budget's candidates.

A Conv or fully connected layer of the main graph (with known shapes) has
its input patches sampled (:mod:`sconv_onnx.datafit`).  Each exact
candidate then gets its output error with the weight-space alpha; with a
MAC budget, each structure of :func:`candidate_sizes` becomes an
*approximate* candidate (outside the tolerance) with its alpha fitted on
the patches (``alpha_fit="data"``, shrunk toward the weight-space one) or
in weight space, and both output errors.  The greedy choice among them is
the selector's (:mod:`sconv_onnx.budget`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ... import datafit
from ...plan import Candidate
from ...structure import Structure, expand, fit_alpha, relative_residual
from ..base import CalibrationRequest
from . import conv, linear

#: Channel candidates of the budget: ``c = ceil(C / divisor)``.
CHANNEL_DIVISORS = (1, 2, 4)


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


def request(site, seed: int) -> CalibrationRequest | None:
    """The input patches of a Conv or fully connected site with known shapes; None otherwise."""
    if site.skip_reason or site.layer.macs_before is None:
        return None
    if isinstance(site, linear.LinearSite):
        return CalibrationRequest(site.node.inputs[0].name, lambda value, chunks: datafit.sample_rows(
            value, site.feature_axis, datafit.MAX_POSITIONS // chunks, seed))
    if isinstance(site, conv.ConvSite):
        geom = site.geometry
        return CalibrationRequest(site.node.inputs[0].name, lambda value, chunks: (
            datafit.sample_conv_patches(value, geom.kernel, geom.strides, geom.dilations,
                                        geom.pads, geom.group, datafit.MAX_POSITIONS // chunks,
                                        seed)))
    return None


def _cheapest(site, structure: Structure, family: str, alpha: np.ndarray) -> Candidate:
    """``structure`` with its lowering of least predicted cost (no pool shared)."""
    if isinstance(site, linear.LinearSite):
        return linear.candidate(site, structure, family, alpha, approximate=True)
    options = [conv.candidate(site, structure, lowering, family, alpha, approximate=True)
               for lowering in conv.lowering_options(site, structure)]
    return min(options, key=lambda option: option.cost())


def calibrate(site, candidates: list[Candidate], patches: np.ndarray, budget: bool,
              alpha_fit: str, family: str) -> list[Candidate]:
    """``candidates`` with output errors, plus the budget's approximate candidates
    (those that save MACs, cheapest last)."""
    sample = datafit.LayerSample(site.weight, patches)
    errors: dict[tuple[int, ...], float] = {}
    measured = []
    for candidate in candidates:
        sizes = candidate.payload.sizes
        if sizes not in errors:
            errors[sizes] = sample.error(sizes, fit_alpha(site.weight, sizes))
        measured.append(dataclasses.replace(candidate, output_error=errors[sizes],
                                            output_error_weight_alpha=errors[sizes]))
    if not budget:
        return measured
    approximate = []
    for sizes in candidate_sizes(site.weight.shape):
        structure = Structure(sizes, relative_residual(site.weight, sizes))
        weight_alpha = fit_alpha(site.weight, sizes)
        trial = _cheapest(site, structure, family, weight_alpha)
        if trial.macs() >= site.layer.macs_before:
            continue
        weight_error = sample.weight_space_error(sizes)
        alpha, error = sample.fit(sizes) if alpha_fit == "data" else (weight_alpha, weight_error)
        approximate.append(dataclasses.replace(
            trial, payload=dataclasses.replace(trial.payload, alpha=alpha),
            output_error=error, output_error_weight_alpha=weight_error))
    return measured + sorted(approximate, key=lambda option: -option.macs())


def refit(site, candidate: Candidate, inputs: np.ndarray, originals: np.ndarray) -> Candidate:
    """``candidate``'s alpha fitted (data-aware, shrunk) to map the patches ``inputs`` to
    the original layer's outputs on ``originals`` (the budget's sequential fit)."""
    targets = datafit.original_outputs(site.weight, originals)
    alpha, error = datafit.LayerSample(site.weight, inputs, targets).fit(candidate.payload.sizes)
    weight = np.asarray(site.weight, np.float64)
    residual = float(np.linalg.norm(weight - expand(alpha, weight.shape))) / max(
        float(np.linalg.norm(weight)), 1e-300)  # the refit's own distance from W
    return dataclasses.replace(candidate, payload=dataclasses.replace(candidate.payload, alpha=alpha),
                               output_error=error, residual=residual)
