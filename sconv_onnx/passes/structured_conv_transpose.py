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
Lowerings are fixed (``ones_conv`` spatial, ``matrix`` channel): any rank,
dilation, group, opset and float dtype.  A BatchNormalization after a
ConvTranspose is left in place: it scales the structured axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import cost
from ..lowering import NodeEmitter, channel_spread_matrix, emit_spatial_pool
from ..plan import LayerPlan, Lowering, decide_by_cost
from ..structure import effective_tol, fit_alpha, is_float_dtype, narrowest_dtype, search
from .graphs import constant_value, drop_if_unused, stored_dtypes, walk
from .structured_conv import PlanContext, int_attr_tuple, static_dims

OP_TYPE = "ConvTranspose"


@dataclass
class TransposeSite:
    """A ConvTranspose node, its constant weight and its output crops."""

    graph: gs.Graph
    node: gs.Node
    name: str
    weight: np.ndarray | None
    bias_size: int
    geometry: cost.TransposeGeometry | None
    dilations: tuple[int, ...] = ()
    #: ``(b_1..b_r, e_1..e_r)``: entries cut from the uncropped output's begin and end
    crops: tuple[int, ...] = ()
    skip_reason: str | None = None


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


def find(graph: gs.Graph, static_shapes: dict, concrete_shapes: dict, opset: int) -> list[TransposeSite]:
    """Every ConvTranspose of ``graph`` and of its subgraphs."""
    sites = []
    for owner, node in walk(graph):
        if node.op == OP_TYPE and node.domain in ("", "ai.onnx", None):
            shapes = (static_shapes, concrete_shapes) if owner is graph else ({}, {})
            sites.append(_site(owner, node, *shapes))
    return sites


def _site(graph, node, static_shapes, concrete_shapes) -> TransposeSite:
    name = node.name or node.outputs[0].name
    weight = constant_value(node.inputs[1])
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias = constant_value(node.inputs[2]) if has_bias else None
    site = TransposeSite(graph, node, name, weight, int(bias.size) if bias is not None else 0, None)
    if weight is None:
        site.skip_reason = "weight is not a constant"
        return site
    if not is_float_dtype(weight.dtype):
        site.skip_reason = f"weight dtype {weight.dtype} is not floating point"
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
    site.geometry = cost.TransposeGeometry(
        in_channels=weight.shape[0],
        out_channels_per_group=weight.shape[1],
        group=int(node.attrs.get("group", 1)),
        kernel=kernel,
        strides=strides,
        in_spatial=concrete_in[2:] if concrete_in else None,
        out_spatial=concrete_out[2:] if concrete_out else None,
    )
    return site


def _lowering(geom: cost.TransposeGeometry, sizes: tuple[int, ...]) -> Lowering:
    return Lowering(
        "matrix" if sizes[0] != geom.out_channels_per_group else None,
        "ones_conv" if tuple(sizes[1:]) != geom.kernel else None,
    )


def plan(site: TransposeSite, context: PlanContext) -> LayerPlan:
    """The structure of least predicted cost (fewest MACs for ``select="all"``).

    ``select="measured"`` has no single-layer timing for ConvTranspose yet
    and decides by the cost model (said in the reason).
    """
    node = site.node
    layer = LayerPlan(node=site.name, op=node.op, group=int(node.attrs.get("group", 1)),
                      weight_shape=tuple(site.weight.shape) if site.weight is not None else ())
    if site.skip_reason:
        layer.reason = site.skip_reason
        return layer
    geom = site.geometry
    layer.params_before = int(site.weight.size) + site.bias_size
    before = cost.transpose_ops(geom, None)
    layer.cost_before = cost.total_cost(geom, before)
    layer.macs_before = cost.total_macs(geom, before)
    layer.weight_dtype = narrowest_dtype(site.weight.dtype, *stored_dtypes(site.node.inputs[1]))
    tol = effective_tol(context.tol, layer.weight_dtype)
    trivial = tuple(site.weight.shape[1:])
    nontrivial = [s for s in search(site.weight, tol) if s.sizes != trivial]
    if not nontrivial:
        layer.reason = f"no structure within tol {tol:g}"
        return layer
    layer.best = nontrivial[0]
    scored = []
    for structure in nontrivial:
        ops = cost.transpose_ops(geom, structure.sizes)
        macs = sum(op.macs for op in ops)
        scored.append((cost.total_cost(geom, ops), macs, structure, ops))
    scored.sort(key=lambda item: (item[1], item[0]) if context.select == "all" else item[:2])
    predicted, _, structure, ops = scored[0]
    layer.chosen, layer.lowering, layer.cost_after = structure, _lowering(geom, structure.sizes), predicted
    layer.macs_after = cost.total_macs(geom, ops)
    layer.params_after = _params_after(site, structure.sizes)
    note = " (not measured: no single-layer timing for ConvTranspose)" if (
        context.select == "measured") else ""
    decide_by_cost(layer, context.select, cost.GAIN_MARGIN, note)
    return layer


