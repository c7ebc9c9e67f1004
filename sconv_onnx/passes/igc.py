"""The interleaved family (IGC-V1/V2): a dense conv as group convs with shuffles between.

A Conv whose weight is an interleaved product (:mod:`sconv_onnx.interleave`
has the math and the search of two factors, :mod:`sconv_onnx.chains` of
chains with a depthwise first factor) becomes its stages, first to last:

    [Gather(axis=1): the input channels in group order]      only when permuted
    Conv(G1 groups, the original kernel, strides, pads, dilations)
       (or a depthwise Conv with the kernel, then 1x1 group convs)
    [Gather(axis=1): the interleave]                          only when G1, G2 > 1
    Conv(G2 groups, 1x1, the original bias)
    [Gather(axis=1): the outputs back in their order]         only when not contiguous

A conv of several groups factors each group alike (``G G1`` and ``G G2``
groups).  Candidates are exact structures within the tolerance (no
calibration data needed), and not ones that a random weight would fit as
closely by chance (:func:`~sconv_onnx.structure.by_chance`, the layout's
weights counted as its dimensions).  Their cost counts every node: the Gathers move
each element once (their int64 indices count among the params, not among
the weights), and a 2-D grouped conv whose channels per group are not whole
NCHWc blocks pays :data:`~sconv_onnx.cost.UNBLOCKED` per MAC (the block is
read from the machine: :func:`~sconv_onnx.cost.nchwc_block`; a depthwise
conv is blocked when its channels are whole blocks).

A MAC budget (``target_macs``) gets approximate products of a few layouts,
fitted on the calibration data (:mod:`.igc_budget`).

Sites: the box family's Conv sites (:mod:`.box.conv`); a
BatchNormalization after the conv is folded as theirs is (the weight searched
is the folded one, the folded bias goes on the last conv); when the
outputs are reordered, the bias must be a constant.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import chains, cost, interleave
from ..plan import Candidate, Part
from ..structure import chance_fit, effective_tol
from . import igc_budget
from .base import CalibrationRequest, Emitter, Family, Site
from .batchnorm import apply_fold, take_output
from .box import calibrate as box_calibrate
from .box import conv, timing
from .graphs import constant_value, drop_if_unused
from .lowrank import regression


def _applies(site: Site) -> bool:
    return (isinstance(site, conv.ConvSite) and not site.skip_reason and site.weight is not None
            and site.weight.dtype in (np.float32, np.float64))


def _bias(site: conv.ConvSite) -> np.ndarray | None:
    """The constant bias (with a BatchNormalization folded in, where one is), or None
    (no bias, or a computed one)."""
    if site.batchnorm is not None:
        return site.batchnorm.bias
    inputs = site.node.inputs
    return constant_value(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None


def _has_bias(site: conv.ConvSite) -> bool:
    return site.batchnorm is not None or (len(site.node.inputs) > 2
                                          and site.node.inputs[2] is not None)


def _conv_kind(site: conv.ConvSite, stage: interleave.Stage) -> str:
    """``"unblocked"`` for a 2-D grouped conv outside whole NCHWc blocks (a depthwise one:
    unless its channels are whole blocks)."""
    if len(site.geometry.kernel) != 2 or stage.groups == 1:
        return "dense"
    out_per_group = stage.out_channels // stage.groups
    if stage.in_per_group == out_per_group == 1:
        return "dense" if cost.blocked(stage.groups) else "unblocked"
    return "dense" if cost.blocked(stage.in_per_group, out_per_group) else "unblocked"


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def _conv_name(index: int, stage: interleave.Stage) -> str:
    if stage.in_per_group == 1 and stage.groups == stage.out_channels:
        return "depthwise conv"
    return f"{_ORDINALS[index]} conv" if index < len(_ORDINALS) else f"conv {index + 1}"


def parts(site: conv.ConvSite, hyp: interleave.Hypothesis) -> tuple[Part, ...]:
    """What the rewrite at ``hyp`` writes and runs (module doc), per output position."""
    geom = site.geometry
    out_ch, in_ch = site.weight.shape[:2]
    taps = math.prod(geom.kernel)
    found = []
    layout = interleave.stages(hyp, out_ch, in_ch)
    for index, stage in enumerate(layout):
        # the first conv reads the input's positions, the 1x1 convs after it the output's
        positions = geom.input_positions if index == 0 else 1.0
        if stage.reorder is not None:
            found.append(Part(stage.reorder, stage.in_channels,
                              (cost.gather_op(stage.in_channels * positions),), geom.positions))
        kernel = geom.kernel if stage.spatial else (1,) * len(geom.kernel)
        op = cost.conv_op(stage.out_channels, stage.in_per_group, stage.in_channels, kernel,
                          positions, kind=_conv_kind(site, stage))
        bias = site.bias_size if index == len(layout) - 1 else 0
        found.append(Part(_conv_name(index, stage), stage.weights(taps) + bias, (op,),
                          geom.positions))
    if hyp.out_order is not None:
        found.append(Part("output order", out_ch, (cost.gather_op(out_ch),), geom.positions))
    return tuple(found)


def _layout(candidate: Candidate) -> interleave.Hypothesis:
    """A candidate's layout: its payload (exact), or the layout of its fitted factors
    (a budget's)."""
    payload = candidate.payload
    return payload.hypothesis if isinstance(payload, interleave.Factors) else payload


def _rounding_depth(site: conv.ConvSite, hyp: interleave.Hypothesis) -> int:
    """Products summed along the longest path through the stages (plus the bias and a
    margin): the rounding the rewrite's outputs can differ by."""
    taps = math.prod(site.geometry.kernel)
    layout = interleave.stages(hyp, *site.weight.shape[:2])
    return sum(stage.in_per_group * (taps if stage.spatial else 1) for stage in layout) + 2


class InterleavedFamily(Family):
    """Group convs with channel shuffles between (see the module doc)."""

    name = "igc"
    description = ("interleaved group convolutions (IGC-V1/V2): a dense conv as group convs with "
                   "channel shuffles between (a depthwise conv first in chains)")

    def find(self, view) -> list[Site]:
        return [site for site in conv.find(view, self.name) if _applies(site)]

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        tol = effective_tol(tol, site.layer.weight_dtype)
        weight, groups = site.weight, site.geometry.group
        orders = interleave.layouts(*weight.shape[:2], groups)
        permuted = interleave.recover_orders(weight, tol) if groups == 1 else None
        if permuted is not None and permuted not in orders:  # identity orders: a layout already
            orders.append(permuted)
        constant_bias = _bias(site) is not None or not _has_bias(site)
        absorbs = (site.batchnorm.node.name or "BatchNormalization",) if site.batchnorm else ()
        found = []
        taps = math.prod(site.geometry.kernel)
        for hyp in [*interleave.search(weight, tol, orders), *chains.search(weight, tol, groups)]:
            if hyp.out_order is not None and not constant_bias:
                continue  # a computed bias cannot be put in the second conv's order
            if chance_fit(hyp.residual, weight.size, weight.size - hyp.params(*weight.shape[:2], taps)):
                continue  # few constraints: a random weight would fit as well (structure.by_chance)
            found.append(Candidate(
                self.name, hyp.label(), hyp.residual, parts(site, hyp), payload=hyp,
                rounding_depth=_rounding_depth(site, hyp),
                absorbs=absorbs))
        return found

    def calibration(self, site: Site, seed: int) -> CalibrationRequest | None:
        return box_calibrate.request(site, seed) if site.geometry.group == 1 else None

    def calibrate(self, site: Site, candidates: list[Candidate], sample: np.ndarray,
                  budget: bool, alpha_fit: str) -> list[Candidate]:
        """The exact candidates' output errors on the patches; with a budget, approximate
        products (:mod:`.igc_budget`), fitted per ``alpha_fit`` ("data" or "weights")."""
        weight, patches = site.weight, sample.reshape(-1, sample.shape[-1])
        found = [dataclasses.replace(candidate, output_error=igc_budget.output_error(
            weight, chains.factor(weight, candidate.payload), patches))
            for candidate in candidates]
        if not budget:
            return found
        for hyp in igc_budget.layouts(*weight.shape[:2], math.prod(site.geometry.kernel)):
            plain = igc_budget.fit(weight, hyp, None)
            fitted = igc_budget.fit(weight, hyp, patches) if alpha_fit == "data" else plain
            found.append(self._approximate(
                site, fitted, igc_budget.output_error(weight, fitted, patches),
                igc_budget.output_error(weight, plain, patches)))
        return found

    def refit(self, site: Site, candidate: Candidate, inputs: np.ndarray,
              originals: np.ndarray) -> Candidate:
        """An approximate product fitted again on the inputs the layer receives in the
        compressed model (the sequential fit, docs/DESIGN.md 1.2): the shrunk least-squares
        map from ``inputs`` to the original outputs, then its nearest product in the
        inputs' per-group metric."""
        weight = site.weight
        inputs, originals = (a.reshape(-1, a.shape[-1]) for a in (inputs, originals))
        mapped, _ = regression(weight.reshape(len(weight), -1), inputs, originals)
        fitted = igc_budget.fit(mapped.reshape(weight.shape), candidate.payload.hypothesis,
                                inputs)
        return self._approximate(site, fitted,
                                 igc_budget.output_error(weight, fitted, inputs, originals),
                                 candidate.output_error_weight_alpha)

    def _approximate(self, site: conv.ConvSite, fitted: interleave.Factors, error: float,
                     weight_space_error: float | None) -> Candidate:
        """A budget's candidate: ``fitted`` with its output errors (fitted, and the
        weight-space fit's) and its residual from the layer's weight."""
        hyp = fitted.hypothesis
        w = np.asarray(site.weight, np.float64)
        residual = float(np.linalg.norm(interleave.expand(fitted, w.shape) - w)) / max(
            float(np.linalg.norm(w)), 1e-300)
        return Candidate(self.name, hyp.label(), residual, parts(site, hyp), payload=fitted,
                         rounding_depth=_rounding_depth(site, hyp), approximate=True,
                         output_error=error, output_error_weight_alpha=weight_space_error)

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        hyp = _layout(candidate)
        factors = (candidate.payload if isinstance(candidate.payload, interleave.Factors)
                   else chains.factor(site.weight, hyp))  # exact: factored for the layout chosen
        geom, dtype = site.geometry, site.weight.dtype
        node, at = emitter.node(site.node), emitter.at(site.node, site.name)
        old_weight = node.inputs[1]
        ones = (1,) * len(geom.kernel)
        x = node.inputs[0]
        for index, (weight, groups, gather) in enumerate(
                zip(factors.convs, factors.groups, factors.gathers)):
            if gather is not None:
                suffix = "igc_input_order" if index == 0 else f"igc_interleave{index}"
                x = at.node("Gather", suffix, [x, at.constant(f"{suffix}_idx", gather)],
                            {"axis": 1})
            attrs = {"group": groups}
            if index == 0:
                attrs.update(strides=list(geom.strides), dilations=list(geom.dilations),
                             pads=list(geom.pads))
            else:
                weight = weight.reshape(*weight.shape[:2], *ones)
            w = at.constant(f"igc_conv{index}_w", weight.astype(dtype))
            if index < len(factors.convs) - 1:
                x = at.node("Conv", f"igc_conv{index}", [x, w], attrs)
            else:
                self._emit_last(site, hyp, emitter, x, w, attrs)
        drop_if_unused(emitter.graph_of(site.node), old_weight)

    def measure(self, site: Site, trials, timer) -> list[float] | None:
        """The layer timed alone, as the box family's (:mod:`.box.timing`)."""

        def variant(conv_site, original, candidate, shared):
            return timing.emitted_layer_model(
                conv_site, original,
                lambda layer_site, emitter, graph: self.emit(layer_site, candidate, emitter))

        return timing.measure_alone(site, trials, timer, variant,
                                    key=lambda candidate: ("igc", _layout(candidate)))

    @staticmethod
    def _emit_last(site: conv.ConvSite, hyp: interleave.Hypothesis, emitter: Emitter, x, w,
                   attrs: dict) -> None:
        """The last conv, with the bias (BatchNormalization folded), written to the original
        output: by the original node itself, or by a Gather putting the outputs back."""
        node, at = emitter.node(site.node), emitter.at(site.node, site.name)
        graph = emitter.graph_of(site.node)
        bn = emitter.node(site.batchnorm.node) if site.batchnorm is not None else None
        if hyp.out_order is None:
            node.inputs[0], node.inputs[1] = x, w
            node.attrs = attrs
            if bn is not None:
                apply_fold(graph, node, bn, at.constant("bias", site.batchnorm.bias))
            return
        order = list(hyp.out_order)
        old_bias = node.inputs[2] if len(node.inputs) > 2 else None
        bias = _bias(site)
        y = at.node("Conv", "igc_last", [x, w] + (
            [at.constant("igc_bias", bias[order].astype(site.weight.dtype))]
            if bias is not None else []), attrs)
        back = np.argsort(np.array(order, np.int64))  # channel c is at position back[c]
        node.op = "Gather"
        node.inputs.clear()
        node.inputs.extend([y, at.constant("igc_output_order_idx", back)])
        node.attrs = {"axis": 1}
        if old_bias is not None:
            drop_if_unused(graph, old_bias)
        if bn is not None:
            take_output(graph, node, bn)


__all__ = ["InterleavedFamily", "parts"]
