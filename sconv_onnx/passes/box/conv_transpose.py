"""Structured ConvTranspose: a small ConvTranspose, then the transposed sum-pool.

A ConvTranspose weight ``W`` is ``(C_in, C/g, K_1..K_r)``; each input
channel ``i`` spreads its value over ``C/g`` output channels and the kernel
window.  ``ConvTranspose(., W)`` is the adjoint of ``Conv(., W)`` read with
the roles of the channel axes swapped, so the structure lives on axis 1 (the
output channels per group) and the kernel, exactly where :func:`search`
looks for it:

    W[i] = A(C, c) alpha[i] A(K, n)^T     (per spatial axis; alpha: C_in x c x n)

and the adjoint of ``SumPool`` followed by a small Conv is a small
ConvTranspose followed by the adjoint of ``SumPool``: the *full* sliding sum
``Y[t] = sum_{m < K-n+1} Z[t - m d]`` over space (an all-ones depthwise Conv
padded by ``(K-n) d`` on both sides) and, over channels,
``Y[o] = sum_{0 <= o-j <= C-c} Z[j]`` per group (a 0/1 1x1 Conv with weight
``A(C, c)``).

Pads.  Let ``F = s (x-1) + (K-1) d + 1`` be the uncropped output length of
the original along an axis and ``Y = F[b : F - e]`` what the node returns
(``b``, ``e`` from ``pads``, ``output_padding``, ``output_shape`` or
``auto_pad``; ``e < 0`` appends zeros, e.g. for ``output_padding``).  With
``w = (K-n) d``, the small ConvTranspose crops ``q_b = max(0, b - w)``
at the beginning and ``q_e = max(0, e - w)`` at the end, and the all-ones
Conv pads ``w - b + q_b`` and ``w - e + q_e``: every entry the cropped part
held lies outside what the output reads.  With no spatial pool (``n = K``)
those pads go on the channel spread (a 1x1 Conv), which then yields the
bias alone where the original appends zeros.

The spatial pool runs on the ``g c`` small channels, before the channel
spread; the last node carries the bias and the original output tensor.
Lowerings are fixed (:class:`.pools.SpatialPool` ``ones_conv``, then
:class:`.pools.ChannelSpread`): any rank,
dilation, group, opset and float dtype.  A BatchNormalization after a
ConvTranspose is left in place: it scales the structured axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ... import cost
from ...plan import CHANNEL_SUMS, Candidate, Part
from ...structure import Structure, effective_tol, fit_alpha, search, windows
from ..base import Emitter
from ..graphs import drop_if_unused
from .conv import (
    BoxChoice,
    LayerSite,
    Lowering,
    float_weight_problem,
    int_attr_tuple,
    read_node,
    search_weight_problem,
    static_dims,
)
from .pools import ChannelSpread, SpatialPool, count

OP_TYPE = "ConvTranspose"


@dataclass(kw_only=True)
class TransposeSite(LayerSite):
    """A ConvTranspose node, its constant weight and its output crops."""

    geometry: cost.TransposeGeometry | None = None
    dilations: tuple[int, ...] = ()
    #: ``(b_1..b_r, e_1..e_r)``: entries cut from the uncropped output's begin and end
    crops: tuple[int, ...] = ()


def output_crops(
    auto_pad: str,
    pads: tuple[int, ...],
    output_padding: tuple[int, ...],
    output_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    in_spatial: tuple[int, ...] | None,
) -> tuple[int, ...] | None:
    """``(b.., e..)`` such that the output is ``F[b : F - e]`` per axis, or None when
    they depend on an unknown input size.

    onnxruntime's rules (checked by the tests against its output): with
    ``output_shape`` or ``auto_pad`` SAME_* the total crop is
    ``T = F + output_padding - out`` (``out = output_shape``, or ``x s`` for
    SAME_*), split ``b = T // 2`` for SAME_UPPER and ``b = T - T // 2``
    otherwise (floor division, also for ``T < 0``); then ``e = T - b -
    output_padding``.  Explicit ``pads``: ``b = pad_begin``,
    ``e = pad_end - output_padding``.
    """
    rank = len(kernel)
    padding = output_padding or (0,) * rank
    if not output_shape and auto_pad in ("", "NOTSET", "VALID"):
        begins = (0,) * rank if auto_pad == "VALID" or not pads else pads[:rank]
        ends = (0,) * rank if auto_pad == "VALID" or not pads else pads[rank:]
        return tuple(begins) + tuple(e - p for e, p in zip(ends, padding))
    begins, ends = [], []
    for axis in range(rank):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        if in_spatial is None and not (strides[axis] == 1 and not output_shape):
            return None
        if output_shape:
            full = strides[axis] * (in_spatial[axis] - 1) + span
            total = full + padding[axis] - output_shape[axis]
        else:  # SAME_*: out = x s, so T = (K-1) d + 1 - s + output_padding
            total = span - strides[axis] + padding[axis]
        if total < 0 and not output_shape:  # onnxruntime 1.31 returns F uncropped here
            begin, total = 0, padding[axis]
        elif total < 0:  # output longer than the uncropped one: zeros appended at the end
            begin = 0
        else:
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin - padding[axis])
    return tuple(begins + ends)


def find(view, family: str) -> list[TransposeSite]:
    """Every ConvTranspose of the model, subgraphs included."""
    return [_site(family, owner, node, *view.shapes(owner))
            for owner, node in view.nodes()
            if node.op == OP_TYPE and node.domain in ("", "ai.onnx", None)]


def _site(family, graph, node, static_shapes, concrete_shapes) -> TransposeSite:
    weight, bias, _, info = read_node(node)
    site = TransposeSite(family=family, layers=(info,), graph=graph, node=node, weight=weight,
                         bias_size=int(bias.size) if bias is not None else 0)
    site.skip_reason = float_weight_problem(node, weight, bias) or search_weight_problem(weight)
    if site.skip_reason:
        return site
    rank = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    strides = int_attr_tuple(node, "strides", [1] * rank)
    site.dilations = int_attr_tuple(node, "dilations", [1] * rank)
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    static_in = static_shapes.get(x_name)
    crops = output_crops(
        str(node.attrs.get("auto_pad", "NOTSET")),
        int_attr_tuple(node, "pads", []),
        int_attr_tuple(node, "output_padding", []),
        int_attr_tuple(node, "output_shape", []),
        kernel, strides, site.dilations,
        static_dims(static_in[2:]) if static_in else None,
    )
    if crops is None:
        site.skip_reason = "output size depends on a dynamic input size (auto_pad SAME or output_shape)"
        return site
    site.crops = crops
    concrete_in = static_dims(concrete_shapes.get(x_name))
    concrete_out = static_dims(concrete_shapes.get(y_name))
    geom = site.geometry = cost.TransposeGeometry(
        in_channels=weight.shape[0],
        out_channels_per_group=weight.shape[1],
        group=int(node.attrs.get("group", 1)),
        kernel=kernel,
        strides=strides,
        in_spatial=concrete_in[2:] if concrete_in else None,
        out_spatial=concrete_out[2:] if concrete_out else None,
    )
    site.price([cost.conv_transpose_op(geom, geom.out_channels_per_group, kernel)], geom.positions)
    return site


@dataclass(frozen=True)
class TransposeLowered:
    """The pieces of ``site`` rewritten at ``sizes``: the small ConvTranspose's crops, the
    spatial pool (None when ``n = K``) and the channel spread (None when ``c = C``)."""

    small_crops: tuple[int, ...]
    spatial: SpatialPool | None
    spread: ChannelSpread | None

    @classmethod
    def of(cls, site: TransposeSite, sizes: tuple[int, ...]) -> TransposeLowered:
        geom = site.geometry
        rank = len(geom.kernel)
        under_c, under_k = sizes[0], tuple(sizes[1:])
        widths = [(k - n) * d for k, n, d in zip(geom.kernel, under_k, site.dilations)]
        begins, ends = list(site.crops[:rank]), list(site.crops[rank:])
        small_crops = [max(0, b - w) for b, w in zip(begins, widths)] + [
            max(0, e - w) for e, w in zip(ends, widths)]
        pads = tuple(w - b + q for w, b, q in zip(widths + widths, begins + ends, small_crops))
        spatial = spread = None
        if under_k != geom.kernel:
            spatial = SpatialPool("ones_conv", geom.group * under_c, windows(geom.kernel, under_k),
                                  site.dilations, pads)
            pads = (0,) * (2 * rank)
        if under_c != geom.out_channels_per_group:
            spread = ChannelSpread(geom.group, geom.out_channels_per_group, under_c, rank, pads)
        return cls(tuple(small_crops), spatial, spread)


def alpha_shape(site: TransposeSite, structure: Structure) -> tuple[int, ...]:
    """The small ConvTranspose's weight as :func:`emit` writes it: ``(C_in, c, n_1, .., n_r)``."""
    return (site.geometry.in_channels, *structure.sizes)