def _params_after(site: TransposeSite, sizes: tuple[int, ...]) -> int:
    geom = site.geometry
    small_channels = geom.group * sizes[0]
    count = geom.in_channels * int(np.prod(sizes)) + site.bias_size
    if tuple(sizes[1:]) != geom.kernel:
        count += small_channels * int(np.prod([k - n + 1 for k, n in zip(geom.kernel, sizes[1:])]))
    if sizes[0] != geom.out_channels_per_group:
        count += geom.out_channels * sizes[0]
    return count


def rewrite(site: TransposeSite, layer: LayerPlan, taken_names: set[str], pools: dict) -> None:
    """Turn ``site``'s node into the small ConvTranspose and emit the pools after it.

    The node keeps its name; the last emitted node takes over its output
    tensor and its bias.  ``pools`` is not used: no two ConvTranspose
    layers share a pool (it follows each of them).
    """
    node, geom, sizes = site.node, site.geometry, layer.chosen.sizes
    dtype = site.weight.dtype
    rank = len(geom.kernel)
    under_c, under_k = sizes[0], tuple(sizes[1:])
    widths = [(k - n) * d for k, n, d in zip(geom.kernel, under_k, site.dilations)]
    begins, ends = site.crops[:rank], site.crops[rank:]
    small_crops = [max(0, b - w) for b, w in zip(begins, widths)] + [
        max(0, e - w) for e, w in zip(ends, widths)]
    pool_pads = [w - b + q for w, b, q in zip(widths + widths, begins + ends, small_crops)]

    emitter = NodeEmitter(site.graph, node, site.name, taken_names)
    old_weight = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    output = node.outputs[0]
    small = gs.Variable(emitter.name("small_out"))
    node.outputs[0] = small
    while len(node.inputs) > 2:
        node.inputs.pop()
    node.inputs[1] = emitter.constant("alpha", fit_alpha(site.weight, sizes).astype(dtype))
    for key in ("auto_pad", "output_padding", "output_shape"):
        node.attrs.pop(key, None)
    node.attrs.update(kernel_shape=list(under_k), pads=small_crops, strides=list(geom.strides),
                      dilations=list(site.dilations), group=geom.group)

    x = small
    spread = under_c != geom.out_channels_per_group
    if under_k != geom.kernel:
        pooled = geom.group * under_c
        window = tuple(k - n + 1 for k, n in zip(geom.kernel, under_k))
        x = emit_spatial_pool(emitter, x, "ones_conv", pooled, window, site.dilations,
                              tuple(pool_pads), dtype, bias=None if spread else bias,
                              output=None if spread else output)
        pool_pads = [0] * (2 * rank)
    if spread:
        matrix = emitter.constant("channel_spread", channel_spread_matrix(
            geom.group, geom.out_channels_per_group, under_c, rank, dtype))
        inputs = [x, matrix] + ([bias] if bias is not None else [])
        attrs = {"group": geom.group, "kernel_shape": [1] * rank, "pads": pool_pads}
        emitter.node("Conv", "channel_spread", inputs, attrs, output=output)
    # the small ConvTranspose must run first: move it before the nodes just emitted
    site.graph.nodes.remove(node)
    site.graph.nodes.insert(site.graph.nodes.index(small.outputs[0]), node)
    drop_if_unused(site.graph, old_weight)
