"""Structured-convolution pass: find Conv layers, plan each one, rewrite it.

Interface shared by the passes: :func:`find` lists the candidate sites of a
graph, :func:`plan` decides each one (pure data, see :mod:`sconv_onnx.plan`)
and :func:`rewrite` emits the nodes for a site whose plan says ``rewrite``.

The rewrite of ``Conv(X, W; strides s, dilations d, pads p, group g)``
with ``W`` structured at ``(c, n)``:

    Conv(SumPool(X; window (C-c+1, K-n+1), stride 1, dilation d, pads p),
         alpha; kernel n, strides s, dilations d, group g, no pads)

with the original bias and output (DESIGN.md section 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import cost
from ..lowering import NodeEmitter, emit_channel_pool, emit_spatial_pool, pool_constant_count
from ..plan import KEEP, REWRITE, LayerPlan, Lowering
from ..structure import Structure, effective_tol, fit_alpha, is_float_dtype, narrowest_dtype, search
from .batchnorm import BatchNormFold, apply_fold, find_fold
from .graphs import constant_value, drop_if_unused, stored_dtypes, walk

OP_TYPE = "Conv"
#: Quantized convolutions: reported, never rewritten.
QUANTIZED_OPS = ("ConvInteger", "QLinearConv")
#: Opset from which AveragePool falls back to a slow reference kernel (DESIGN.md section 2).
AVGPOOL_SLOW_OPSET = 19
#: First opset with CumSum.
CUMSUM_OPSET = 11
#: Candidates (best predicted first) timed per layer by ``select="measured"``.
MEASURED_CANDIDATES = 4
#: A measured rewrite must run at most this fraction of the original's time.
MEASURED_MARGIN = 0.97
#: Another candidate replaces the cost model's choice only when it measured
#: below this fraction of that choice's time (single-layer timings vary by a
#: few percent from run to run and from isolation to the whole network).
MEASURED_SWITCH = 0.9


@dataclass
class ConvSite:
    """A Conv node and what is known about it."""

    graph: gs.Graph
    node: gs.Node
    name: str
    weight: np.ndarray | None
    bias_size: int
    geometry: cost.ConvGeometry | None
    opset: int
    skip_reason: str | None = None
    #: the BatchNormalization after the conv, folded into ``weight`` (see :mod:`.batchnorm`)
    batchnorm: BatchNormFold | None = None
    #: alpha to write instead of the weight-space least squares (data-aware, :mod:`..budget`)
    alpha: np.ndarray | None = None


def int_attr_tuple(node: gs.Node, key: str, default: list[int]) -> tuple[int, ...]:
    """Attribute ``key`` of ``node`` as a tuple of ints, or ``default``."""
    value = node.attrs.get(key)
    return tuple(int(v) for v in value) if value is not None else tuple(default)


def static_dims(dims) -> tuple[int, ...] | None:
    """``dims`` as a tuple when every one is a known int, else None."""
    if dims is None or any(not isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def resolve_pads(
    auto_pad: str,
    pads: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    in_spatial: tuple[int, ...] | None,
) -> tuple[int, ...] | None:
    """Explicit ``(begin.., end..)`` pads, or None when they depend on an unknown size.

    ``SAME_UPPER``/``SAME_LOWER`` pad ``total = max(0, (ceil(i/s) - 1) s + (K-1) d + 1 - i)``
    per axis, the odd element at the end (UPPER) or the beginning (LOWER).
    With stride 1, ``total = (K-1) d`` whatever the input size.
    """
    rank = len(kernel)
    if auto_pad in ("", "NOTSET"):
        return pads if pads else (0,) * (2 * rank)
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    begins, ends = [], []
    for axis in range(rank):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        if strides[axis] == 1:
            total = span - 1
        elif in_spatial is None:
            return None
        else:
            size = in_spatial[axis]
            total = max(0, (-(-size // strides[axis]) - 1) * strides[axis] + span - size)
        small, large = total // 2, total - total // 2
        begins.append(large if auto_pad == "SAME_LOWER" else small)
        ends.append(small if auto_pad == "SAME_LOWER" else large)
    return tuple(begins + ends)


def find(graph: gs.Graph, static_shapes: dict, concrete_shapes: dict, opset: int) -> list[ConvSite]:
    """Every Conv of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    sites: list[ConvSite] = []
    for owner, node in walk(graph):
        if node.domain not in ("", "ai.onnx", None):
            continue
        if node.op == OP_TYPE:
            shapes = (static_shapes, concrete_shapes) if owner is graph else ({}, {})
            sites.append(_site(owner, node, *shapes, opset))
        elif node.op in QUANTIZED_OPS:
            sites.append(ConvSite(owner, node, node.name or node.outputs[0].name, None, 0, None,
                                  opset, skip_reason=f"quantized layer ({node.op}): left as is"))
    return sites


