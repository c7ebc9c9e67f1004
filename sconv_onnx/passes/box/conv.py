"""Box-structured Conv layers: find them, offer candidates, emit the chosen one.

The rewrite of ``Conv(X, W; strides s, dilations d, pads p, group g)``
with ``W`` structured at ``(c, n)``:

    Conv(SumPool(X; window (C-c+1, K-n+1), stride 1, dilation d, pads p),
         alpha; kernel n, strides s, dilations d, group g, no pads)

with the original bias and output (docs/DESIGN.md section 1); or, for a
stride-1 layer with spatial structure only, the spatial pool after the small
conv (``avgpool_after``, :mod:`.pools`: what int8 quantization holds best).  A candidate
is a structure within the tolerance and one of its valid lowerings
(:mod:`.pools`); its parts are the channel pool, the spatial pool (both
keyed, so that layers reading the same tensor share them) and the small
conv.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ... import cost
from ...plan import CHANNEL_SUMS, POOL_BEFORE, Candidate, Part
from ...structure import (
    Structure,
    effective_tol,
    fit_alpha,
    is_finite,
    is_float_dtype,
    narrowest_dtype,
    search,
    search_problem,
    windows,
)
from ..base import Emitter, LayerInfo, Site
from ..batchnorm import BatchNormFold, find_fold, set_bias, take_output
from ..graphs import (
    constant_value,
    drop_if_unused,
    not_constant_reason,
    reads_overridable,
    stored_dtypes,
)
from .pools import AFTER, ChannelMatrix, SpatialPool, WindowSum, count

OP_TYPE = "Conv"
#: Quantized convolutions: reported, never rewritten.
QUANTIZED_OPS = ("ConvInteger", "QLinearConv")
#: Opset from which AveragePool falls back to a slow reference kernel (docs/DESIGN.md section 2).
AVGPOOL_SLOW_OPSET = 19
#: First opset with CumSum.
CUMSUM_OPSET = 11


@dataclass(frozen=True)
class Lowering:
    """How the sum-pool is emitted (:mod:`.pools`).

    ``channel``: ``"cumsum"`` or ``"matrix"``, or None when no channel pooling;
    ``spatial``: ``"avgpool"``, ``"ones_conv"`` or ``"avgpool_after"``, or None.
    """

    channel: str | None
    spatial: str | None

    def label(self) -> str:
        parts = [p for p in (self.channel, self.spatial) if p]
        return "+".join(parts) if parts else "conv only"


@dataclass(frozen=True)
class BoxChoice:
    """A box family candidate's payload: the structure, its lowering, and the alpha to
    write (None: the weight-space least squares, :func:`~sconv_onnx.structure.fit_alpha`)."""

    structure: Structure
    lowering: Lowering
    alpha: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.structure.sizes

    def to_dict(self) -> dict:
        return {"sizes": list(self.structure.sizes),
                "lowering": {"channel": self.lowering.channel, "spatial": self.lowering.spatial}}


@dataclass(kw_only=True)
class LayerSite(Site):
    """One node of the box family: where it is, its constant weight (None when it is not
    one) and the size of the bias it keeps."""

    graph: gs.Graph
    node: gs.Node
    weight: np.ndarray | None = None
    bias_size: int = 0

    @property
    def name(self) -> str:
        return self.layer.node

    def price(self, ops: list[cost.OpCost], positions: int | None) -> None:
        """Complete the layer's info once its geometry is known: the weight's narrowest
        stored dtype, its params, and the layer as the cost model sees it."""
        stored = stored_dtypes(self.node.inputs[1])
        self.layers = (dataclasses.replace(
            self.layer, weight_dtype=narrowest_dtype(self.weight.dtype, *stored),
            params_before=int(self.weight.size) + self.bias_size, ops=tuple(ops),
            positions=positions),)


def read_node(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None, bool, LayerInfo]:
    """A layer node's constant weight and bias (None where not constant), whether it has a
    bias input, and the layer as the plan first shows it."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias = constant_value(node.inputs[2]) if has_bias else None
    info = LayerInfo(node.outputs[0].name, layer_name(node), node.op,
                     tuple(weight.shape) if weight is not None else (),
                     int(node.attrs.get("group", 1)))
    return weight, bias, has_bias, info


