"""The interleaved family (IGC-V1): a dense conv as two group convs with a shuffle between.

A Conv of one group whose weight is a two-factor interleaved product
(:mod:`sconv_onnx.interleave` has the math and the search) becomes

    [Gather(axis=1): the input channels in group order]      only when permuted
    Conv(G1 groups, the original kernel, strides, pads, dilations)
    [Gather(axis=1): the interleave]                          only when G1, G2 > 1
    Conv(G2 groups, 1x1, the original bias)
    [Gather(axis=1): the outputs back in their order]         only when not contiguous

Candidates are exact structures within the tolerance (no calibration data
needed).  Their cost counts every node: the Gathers move each element once
(their int64 indices count among the params, not among the weights),
and a 2-D grouped conv whose channels per group are not whole NCHWc blocks
pays :data:`~sconv_onnx.cost.UNBLOCKED` per MAC (the block is read from the
machine: :func:`~sconv_onnx.cost.nchwc_block`).

Sites: the box family's Conv sites (:mod:`.box.conv`) of one group; a
BatchNormalization after the conv is folded as theirs is (the weight searched
is the folded one, the folded bias goes on the second conv); when the
outputs are reordered, the bias must be a constant.
"""

from __future__ import annotations

import math

import numpy as np

from .. import cost, interleave
from ..plan import Candidate, Part
from ..structure import effective_tol
from .base import Emitter, Family, Site
from .batchnorm import apply_fold, take_output
from .box import conv
from .graphs import constant_value, drop_if_unused


def _applies(site: Site) -> bool:
    return (isinstance(site, conv.ConvSite) and not site.skip_reason and site.weight is not None
            and site.geometry.group == 1 and site.weight.dtype in (np.float32, np.float64))


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


def _conv_kind(site: conv.ConvSite, in_per_group: int, out_per_group: int, groups: int) -> str:
    """``"unblocked"`` for a 2-D grouped conv outside whole NCHWc blocks."""
    two_d = len(site.geometry.kernel) == 2
    return ("unblocked" if two_d and groups > 1 and not cost.blocked(in_per_group, out_per_group)
            else "dense")


def parts(site: conv.ConvSite, hyp: interleave.Hypothesis) -> tuple[Part, ...]:
    """What the rewrite at ``hyp`` writes and runs (module doc), per output position."""
    geom = site.geometry
    out_ch, in_ch = site.weight.shape[:2]
    kernel, taps = geom.kernel, math.prod(geom.kernel)
    g1, g2, rank = hyp.in_groups, hyp.out_groups, hyp.rank
    between = hyp.channels_between
    found = []
    if hyp.in_order is not None:
        found.append(Part("input order", in_ch, (cost.gather_op(in_ch * geom.input_positions),),
                          geom.positions))
    first = cost.conv_op(between, in_ch // g1, in_ch, kernel, geom.input_positions,
                         kind=_conv_kind(site, in_ch // g1, rank * g2, g1))
    found.append(Part("first conv", between * (in_ch // g1) * taps, (first,), geom.positions))
    if interleave.interleave(hyp) is not None:
        found.append(Part("interleave", between, (cost.gather_op(between),), geom.positions))
    second = cost.conv_op(out_ch, rank * g1, between, (1,) * len(kernel), 1.0,
                          kind=_conv_kind(site, rank * g1, out_ch // g2, g2))
    found.append(Part("second conv", out_ch * rank * g1 + site.bias_size, (second,),
                      geom.positions))
    if hyp.out_order is not None:
        found.append(Part("output order", out_ch, (cost.gather_op(out_ch),), geom.positions))
    return tuple(found)


class InterleavedFamily(Family):
    """Two group convs and a channel shuffle (see the module doc)."""

    name = "igc"
    description = ("interleaved group convolutions (IGC-V1): a dense conv as a grouped conv, a "
                   "channel shuffle and a grouped 1x1 conv")

    def find(self, view) -> list[Site]:
        return [site for site in conv.find(view, self.name) if _applies(site)]

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        tol = effective_tol(tol, site.layer.weight_dtype)
        weight = site.weight
        orders = interleave.layouts(*weight.shape[:2])
        permuted = interleave.recover_orders(weight, tol)
        if permuted is not None and permuted not in orders:  # identity orders: a layout already
            orders.append(permuted)
        constant_bias = _bias(site) is not None or not _has_bias(site)
        absorbs = (site.batchnorm.node.name or "BatchNormalization",) if site.batchnorm else ()
        found = []
        for hyp in interleave.search(weight, tol, orders):
            if hyp.out_order is not None and not constant_bias:
                continue  # a computed bias cannot be put in the second conv's order
            found.append(Candidate(
                self.name, hyp.label(), hyp.residual, parts(site, hyp), payload=hyp,
                rounding_depth=weight[0].size // hyp.in_groups + hyp.rank * hyp.in_groups + 2,
                absorbs=absorbs))
        return found

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        hyp: interleave.Hypothesis = candidate.payload
        factors = interleave.factor(site.weight, hyp)  # only for the layout chosen
        geom, dtype = site.geometry, site.weight.dtype
        node, at = emitter.node(site.node), emitter.at(site.node, site.name)
        old_weight = node.inputs[1]
        x = node.inputs[0]
        if hyp.in_order is not None:
            x = at.node("Gather", "igc_input_order",
                        [x, at.constant("igc_input_order_idx", np.array(hyp.in_order, np.int64))],
                        {"axis": 1})
        spatial_dims = len(geom.kernel)
        x = at.node("Conv", "igc_first", [x, at.constant("igc_first_w", factors.first.astype(dtype))],
                    {"group": hyp.in_groups, "strides": list(geom.strides),
                     "dilations": list(geom.dilations), "pads": list(geom.pads)})
        if factors.between is not None:
            x = at.node("Gather", "igc_interleave",
                        [x, at.constant("igc_interleave_idx", factors.between)], {"axis": 1})
        second = at.constant("igc_second_w", factors.second.reshape(
            *factors.second.shape, *(1,) * spatial_dims).astype(dtype))
        graph = emitter.graph_of(site.node)
        bn = emitter.node(site.batchnorm.node) if site.batchnorm is not None else None
        if hyp.out_order is None:
            node.inputs[0], node.inputs[1] = x, second
            node.attrs = {"group": hyp.out_groups}
            if bn is not None:
                apply_fold(graph, node, bn, at.constant("bias", site.batchnorm.bias))
        else:
            order = list(hyp.out_order)
            old_bias = node.inputs[2] if len(node.inputs) > 2 else None
            bias = _bias(site)
            y = at.node("Conv", "igc_second", [x, second] + (
                [at.constant("igc_bias", bias[order].astype(dtype))] if bias is not None else []),
                {"group": hyp.out_groups})
            back = np.argsort(np.array(order, np.int64))  # channel c is at position back[c]
            node.op = "Gather"
            node.inputs.clear()
            node.inputs.extend([y, at.constant("igc_output_order_idx", back)])
            node.attrs = {"axis": 1}
            if old_bias is not None:
                drop_if_unused(graph, old_bias)
            if bn is not None:
                take_output(graph, node, bn)
        drop_if_unused(graph, old_weight)


__all__ = ["InterleavedFamily", "parts"]