def _site(graph, node, static_shapes, concrete_shapes, opset) -> ConvSite:
    name = node.name or node.outputs[0].name
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias_size = int(bias.size) if bias is not None else 0
    site = ConvSite(graph, node, name, weight, bias_size, None, opset)
    if weight is None:
        producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        quantized = producer is not None and producer.op == "DequantizeLinear"
        site.skip_reason = ("quantized weight (QDQ): left as is" if quantized
                            else "weight is not a constant")
        return site
    if not is_float_dtype(weight.dtype):
        site.skip_reason = f"weight dtype {weight.dtype} is not floating point"
        return site
    computed_bias = len(node.inputs) > 2 and node.inputs[2] is not None and bias is None
    if not computed_bias:
        site.batchnorm = find_fold(graph, node, weight, bias)
    if site.batchnorm is not None:
        site.weight, site.bias_size = site.batchnorm.weight, weight.shape[0]
        weight = site.weight
    rank = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    strides = int_attr_tuple(node, "strides", [1] * rank)
    dilations = int_attr_tuple(node, "dilations", [1] * rank)
    group = int(node.attrs.get("group", 1))
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    static_in = static_shapes.get(x_name)
    pads = resolve_pads(
        str(node.attrs.get("auto_pad", "NOTSET")),
        int_attr_tuple(node, "pads", []),
        kernel,
        strides,
        dilations,
        static_dims(static_in[2:]) if static_in else None,
    )
    if pads is None:
        site.skip_reason = "auto_pad SAME with stride > 1 on a dynamic input size"
        return site
    concrete_in = static_dims(concrete_shapes.get(x_name))
    concrete_out = static_dims(concrete_shapes.get(y_name))
    site.geometry = cost.ConvGeometry(
        out_channels=weight.shape[0],
        in_channels_per_group=weight.shape[1],
        group=group,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        in_spatial=concrete_in[2:] if concrete_in else None,
        out_spatial=concrete_out[2:] if concrete_out else None,
    )
    return site


def lowering_options(site: ConvSite, structure: Structure) -> list[Lowering]:
    """The sum-pool lowerings that are valid for ``site`` at ``structure``."""
    geom = site.geometry
    float32 = site.weight.dtype == np.float32
    channel: list[str | None] = [None]
    if structure.channels != geom.in_channels_per_group:
        channel = ["matrix"]
        # 2-D convs run in onnxruntime's blocked NCHWc layout and CumSum/Slice
        # do not: the layout conversions cost more than the matrix conv saves
        # (ResNet-18-B: 0.43x with CumSum vs 0.41x without; the audio model's
        # 1-D convs: 0.62x with CumSum vs 0.70x with the matrix)
        if geom.group == 1 and float32 and site.opset >= CUMSUM_OPSET and len(geom.kernel) != 2:
            channel.append("cumsum")
    spatial: list[str | None] = [None]
    window = tuple(k - n + 1 for k, n in zip(geom.kernel, structure.kernel))
    if structure.kernel != geom.kernel:
        spatial = ["ones_conv"]
        rank = len(window)
        avgpool_ok = (
            float32
            and rank == 2  # 1-D AveragePool measured slower than the all-ones conv (audio1d)
            and site.opset < AVGPOOL_SLOW_OPSET
            and all(d == 1 for d in geom.dilations)
            and all(geom.pads[i] < window[i] and geom.pads[rank + i] < window[i] for i in range(rank))
        )
        if avgpool_ok:
            spatial.insert(0, "avgpool")
    return [Lowering(c, s) for c in channel for s in spatial]


@dataclass
class PlanContext:
    """Settings and state shared by the plans of one model.

    ``shared_pools`` maps the key of every pool a planned rewrite emits to the
    node that emits it, so that a later layer reading the same tensor with
    the same pool reuses it (e.g. a ResNet block's 3x3 conv and its 1x1
    shortcut) and the cost model charges it once.  ``measurer`` times
    candidates for ``select="measured"``; ``excluded`` maps the names of
    layers that must be kept to the reason (the whole-model check of
    ``select="measured"``).
    """

    tol: float
    select: str
    shared_pools: dict = field(default_factory=dict)
    measurer: object | None = None
    excluded: dict[str, str] = field(default_factory=dict)