def operands_problem(node: gs.Node, weight: np.ndarray | None,
                     bias: np.ndarray | None) -> str | None:
    """Why the weight or bias of ``node`` (their constant values from :func:`read_node`)
    rule the layer out, or None.

    The weight must be a constant; the bias may be computed, but neither may be a
    graph input's default (an overridable initializer: the user may feed another
    value).  Neither may hold NaN or Inf: no structure fits such a weight, and
    the layer is left as it is.
    """
    if weight is None:
        return "weight " + (not_constant_reason(node.inputs[1]) if len(node.inputs) > 1
                            else "is missing")
    if bias is None and len(node.inputs) > 2 and reads_overridable(node.inputs[2]):
        return "bias " + not_constant_reason(node.inputs[2])
    if not is_finite(weight):
        return "weight holds NaN or Inf"
    if bias is not None and not is_finite(bias):
        return "bias holds NaN or Inf"
    return None


def float_weight_problem(node: gs.Node, weight: np.ndarray | None,
                         bias: np.ndarray | None) -> str | None:
    """Why a layer's weight cannot be factored (:func:`operands_problem`, or not
    floating point), or None."""
    if weight is not None and not is_float_dtype(weight.dtype):
        return f"weight dtype {weight.dtype} is not floating point"
    return operands_problem(node, weight, bias)


def search_weight_problem(weight: np.ndarray) -> str | None:
    """Why the search does not run on ``weight`` (as the search reads it), or None: a
    shape :func:`~sconv_onnx.structure.search_problem` refuses (no elements, too
    large), or all zeros (every structure fits exactly; the layer computes its bias
    alone, which a rewrite would only hide)."""
    problem = search_problem(weight.shape)
    if problem:
        return problem
    if not np.any(weight != 0):
        return "all-zero weight: every structure fits it (the layer outputs its bias alone)"
    return None


@dataclass(kw_only=True)
class ConvSite(LayerSite):
    """A Conv node and what is known about it."""

    geometry: cost.ConvGeometry | None = None
    opset: int = 0
    #: the BatchNormalization after the conv, folded into ``weight`` (see :mod:`..batchnorm`)
    batchnorm: BatchNormFold | None = None


def int_attr_tuple(node: gs.Node, key: str, default: list[int]) -> tuple[int, ...]:
    """Attribute ``key`` of ``node`` as a tuple of ints, or ``default``."""
    value = node.attrs.get(key)
    return tuple(int(v) for v in value) if value is not None else tuple(default)