def candidate(site: TransposeSite, structure: Structure, family: str) -> Candidate:
    """``structure`` as a :class:`~sconv_onnx.plan.Candidate`: the small ConvTranspose, then
    the transposed sum-pool."""
    geom, sizes = site.geometry, structure.sizes
    lowered = TransposeLowered.of(site, sizes)
    under_k = tuple(sizes[1:])
    small = cost.conv_transpose_op(geom, sizes[0], under_k,
                                   kind="small" if under_k != geom.kernel else "dense")
    pieces = [("conv", small, count([alpha_shape(site, structure)]) + site.bias_size)]
    depth = 1 + structure.dof
    for kind, step, op in (("spatial pool", lowered.spatial, lambda s: s.op(1.0)),
                           ("channel spread", lowered.spread, lambda s: s.op())):
        if step is not None:
            pieces.append((kind, op(step), count(step.constant_shapes())))
            depth += step.depth
    parts = tuple(Part(kind, params, (op,), geom.positions) for kind, op, params in pieces)
    lowering = Lowering("matrix" if lowered.spread else None,
                        "ones_conv" if lowered.spatial else None)
    return Candidate(family=family, label=structure.label(), residual=structure.residual,
                     parts=parts, lowering=lowering.label(), payload=BoxChoice(structure, lowering),
                     rounding_depth=depth,
                     int8_risk=CHANNEL_SUMS if lowering.channel else "")