def pool_keys(site: ConvSite, structure: Structure, lowering: Lowering) -> dict[str, tuple]:
    """Keys that identify the channel and spatial pools of a candidate.

    Two layers with equal keys compute the same tensor: same input in the
    same (sub)graph, same lowering, same window (and, for the spatial pool,
    dilation and pads).  Layers in different graphs never share a pool: one
    If branch cannot read a tensor made in the other.
    """
    geom = site.geometry
    keys: dict[str, tuple] = {}
    source: tuple = (id(site.graph), site.node.inputs[0].name)
    if lowering.channel:
        source = keys["channel"] = (
            "channel", source, lowering.channel, geom.group, geom.in_channels_per_group,
            structure.channels,
        )
    if lowering.spatial:
        window = tuple(k - n + 1 for k, n in zip(geom.kernel, structure.kernel))
        keys["spatial"] = ("spatial", source, lowering.spatial, window, geom.dilations, geom.pads)
    return keys


def _shared(site, structure, lowering, context: PlanContext) -> frozenset[str]:
    keys = pool_keys(site, structure, lowering)
    return frozenset(kind for kind, key in keys.items() if key in context.shared_pools)


def plan(site: ConvSite, context: PlanContext) -> LayerPlan:
    """Decide ``site``: the structure, the lowering, and the reason.

    ``select="all"`` rewrites with the structure and lowering of fewest MACs
    (the pools' included) within ``tol``; ``select="cost"`` rewrites with the structure and lowering
    of least predicted cost, and only if that is below
    :data:`cost.GAIN_MARGIN` of the original; ``select="measured"`` times the
    cost model's best candidates on the layer's real shapes, keeps the cost
    model's choice unless another is clearly faster (:data:`MEASURED_SWITCH`),
    and rewrites only on a measured win (below :data:`MEASURED_MARGIN` of the
    original).
    """
    node = site.node
    layer = LayerPlan(
        node=site.name,
        op=node.op,
        weight_shape=tuple(site.weight.shape) if site.weight is not None else (),
        group=int(node.attrs.get("group", 1)),
    )
    if site.skip_reason:
        layer.reason = site.skip_reason
        return layer
    geom = site.geometry
    layer.params_before = int(site.weight.size) + site.bias_size
    before = cost.original_ops(geom)
    layer.cost_before = cost.total_cost(geom, before)
    layer.macs_before = cost.total_macs(geom, before)
    layer.weight_dtype = narrowest_dtype(site.weight.dtype, *stored_dtypes(site.node.inputs[1]))
    tol = effective_tol(context.tol, layer.weight_dtype)
    structures = search(site.weight, tol)
    trivial = tuple(site.weight.shape[1:])
    nontrivial = [s for s in structures if s.sizes != trivial]
    if not nontrivial:
        layer.reason = f"no structure within tol {tol:g}"
        return layer
    layer.best = nontrivial[0]
    scored = []
    for structure in nontrivial:
        for lowering in lowering_options(site, structure):
            shared = _shared(site, structure, lowering, context)
            ops = cost.lowered_ops(geom, structure.sizes, lowering.channel, lowering.spatial, shared)
            rank = sum(op.macs for op in ops) if context.select == "all" else structure.dof
            scored.append((cost.total_cost(geom, ops), rank, structure, lowering, ops, shared))
    # select=all: fewest MACs (the pools' included), then least cost; else least cost
    scored.sort(key=lambda item: (item[1], item[0]) if context.select == "all" else item[:2])
    choice = scored[0]
    measured = None
    if context.select == "measured" and context.measurer is not None and geom.in_spatial:
        top = scored[:MEASURED_CANDIDATES]
        ratios = context.measurer.ratios(site, [(item[2], item[3], item[5]) for item in top])
        fastest = min(range(len(top)), key=ratios.__getitem__)
        # switch away from the cost model's choice only on a clear measured advantage
        pick = fastest if ratios[fastest] < MEASURED_SWITCH * ratios[0] else 0
        measured, choice = ratios[pick], top[pick]
    _, _, structure, lowering, ops, shared = choice
    fill_choice(layer, site, structure, lowering, ops, shared)
    ratio = layer.cost_after / layer.cost_before
    layer.measured_ratio = measured
    sharing = f"; shares {'+'.join(sorted(shared))} pool" if shared else ""
    if context.select == "all":
        layer.decision = REWRITE
        layer.reason = f"select=all; predicted time {ratio:.2f}x{sharing}"
    elif measured is not None:
        won = measured <= MEASURED_MARGIN
        layer.decision = REWRITE if won else KEEP
        layer.reason = (
            f"measured {measured:.2f}x (predicted {ratio:.2f}x){sharing}" if won
            else f"no measured gain ({structure.label()} {lowering.label()}: {measured:.2f}x)"
        )
    elif ratio <= cost.GAIN_MARGIN:
        layer.decision = REWRITE
        layer.reason = f"predicted time {ratio:.2f}x{sharing}"
    else:
        layer.decision = KEEP
        layer.reason = f"no gain predicted ({structure.label()} {lowering.label()}: {ratio:.2f}x)"
    if context.select == "measured" and measured is None:
        layer.reason += " (not measured: input shape unknown)"
    if layer.rewritten and site.batchnorm is not None:
        layer.reason += f"; folds {site.batchnorm.node.name or 'BatchNormalization'}"
    if layer.rewritten and site.name in context.excluded:
        layer.decision, layer.reason = KEEP, context.excluded[site.name]
    if layer.rewritten:
        for key in pool_keys(site, structure, lowering).values():
            context.shared_pools.setdefault(key, site.name)
    return layer