def static_dims(dims) -> tuple[int, ...] | None:
    """``dims`` as a tuple when every one is a known int, else None."""
    if dims is None or any(not isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def layer_name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


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


def find(view, family: str) -> list[ConvSite]:
    """Every Conv of the model, subgraphs included, and every quantized conv (kept)."""
    sites: list[ConvSite] = []
    for owner, node in view.nodes():
        if node.domain not in ("", "ai.onnx", None):
            continue
        if node.op == OP_TYPE:
            sites.append(_site(family, owner, node, *view.shapes(owner), view.opset))
        elif node.op in QUANTIZED_OPS:
            info = LayerInfo(node.outputs[0].name, layer_name(node), node.op,
                             group=int(node.attrs.get("group", 1)))
            sites.append(ConvSite(family=family, layers=(info,), graph=owner, node=node,
                                  opset=view.opset,
                                  skip_reason=f"quantized layer ({node.op}): left as is"))
    return sites


def _site(family, graph, node, static_shapes, concrete_shapes, opset) -> ConvSite:
    weight, bias, has_bias, info = read_node(node)
    site = ConvSite(family=family, layers=(info,), graph=graph, node=node, weight=weight,
                    bias_size=int(bias.size) if bias is not None else 0, opset=opset)
    site.skip_reason = float_weight_problem(node, weight, bias)
    if weight is None:
        producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        if producer is not None and producer.op == "DequantizeLinear":
            site.skip_reason = "quantized weight (QDQ): left as is"
    site.skip_reason = site.skip_reason or search_weight_problem(weight)
    if site.skip_reason:
        return site
    if not (has_bias and bias is None):  # a computed bias cannot absorb a BatchNormalization
        site.batchnorm = find_fold(graph, node, weight, bias)
    if site.batchnorm is not None:
        site.weight, site.bias_size = site.batchnorm.weight, weight.shape[0]
    rank = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    strides = int_attr_tuple(node, "strides", [1] * rank)
    dilations = int_attr_tuple(node, "dilations", [1] * rank)
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    static_in = static_shapes.get(x_name)
    pads = resolve_pads(str(node.attrs.get("auto_pad", "NOTSET")), int_attr_tuple(node, "pads", []),
                        kernel, strides, dilations, static_dims(static_in[2:]) if static_in else None)
    if pads is None:
        site.skip_reason = "auto_pad SAME with stride > 1 on a dynamic input size"
        return site
    concrete_in = static_dims(concrete_shapes.get(x_name))
    concrete_out = static_dims(concrete_shapes.get(y_name))
    geom = site.geometry = cost.ConvGeometry(
        out_channels=weight.shape[0],
        in_channels_per_group=weight.shape[1],
        group=int(node.attrs.get("group", 1)),
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        in_spatial=concrete_in[2:] if concrete_in else None,
        out_spatial=concrete_out[2:] if concrete_out else None,
    )
    site.price(cost.original_ops(geom), geom.positions)
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
    if structure.kernel != geom.kernel:
        spatial = ["ones_conv"]
        window = windows(geom.kernel, structure.kernel)
        rank = len(window)
        if _avgpool_ok(site) and all(geom.pads[i] < window[i] and geom.pads[rank + i] < window[i]
                                     for i in range(rank)):
            spatial.insert(0, "avgpool")
        if pool_after_ok(site, structure):
            spatial.append(AFTER)
    # (a pool after the conv needs c = C: never with a channel pool, pool_after_ok)
    return [Lowering(c, s) for c in channel for s in spatial]


def _avgpool_ok(site: ConvSite) -> bool:
    """Whether ``site`` may pool with AveragePool: float32, 2-D (1-D AveragePool measured
    slower than the all-ones conv, audio1d), an opset where it runs on MLAS, no dilation."""
    geom = site.geometry
    return (site.weight.dtype == np.float32 and len(geom.kernel) == 2
            and site.opset < AVGPOOL_SLOW_OPSET and all(d == 1 for d in geom.dilations))


def pool_after_ok(site: ConvSite, structure: Structure) -> bool:
    """Whether the spatial pool may run after the small conv (``avgpool_after``): a
    spatial structure only (``c = C``), stride 1, and AveragePool allowed."""
    geom = site.geometry
    return (structure.kernel != geom.kernel
            and structure.channels == geom.in_channels_per_group
            and all(s == 1 for s in geom.strides) and _avgpool_ok(site))


@dataclass(frozen=True)
class ConvLowered:
    """The pieces of ``site`` rewritten at ``structure`` with ``lowering``: the pool steps
    (None where the axis keeps its size), their keys, and the small conv's input channels."""

    channel: ChannelMatrix | WindowSum | None
    spatial: SpatialPool | None
    keys: dict[str, tuple]
    small_channels: int

    @classmethod
    def of(cls, site: ConvSite, structure: Structure, lowering: Lowering) -> ConvLowered:
        """Two layers with equal keys compute the same tensor: same input in the same
        (sub)graph, same lowering, same window (and, for the spatial pool, dilation and
        pads).  Layers in different graphs never share a pool: one If branch cannot read
        a tensor made in the other."""
        geom = site.geometry
        rank = len(geom.kernel)
        keys: dict[str, tuple] = {}
        source: tuple = (id(site.graph), site.node.inputs[0].name)
        channel = spatial = None
        small_channels = geom.in_channels
        if lowering.channel:
            small_channels = geom.group * structure.channels
            if lowering.channel == "matrix":
                channel = ChannelMatrix(geom.group, geom.in_channels_per_group, structure.channels,
                                        rank)
            else:
                channel = WindowSum(1, geom.in_channels_per_group, structure.channels)
            source = keys["channel pool"] = ("channel", source, lowering.channel, geom.group,
                                             geom.in_channels_per_group, structure.channels)
        if lowering.spatial == AFTER:  # the layer's own output: shared with no one
            spatial = SpatialPool(AFTER, geom.out_channels, windows(geom.kernel, structure.kernel),
                                  geom.dilations, (0,) * (2 * rank))
        elif lowering.spatial:
            window = windows(geom.kernel, structure.kernel)
            spatial = SpatialPool(lowering.spatial, small_channels, window, geom.dilations,
                                  geom.pads)
            keys["spatial pool"] = ("spatial", source, lowering.spatial, window, geom.dilations,
                                    geom.pads)
        return cls(channel, spatial, keys, small_channels)


def alpha_shape(site: ConvSite, structure: Structure) -> tuple[int, ...]:
    """The small conv's weight as :func:`emit` writes it: ``(O, c, n_1, .., n_r)``."""
    return (site.geometry.out_channels, *structure.sizes)


def candidate(site: ConvSite, structure: Structure, lowering: Lowering, family: str,
              alpha: np.ndarray | None = None, approximate: bool = False) -> Candidate:
    """``structure`` lowered by ``lowering`` as a :class:`~sconv_onnx.plan.Candidate`."""
    geom = site.geometry
    lowered = ConvLowered.of(site, structure, lowering)
    full_positions = geom.input_positions
    parts = []
    depth = 1  # alpha, rounded to the weight's dtype
    if lowered.channel is not None:
        step = lowered.channel
        op = (step.op(full_positions) if isinstance(step, ChannelMatrix)
              else step.op(geom.in_channels * full_positions))
        parts.append(Part("channel pool", count(step.constant_shapes()), (op,), geom.positions,
                          lowered.keys["channel pool"]))
        depth += step.depth
    small_positions = 1.0  # where the small conv writes, per output position
    if lowered.spatial is not None:
        step = lowered.spatial
        after = step.method == AFTER
        if after:  # it reads the small conv's wider output, writes the layer's
            small_positions = geom.unpooled_positions(step.window)
            op = step.op(1.0, reads=small_positions)
        else:
            op = step.op(geom.pooled_positions(step.window))
        parts.append(Part("spatial pool", count(step.constant_shapes()), (op,), geom.positions,
                          lowered.keys.get("spatial pool")))
        depth += step.depth
    small = cost.conv_op(geom.out_channels, structure.channels, lowered.small_channels,
                         structure.kernel, full_positions, small_positions,
                         kind="small" if structure.kernel != geom.kernel else "dense")
    parts.append(Part("conv", count([alpha_shape(site, structure)]) + site.bias_size, (small,),
                      geom.positions))
    depth += structure.dof
    absorbs = (site.batchnorm.node.name or "BatchNormalization",) if site.batchnorm else ()
    return Candidate(family=family, label=structure.label(), residual=structure.residual,
                     parts=tuple(parts), lowering=lowering.label(),
                     payload=BoxChoice(structure, lowering, alpha), rounding_depth=depth,
                     absorbs=absorbs, approximate=approximate,
                     int8_risk=_int8_risk(site, structure, lowering))


def _int8_risk(site: ConvSite, structure: Structure, lowering: Lowering) -> str:
    """Why int8 would not hold ``lowering`` (:attr:`~sconv_onnx.plan.Candidate.int8_risk`):
    a channel pool; a spatial pool before the small conv where one after it would do."""
    if lowering.channel:
        return CHANNEL_SUMS
    if lowering.spatial not in (None, AFTER) and pool_after_ok(site, structure):
        return POOL_BEFORE
    return ""


def candidates(site: ConvSite, tol: float, family: str) -> list[Candidate]:
    """Every structure within ``tol`` (fewest degrees of freedom first) with each valid lowering."""
    tol = effective_tol(tol, site.layer.weight_dtype)
    trivial = tuple(site.weight.shape[1:])
    return [candidate(site, structure, lowering, family)
            for structure in search(site.weight, tol) if structure.sizes != trivial
            for lowering in lowering_options(site, structure)]


def emit(site: ConvSite, choice: BoxChoice, emitter: Emitter) -> None:
    """Replace ``site``'s Conv by sum-pool nodes and a Conv with alpha (pools shared by key)."""
    node, graph = emitter.node(site.node), emitter.graph_of(site.node)
    geom, structure, lowering = site.geometry, choice.structure, choice.lowering
    dtype = site.weight.dtype
    rank = len(geom.kernel)
    lowered = ConvLowered.of(site, structure, lowering)
    alpha = fit_alpha(site.weight, structure.sizes) if choice.alpha is None else choice.alpha
    assert alpha.shape == alpha_shape(site, structure)
    if lowered.spatial is not None and lowered.spatial.averages:
        alpha = alpha * math.prod(lowered.spatial.window)
    at = emitter.at(site.node, site.name)
    old_weight = node.inputs[1]
    x = node.inputs[0]
    spatial_key = lowered.keys.get("spatial pool")
    if lowered.channel is not None and not emitter.has(spatial_key):
        step = lowered.channel
        x = emitter.shared(lowered.keys["channel pool"], lambda: (
            step.emit(at, x, dtype) if isinstance(step, ChannelMatrix)
            else step.emit(at, x, "channel_pool")))
    conv_pads = geom.pads
    after = lowered.spatial is not None and lowered.spatial.method == AFTER
    if lowered.spatial is not None and not after:
        x = emitter.shared(spatial_key, lambda: lowered.spatial.emit(at, x, dtype))
        conv_pads = (0,) * (2 * rank)
    node.inputs[0] = x
    node.inputs[1] = at.constant("alpha", alpha.astype(dtype))
    node.attrs.pop("auto_pad", None)
    node.attrs["kernel_shape"] = list(structure.kernel)
    node.attrs["pads"] = list(conv_pads)
    node.attrs["strides"] = list(geom.strides)
    node.attrs["dilations"] = list(geom.dilations)
    node.attrs["group"] = geom.group
    drop_if_unused(graph, old_weight)
    last = lowered.spatial.emit_after(at, node) if after else node
    if site.batchnorm is not None:  # an average of a per-channel constant is that constant
        set_bias(graph, node, at.constant("bias", site.batchnorm.bias))
        take_output(graph, last, emitter.node(site.batchnorm.node))