def candidates(site: TransposeSite, tol: float, family: str) -> list[Candidate]:
    """Every structure within ``tol``, fewest degrees of freedom first (one lowering each)."""
    tol = effective_tol(tol, site.layer.weight_dtype)
    trivial = tuple(site.weight.shape[1:])
    return [candidate(site, structure, family)
            for structure in search(site.weight, tol) if structure.sizes != trivial]


def emit(site: TransposeSite, choice: BoxChoice, emitter: Emitter) -> None:
    """Turn ``site``'s node into the small ConvTranspose and emit the pools after it.

    The node keeps its name; the last emitted node takes over its output
    tensor and its bias.  No pool is shared: each follows its own layer.
    """
    node, graph = emitter.node(site.node), emitter.graph_of(site.node)
    geom, sizes = site.geometry, choice.structure.sizes
    dtype = site.weight.dtype
    lowered = TransposeLowered.of(site, sizes)
    at = emitter.at(site.node, site.name)
    old_weight = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    output = node.outputs[0]
    small = gs.Variable(at.name("small_out"))
    node.outputs[0] = small
    while len(node.inputs) > 2:
        node.inputs.pop()
    alpha = fit_alpha(site.weight, sizes) if choice.alpha is None else choice.alpha
    assert alpha.shape == alpha_shape(site, choice.structure)
    node.inputs[1] = at.constant("alpha", alpha.astype(dtype))
    for key in ("auto_pad", "output_padding", "output_shape"):
        node.attrs.pop(key, None)
    node.attrs.update(kernel_shape=list(sizes[1:]), pads=list(lowered.small_crops),
                      strides=list(geom.strides), dilations=list(site.dilations), group=geom.group)
    x = small
    if lowered.spatial is not None:
        last = lowered.spread is None
        x = lowered.spatial.emit(at, x, dtype, bias=bias if last else None,
                                 output=output if last else None)
    if lowered.spread is not None:
        lowered.spread.emit(at, x, dtype, bias, output)
    # the small ConvTranspose must run first: move it before the nodes just emitted
    graph.nodes.remove(node)
    graph.nodes.insert(graph.nodes.index(small.outputs[0]), node)
    drop_if_unused(graph, old_weight)