def fill_choice(layer: LayerPlan, site: ConvSite, structure: Structure, lowering: Lowering,
                ops: list, shared: frozenset[str] = frozenset()) -> None:
    """Record ``structure`` lowered by ``lowering`` (its ``ops``) as ``layer``'s choice:
    predicted cost, MACs and params (the pools' constants included, unless ``shared``)."""
    geom = site.geometry
    layer.chosen, layer.lowering = structure, lowering
    layer.cost_after = cost.total_cost(geom, ops)
    layer.macs_after = cost.total_macs(geom, ops)
    layer.params_after = (
        geom.out_channels * structure.dof
        + site.bias_size
        + pool_constant_count(
            lowering.channel if "channel" not in shared else None,
            lowering.spatial if "spatial" not in shared else None,
            geom.group, geom.in_channels_per_group, structure.sizes, geom.kernel,
        )
    )


def cheapest_lowering(site: ConvSite, structure: Structure) -> tuple[Lowering, list]:
    """The lowering of least predicted cost for ``structure`` (no pool shared), and its ops."""
    scored = []
    for lowering in lowering_options(site, structure):
        ops = cost.lowered_ops(site.geometry, structure.sizes, lowering.channel, lowering.spatial,
                               frozenset())
        scored.append((cost.total_cost(site.geometry, ops), lowering, ops))
    _, lowering, ops = min(scored, key=lambda item: item[0])
    return lowering, ops


def rewrite(site: ConvSite, layer: LayerPlan, taken_names: set[str], pools: dict) -> None:
    """Replace ``site``'s Conv in place by sum-pool nodes and a Conv with alpha.

    ``pools`` maps pool keys (:func:`pool_keys`) to tensors already emitted
    for an earlier layer; new pools are added to it.
    """
    node, geom, structure, lowering = site.node, site.geometry, layer.chosen, layer.lowering
    dtype = site.weight.dtype
    rank = len(geom.kernel)
    window = tuple(k - n + 1 for k, n in zip(geom.kernel, structure.kernel))
    alpha = fit_alpha(site.weight, structure.sizes) if site.alpha is None else site.alpha
    if lowering.spatial == "avgpool":
        alpha = alpha * math.prod(window)
    emitter = NodeEmitter(site.graph, node, site.name, taken_names)
    keys = pool_keys(site, structure, lowering)
    old_weight = node.inputs[1]
    x = node.inputs[0]
    channels = geom.group * structure.channels if lowering.channel else geom.in_channels
    if lowering.channel and keys.get("spatial") not in pools:
        if keys["channel"] not in pools:
            pools[keys["channel"]] = emit_channel_pool(
                emitter, x, lowering.channel, geom.group, geom.in_channels_per_group,
                structure.channels, rank, dtype,
            )
        x = pools[keys["channel"]]
    conv_pads = geom.pads
    if lowering.spatial:
        if keys["spatial"] not in pools:
            pools[keys["spatial"]] = emit_spatial_pool(
                emitter, x, lowering.spatial, channels, window, geom.dilations, geom.pads, dtype
            )
        x = pools[keys["spatial"]]
        conv_pads = (0,) * (2 * rank)
    node.inputs[0] = x
    node.inputs[1] = emitter.constant("alpha", alpha.astype(dtype))
    node.attrs.pop("auto_pad", None)
    node.attrs["kernel_shape"] = list(structure.kernel)
    node.attrs["pads"] = list(conv_pads)
    node.attrs["strides"] = list(geom.strides)
    node.attrs["dilations"] = list(geom.dilations)
    node.attrs["group"] = geom.group
    drop_if_unused(site.graph, old_weight)
    if site.batchnorm is not None:
        apply_fold(site.graph, node, site.batchnorm, emitter.constant("bias", site.batchnorm.bias))
