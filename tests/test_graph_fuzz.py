"""Graph fuzzer: small hypothesis-built models go through ``optimize`` and stay equivalent.

A model is a 4-D float input (static or dynamic batch), a chain of blocks,
then a head:

* a Conv with random attributes (kernel 1..3 per axis, stride and dilation
  1..2, no/explicit/"same" pads or ``auto_pad``, one group, two groups or
  depthwise, with or without bias and ``kernel_shape``), maybe followed by a
  BatchNormalization (constant statistics; sometimes a second reader of the
  conv output or computed statistics, so it must not be folded) and a Relu;
* two arms (identity or "same"-padded convs) merged by Add or Concat;
* an ``If`` (condition: a bool input, scalar or ``[1]``, or a constant)
  whose branches each hold convs, sometimes another ``If`` in the then branch;
* a head: Flatten/Reshape, then Gemm (``transA``, ``transB``, ``alpha``,
  ``beta``, with or without ``C``) or MatMul (2-D or with a leading dim),
  one or two layers or one in each branch of an ``If``; or the 4-D tensor
  as is.

Weights are exactly structured or random, initializers or ``Constant``
nodes; in some models one weight holds an Inf or a NaN (:func:`poisoned`).  Sometimes one weight tensor (or BN statistics) is read by two
layers, across ``If`` branches too: the weights of a branch's layers may
live in the enclosing graph.  Arms and branches are sometimes twins (the
same conv geometry on the same input), so rewrites share sum-pools.

The generator records what it planted in every weighted layer, so the test
checks that ``optimize`` finds each planted structure and that whatever it
finds is real, as well as that ``select="all"`` (which rewrites every
structured layer) and ``select="cost"`` both give a valid model that
onnxruntime runs to the same outputs on the test's own inputs.  A layer whose
weight holds NaN or Inf is left alone; the run then either verifies (and the
outputs agree wherever the original's are finite) or fails verification on
the non-finite outputs alone, never on a wrong rewrite.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from conv_models import IR_FOR_OPSET, ConvSpec
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from sconv_onnx.models.common import GraphBuilder, plain_weight, structured_weight

import sconv_onnx
from sconv_onnx.errors import VerificationError
from sconv_onnx.structure import is_finite, relative_residual
from sconv_onnx.verify import random_feeds

#: About 0.1 s an example on 2 cores: the default keeps this file near 20 s.
EXAMPLES = int(os.environ.get("SCONV_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Bound on ``max|y0 - y1| / max|y0|`` between original and rewritten model (float32).
MAX_REL_ERROR = 1e-4
#: The scale of that bound never goes below this: the fuzzed weights and inputs are of
#: order 1, so an output that cancels to almost nothing (a single Gemm output of 2e-3
#: with an error of 2.2e-7, seen in CI) still carries the rounding of order-1 values.
MIN_SCALE = 1e-2
#: A structure the optimizer reports must fit the planted weight this well
#: (a BN fold scales filters, which keeps an exact structure exact).
FOUND_RESIDUAL = 1e-3
#: Widest activation: keeps models (and the Gemm weights after Concat) small.
MAX_CHANNELS = 8
#: One new weight in this many gets an Inf or a NaN entry, at most one per model (about
#: one model in five).
POISON_ODDS = 16


@dataclass
class Planted:
    """What the generator put in one weighted layer (Conv, Gemm or MatMul)."""

    #: the weight as the pass sees it: ``O x C x K..`` for a Conv, ``OUT x IN`` for Gemm/MatMul
    weight: np.ndarray
    #: the structure it was built with; None for a random weight (or a trivial structure)
    sizes: tuple[int, ...] | None
    #: False where the pass must skip the layer: auto_pad SAME with stride > 1 in an
    #: If branch, whose input size the pass does not know; None where it may (after a
    #: Loop, whose output sizes onnx infers in some models only)
    findable: bool | None = True


@dataclass
class Act:
    """A 4-D activation: tensor name, channels and spatial size (the batch is the model's)."""

    name: str
    channels: int
    spatial: tuple[int, int]


class Fuzz:
    """State of one generated model, shared by the scopes of all its graphs."""

    def __init__(self, seed: int, batch: int | str):
        self.rng = np.random.default_rng(seed)
        self.batch = batch  # an int, or "N" for a dynamic batch
        self.count = 0
        self.planted: dict[str, Planted] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.extra_outputs: list[onnx.ValueInfoProto] = []
        self.poisoned = False  # whether a weight holds an Inf or a NaN (:func:`poisoned`)
        #: a ``Loop`` was built: onnx infers its outputs' rank, not their sizes
        self.sizes_unknown = False

    def value_info(self, act: Act) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(
            act.name, TensorProto.FLOAT, [self.batch, act.channels, *act.spatial]
        )


class Scope(GraphBuilder):
    """One graph being built, the main graph or an ``If`` branch (``outer`` set).

    Names are unique across the whole model.  Constants that later layers
    may read again (weights, BN statistics) are registered under a key, and
    layers here and in inner scopes can find them.
    """

    def __init__(self, fuzz: Fuzz, name: str, outer: Scope | None = None):
        super().__init__(name)
        self.fuzz = fuzz
        self.outer = outer
        self.shared: dict[tuple, list] = {}

    def fresh(self, prefix: str) -> str:
        self.fuzz.count += 1
        return f"{prefix}{self.fuzz.count}"

    def register(self, key: tuple, entry) -> None:
        self.shared.setdefault(key, []).append(entry)

    def visible(self, key: tuple) -> list:
        """Entries registered under ``key`` here and in the enclosing scopes."""
        scope, found = self, []
        while scope is not None:
            found += scope.shared.get(key, [])
            scope = scope.outer
        return found

    def stored(self, prefix: str, array: np.ndarray, as_node: bool) -> str:
        """``array`` as an initializer or as a ``Constant`` node's output."""
        if not as_node:
            return self.constant(prefix, array)
        name = self.fresh(prefix)
        value = numpy_helper.from_array(array)  # unnamed, as exporters write them
        self.nodes.append(helper.make_node("Constant", [], [name], value=value))
        return name

    def layer(self, op_type: str, inputs: list[str], named: bool, planted: Planted | None = None,
              **attrs) -> str:
        """A node whose output is fresh; unnamed unless ``named``.  A weighted layer's
        ``planted`` is recorded under the name the passes give it (else its output's)."""
        out = self.fresh(op_type.lower())
        name = out + "_node" if named else ""
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        if planted is not None:
            self.fuzz.planted[name or out] = planted
        return out


# ---------------------------------------------------------------------------
# Conv geometry and weights
# ---------------------------------------------------------------------------


def conv_output_spatial(spec: ConvSpec) -> tuple[int, ...]:
    """Output spatial size of a 2-D conv ``spec`` (ONNX's formulas)."""
    strides = spec.strides or (1, 1)
    dilations = spec.dilations or (1, 1)
    pads = spec.pads or (0, 0, 0, 0)
    out = []
    for axis, size in enumerate(spec.spatial):
        span = (spec.kernel[axis] - 1) * dilations[axis] + 1
        if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[axis]))
        else:
            total = 0 if spec.auto_pad == "VALID" else pads[axis] + pads[2 + axis]
            out.append((size + total - span) // strides[axis] + 1)
    return tuple(out)


@st.composite
def pads_for(draw, spans: tuple[int, int], spatial: tuple[int, int], dilated: bool,
             keep_size: bool) -> dict:
    """``pads``/``auto_pad`` for a conv of extent ``spans``.

    ``keep_size``: "same" padding, total ``span - 1`` per axis split at random
    or ``auto_pad`` SAME: the output is ``ceil(size / stride)`` whatever the
    kernel, so two arms with equal strides have equal shapes.
    """
    modes = ["split"]
    if not dilated:  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER"
        modes += ["SAME_UPPER", "SAME_LOWER"]
    if not keep_size:
        modes += ["explicit"]
        if all(span <= size for span, size in zip(spans, spatial)):
            modes += ["none", "VALID"]
    mode = draw(st.sampled_from(modes))
    if mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return {"auto_pad": mode}
    if mode == "none":
        return {}
    begins = [draw(st.integers(0, span - 1)) for span in spans]
    if mode == "split":
        ends = [span - 1 - b for span, b in zip(spans, begins)]
    else:
        ends = [draw(st.integers(0, span - 1)) for span in spans]
        # at least one output position
        ends = [max(e, span - size - b) for span, size, b, e in zip(spans, spatial, begins, ends)]
    padding = {"pads": tuple(begins + ends)}
    if draw(st.integers(0, 3)) == 0:
        padding["auto_pad"] = "NOTSET"  # the default, spelled out
    return padding


@st.composite
def conv_specs(draw, x: Act, *, keep_size: bool = False, strides: tuple[int, int] | None = None,
               out_channels: int | None = None) -> ConvSpec:
    """Geometry and attributes of a 2-D Conv reading ``x`` (no weight values).

    One group, two groups or depthwise (channel multiplier 1 or 2); fixed
    ``strides`` and ``out_channels`` when given (arms that must merge).
    """
    channels = x.channels
    groups = [1] + ([2] if channels % 2 == 0 and channels > 2 else []) + ([channels] if channels > 1 else [])
    if out_channels is not None:
        groups = [g for g in groups if out_channels % g == 0]
    group = draw(st.sampled_from(groups))
    if out_channels is None:
        out_channels = group * draw(st.integers(1, max(1, MAX_CHANNELS // group)))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    strides = strides or (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    spans = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    padding = draw(pads_for(spans, x.spatial, any(d > 1 for d in dilations), keep_size))
    extra = {"kernel_shape": list(kernel)} if draw(st.booleans()) else {}
    return ConvSpec(
        in_per_group=channels // group, out_channels=out_channels, group=group, kernel=kernel,
        spatial=x.spatial,
        strides=strides if strides != (1, 1) or draw(st.booleans()) else None,
        dilations=dilations if dilations != (1, 1) or draw(st.booleans()) else None,
        pads=padding.get("pads"), auto_pad=padding.get("auto_pad"), bias=draw(st.booleans()),
        weight_as_constant_node=draw(st.booleans()), extra_attrs=extra,
    )


def new_weight(rng: np.random.Generator, shape: tuple[int, ...], sizes: tuple[int, ...] | None):
    """A He-scaled float32 weight: random, or exactly structured at ``sizes``."""
    if sizes is None:
        return plain_weight(rng, shape)
    weight = structured_weight(rng, shape, sizes)
    # structured_weight divides by the weight's std: all entries equal (one filter,
    # every size 1) blow up to ~1e12; scale those like a random weight instead
    if np.ptp(weight) == 0:
        weight = np.full(shape, np.sqrt(2.0 / math.prod(shape[1:])) * rng.choice([-1, 1]), np.float32)
    return weight


def poisoned(fuzz: Fuzz, weight: np.ndarray) -> np.ndarray:
    """``weight``, or one time in :data:`POISON_ODDS` (once per model) a copy with one
    entry +-Inf or NaN: a careless export the pass must leave alone.  Decided by the
    model's seeded generator (hypothesis draws favour their bounds: drawn odds of 1 in
    24 poisoned a third of the models)."""
    if fuzz.poisoned or fuzz.rng.integers(POISON_ODDS) != 0:
        return weight
    fuzz.poisoned = True
    weight = weight.copy()
    weight.flat[fuzz.rng.integers(weight.size)] = fuzz.rng.choice([np.inf, -np.inf, np.nan])
    return weight


@st.composite
def structure_sizes(draw, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Random underlying sizes for ``shape``, two times in three (None: a random weight, or a
    trivial structure)."""
    if draw(st.integers(0, 2)) == 0:
        return None
    sizes = tuple(draw(st.integers(1, size)) for size in shape[1:])
    return None if sizes == tuple(shape[1:]) else sizes


@st.composite
def home_of(draw, scope: Scope) -> Scope:
    """Where a new constant of a layer in ``scope`` lives: there, or for a layer in an ``If``
    branch sometimes in the enclosing graph (then the other branch can read it too)."""
    if scope.outer is None or draw(st.booleans()):
        return scope
    return scope.outer


@st.composite
def reused(draw, scope: Scope, key: tuple):
    """A visible entry registered under ``key``, one time in three; else None."""
    entries = scope.visible(key)
    if entries and draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(entries))
    return None


@st.composite
def conv_weights(draw, scope: Scope, shape: tuple[int, ...], as_node: bool, like=None):
    """``(tensor name, weight, sizes)``: a visible weight of this shape read again,
    a new tensor with the values of ``like`` (a twin's ``(weight, sizes)``), or a new weight."""
    key = ("conv", shape)
    entry = draw(reused(scope, key))
    if entry is not None:
        return entry
    if like is not None and draw(st.booleans()):
        weight, sizes = like
    else:
        sizes = draw(structure_sizes(shape))
        weight = poisoned(scope.fuzz, new_weight(scope.fuzz.rng, shape, sizes))
    home = draw(home_of(scope))
    entry = (home.stored("w", weight, as_node), weight, sizes)
    home.register(key, entry)
    return entry


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


@st.composite
def batchnorm(draw, scope: Scope, z: Act) -> Act:
    """``BatchNormalization(z)``; foldable unless a second reader of ``z`` or computed
    statistics.  The statistics are sometimes another BN's."""
    rng, channels = scope.fuzz.rng, z.channels
    names = draw(reused(scope, ("bn", channels)))
    if names is None:
        stats = [rng.uniform(0.5, 2.0, channels), 0.1 * rng.standard_normal(channels),
                 0.1 * rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)]
        as_node, home = draw(st.booleans()), draw(home_of(scope))
        names = [home.stored("bn", value.astype(np.float32), as_node) for value in stats]
        home.register(("bn", channels), names)
    names = list(names)
    blocker = draw(st.sampled_from(["none", "none", "output", "add", "computed"]))
    if blocker == "computed":  # a scale computed by a node is no constant
        names[0] = scope.op("Abs", [names[0]], "bn_scale")
    if blocker == "output" and scope.outer is None:
        scope.fuzz.extra_outputs.append(scope.fuzz.value_info(z))
    epsilon = draw(st.sampled_from([1e-5, 1e-3]))
    out = scope.layer("BatchNormalization", [z.name, *names], draw(st.booleans()), epsilon=epsilon)
    if blocker == "add":
        out = scope.op("Add", [out, z.name], "bn_plus_conv")
    return Act(out, z.channels, z.spatial)


@dataclass
class ConvMade:
    """A conv the generator made: geometry and weight, for a twin to copy."""

    spec: ConvSpec
    weight: np.ndarray
    sizes: tuple[int, ...] | None


@st.composite
def conv_block(draw, scope: Scope, x: Act, twin: ConvMade | None = None,
               **geometry) -> tuple[Act, ConvMade]:
    """A Conv (see :func:`conv_specs`; the geometry of ``twin`` if given), maybe followed by
    BatchNormalization and Relu."""
    spec = twin.spec if twin is not None else draw(conv_specs(x, **geometry))
    like = (twin.weight, twin.sizes) if twin is not None else None
    weight_name, weight, sizes = draw(
        conv_weights(scope, spec.weight_shape, spec.weight_as_constant_node, like)
    )
    inputs = [x.name, weight_name]
    if spec.bias:
        bias = (0.1 * scope.fuzz.rng.standard_normal(spec.out_channels)).astype(np.float32)
        inputs.append(scope.stored("b", bias, draw(st.booleans())))
    elif draw(st.integers(0, 3)) == 0:
        inputs.append("")  # an omitted optional input, spelled out
    attrs = {"group": spec.group, **spec.extra_attrs}
    for key in ("strides", "dilations", "pads", "auto_pad"):
        value = getattr(spec, key)
        if value is not None:
            attrs[key] = value if key == "auto_pad" else list(value)
    same_strided = (spec.auto_pad or "").startswith("SAME") and any(s > 1 for s in spec.strides or ())
    findable = not (scope.outer is not None and same_strided)
    if findable and scope.fuzz.sizes_unknown and same_strided:
        findable = None  # onnx tells a Loop's output sizes in some models, not in others
    planted = Planted(weight, sizes, findable=findable)
    out = scope.layer("Conv", inputs, draw(st.booleans()), planted, **attrs)
    y = Act(out, spec.out_channels, conv_output_spatial(spec))
    if draw(st.integers(0, 2)) == 0:
        y = draw(batchnorm(scope, y))
    if draw(st.booleans()):
        y = Act(scope.op("Relu", [y.name], "relu"), y.channels, y.spatial)
    return y, ConvMade(spec, weight, sizes)


@st.composite
def conv_arm(draw, scope: Scope, x: Act, strides: tuple[int, int], out_channels: int | None,
             min_depth: int = 0, twin: list[ConvMade] | None = None) -> tuple[Act, list[ConvMade]]:
    """0..2 "same"-padded conv blocks from ``x``; the first has ``strides``, the last ``out_channels``.

    Depth 0 (identity) only where that gives the arm's shape.  A ``twin`` arm
    (another arm's convs, from the same ``x``) repeats its geometry: both
    convs may then share a weight and a sum-pool.
    """
    identity_ok = strides == (1, 1) and out_channels in (None, x.channels)
    if twin is not None:
        depth = len(twin)
    else:
        depth = draw(st.integers(max(min_depth, 0 if identity_ok else 1), 2))
    y, made = x, []
    for i in range(depth):
        y, conv = draw(conv_block(scope, y, twin=twin[i] if twin else None, keep_size=True,
                                  strides=strides if i == 0 else (1, 1),
                                  out_channels=out_channels if i == depth - 1 else None))
        made.append(conv)
    return y, made


@st.composite
def arm_pair(draw, scopes: tuple[Scope, Scope], x: Act, strides: tuple[int, int],
             out_channels: int | None, min_depth: int = 0) -> list[Act]:
    """Two arms from ``x`` (built in ``scopes``), the second sometimes the first's twin."""
    first, made = draw(conv_arm(scopes[0], x, strides, out_channels, min_depth))
    twin = made if draw(st.booleans()) else None
    second, _ = draw(conv_arm(scopes[1], x, strides, out_channels, min_depth, twin))
    return [first, second]


@st.composite
def merged_arms(draw, scope: Scope, x: Act) -> Act:
    """Two arms from ``x`` merged by Add (equal shapes) or Concat along the channels."""
    merge = draw(st.sampled_from(["Add", "Concat"]))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    out_channels = draw(st.integers(1, MAX_CHANNELS)) if merge == "Add" else None
    arms = draw(arm_pair((scope, scope), x, strides, out_channels))
    channels = arms[0].channels if merge == "Add" else sum(arm.channels for arm in arms)
    attrs = {"axis": 1} if merge == "Concat" else {}
    out = scope.op(merge, [arm.name for arm in arms], merge.lower(), **attrs)
    return Act(out, channels, arms[0].spatial)


@st.composite
def condition(draw, scope: Scope) -> str:
    """A bool condition: the model input ``cond`` or a constant (initializer or Constant node)."""
    fuzz = scope.fuzz
    if draw(st.booleans()):
        if not any(inp.name == "cond" for inp in fuzz.inputs):
            shape = draw(st.sampled_from([[], [1]]))
            fuzz.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, shape))
        return "cond"
    value = np.array(draw(st.booleans()))
    if draw(st.booleans()):
        value = value.reshape(1)
    return scope.stored("cond_const", value, draw(st.booleans()))


def branch_scopes(scope: Scope) -> tuple[Scope, Scope]:
    """Scopes for the then and else branches of an ``If`` in ``scope``."""
    return Scope(scope.fuzz, scope.fresh("then"), scope), Scope(scope.fuzz, scope.fresh("else"), scope)


@st.composite
def if_node(draw, scope: Scope, branches: tuple[Scope, Scope], outputs: list) -> str:
    """The ``If`` node over two built branch scopes with output value infos ``outputs``."""
    cond = draw(condition(scope))
    graphs = [helper.make_graph(inner.nodes, inner.name, [], [out], inner.initializers)
              for inner, out in zip(branches, outputs)]
    return scope.layer("If", [cond], draw(st.booleans()), then_branch=graphs[0], else_branch=graphs[1])


@st.composite
def if_block(draw, scope: Scope, x: Act, strides: tuple[int, int] | None = None,
             out_channels: int | None = None) -> Act:
    """An ``If`` whose then and else branches each hold 1..2 convs reading ``x``.

    In the main graph, the then branch sometimes ends with an ``If`` of its
    own (keeping the shape), whose branches read tensors of both enclosing graphs.
    """
    strides = strides or (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    out_channels = out_channels or draw(st.integers(1, MAX_CHANNELS))
    branches = branch_scopes(scope)
    arms = draw(arm_pair(branches, x, strides, out_channels, min_depth=1))
    if scope.outer is None and draw(st.integers(0, 3)) == 0:
        arms[0] = draw(if_block(branches[0], arms[0], (1, 1), out_channels))
    out = draw(if_node(scope, branches, [scope.fuzz.value_info(arm) for arm in arms]))
    return Act(out, out_channels, arms[0].spatial)


@st.composite
def loop_block(draw, scope: Scope, x: Act) -> Act:
    """A ``Loop`` over ``x`` that runs 0 or 1 times; its body is a "same" conv arm keeping
    the shape.  Run 0 times, the body's layers are never reached by any input: only the
    check of each rewritten layer alone sees them."""
    fuzz = scope.fuzz
    inner = Scope(fuzz, scope.fresh("loop_body"), scope)
    carried = Act(scope.fresh("v_in"), x.channels, x.spatial)
    y, _ = draw(conv_arm(inner, carried, (1, 1), x.channels, min_depth=1))
    cond_out = inner.op("Identity", ["cond_in"], "cond_out")
    graph = helper.make_graph(
        inner.nodes, inner.name,
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), fuzz.value_info(carried)],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), fuzz.value_info(y)],
        inner.initializers)
    trips = scope.stored("trips", np.array(draw(st.integers(0, 1)), np.int64), draw(st.booleans()))
    out = scope.layer("Loop", [trips, "", x.name], draw(st.booleans()), body=graph)
    fuzz.sizes_unknown = True
    return Act(out, x.channels, x.spatial)


@st.composite
def body(draw, scope: Scope, x: Act) -> Act:
    """1..4 blocks: conv blocks, Relu, merged arms and at most one ``If`` and one ``Loop``."""
    kinds = ["conv", "conv", "relu", "arms", "if", "loop"]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            x, _ = draw(conv_block(scope, x))
        elif kind == "relu":
            x = Act(scope.op("Relu", [x.name], "relu"), x.channels, x.spatial)
        elif kind == "arms":
            x = draw(merged_arms(scope, x))
        elif kind == "if":
            x = draw(if_block(scope, x))
            kinds.remove("if")
        else:
            x = draw(loop_block(scope, x))
            kinds.remove("loop")
    return x


# ---------------------------------------------------------------------------
# Fully connected head
# ---------------------------------------------------------------------------


@st.composite
def fc_weight(draw, scope: Scope, out_features: int, in_features: int, transposed: bool):
    """``(tensor name, W, sizes)`` for a Gemm or MatMul: ``W`` is ``OUT x IN``, structured
    at ``sizes = (c,)`` or random, stored as ``W`` (``transposed``: Gemm's ``transB``) or
    ``W^T``; sometimes a visible one read again."""
    key = ("fc", out_features, in_features, transposed)
    entry = draw(reused(scope, key))
    if entry is not None:
        return entry
    sizes = draw(structure_sizes((out_features, in_features)))
    weight = poisoned(scope.fuzz, new_weight(scope.fuzz.rng, (out_features, in_features), sizes))
    stored = weight if transposed else np.ascontiguousarray(weight.T)
    home = draw(home_of(scope))
    entry = (home.stored("fc_w", stored, draw(st.booleans())), weight, sizes)
    home.register(key, entry)
    return entry


def flatten(scope: Scope, x: Act, how: str) -> str:
    """``x`` as ``batch x features``: Flatten, or Reshape to ``[0, -1]``."""
    if how == "Flatten":
        return scope.op("Flatten", [x.name], "flat", axis=1)
    shape = scope.constant("shape", np.array([0, -1], dtype=np.int64))
    return scope.op("Reshape", [x.name, shape], "flat")


@st.composite
def gemm(draw, scope: Scope, flat: str, in_features: int, out_features: int) -> tuple[str, list]:
    """``Gemm`` on ``batch x in_features`` with random ``transA``/``transB``/``alpha``/``beta``/``C``."""
    batch = scope.fuzz.batch
    trans_b = draw(st.booleans())
    weight_name, weight, sizes = draw(fc_weight(scope, out_features, in_features, trans_b))
    attrs = {"transB": int(trans_b)} if trans_b or draw(st.booleans()) else {}
    if draw(st.booleans()):  # Gemm reads x^T
        flat = scope.op("Transpose", [flat], "flat_t", perm=[1, 0])
        attrs["transA"] = 1
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([0.5, 1.5]))
    inputs = [flat, weight_name]
    bias_shapes = [None, (out_features,), (1, out_features)]
    if isinstance(batch, int):
        bias_shapes.append((batch, out_features))
    bias_shape = draw(st.sampled_from(bias_shapes))
    if bias_shape is not None:
        bias = scope.fuzz.rng.standard_normal(bias_shape).astype(np.float32)
        inputs.append(scope.stored("fc_c", bias, draw(st.booleans())))
        if draw(st.booleans()):
            attrs["beta"] = draw(st.sampled_from([0.5, 2.0]))
    out = scope.layer("Gemm", inputs, draw(st.booleans()), Planted(weight, sizes), **attrs)
    return out, [batch, out_features]


@st.composite
def matmul(draw, scope: Scope, x: str, leading: list, in_features: int,
           out_features: int) -> tuple[str, list]:
    """``x @ W`` on ``leading x in_features``, maybe plus a bias row (Add)."""
    weight_name, weight, sizes = draw(fc_weight(scope, out_features, in_features, False))
    out = scope.layer("MatMul", [x, weight_name], draw(st.booleans()), Planted(weight, sizes))
    if draw(st.booleans()):
        bias = scope.fuzz.rng.standard_normal(out_features).astype(np.float32)
        out = scope.op("Add", [out, scope.constant("mm_b", bias)], "mm_plus_b")
    return out, [*leading, out_features]


@st.composite
def fc_layer(draw, scope: Scope, flat: str, in_features: int, kind: str,
             out_features: int | None = None) -> tuple[str, list]:
    """A Gemm or MatMul (``kind``, or either for ``"any"``) on ``batch x in_features``."""
    out_features = out_features or draw(st.integers(1, 6))
    if kind == "any":
        kind = draw(st.sampled_from(["gemm", "matmul"]))
    if kind == "gemm":
        return draw(gemm(scope, flat, in_features, out_features))
    return draw(matmul(scope, flat, [scope.fuzz.batch], in_features, out_features))


@st.composite
def head(draw, scope: Scope, x: Act) -> tuple[str, list]:
    """The model output: ``x`` itself, or Flatten/Reshape then Gemm or MatMul (1 or 2 layers),
    or an ``If`` whose branches each hold one (both reading the flattened ``x``)."""
    kind = draw(st.sampled_from(["none", "gemm", "matmul", "matmul_3d", "if_fc"]))
    batch = scope.fuzz.batch
    if kind == "none":
        return x.name, [batch, x.channels, *x.spatial]
    if kind == "matmul_3d":  # features: the spatial positions, channels a leading dim
        shape = scope.constant("shape", np.array([0, x.channels, -1], dtype=np.int64))
        rows = scope.op("Reshape", [x.name, shape], "rows")
        return draw(matmul(scope, rows, [batch, x.channels], math.prod(x.spatial),
                           draw(st.integers(1, 6))))
    features = x.channels * math.prod(x.spatial)
    flat = flatten(scope, x, draw(st.sampled_from(["Flatten", "Reshape"])))
    if kind == "if_fc":
        out_features = draw(st.integers(1, 6))
        branches = branch_scopes(scope)
        outs = [draw(fc_layer(inner, flat, features, "any", out_features)) for inner in branches]
        infos = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outs]
        return draw(if_node(scope, branches, infos)), outs[0][1]
    for depth in range(draw(st.integers(1, 2))):
        if depth:
            flat = scope.op("Relu", [flat], "fc_relu")
        flat, shape = draw(fc_layer(scope, flat, features, kind))
        features = shape[-1]
    return flat, shape


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@dataclass
class FuzzCase:
    """A generated model and what was planted in its weighted layers, by layer name."""

    model: onnx.ModelProto
    planted: dict[str, Planted]
    batch: int  # the batch the test feeds (a dynamic batch gets 2)
    input_shape: tuple[int | str, ...]
    poisoned: bool = False  # a weight holds an Inf or a NaN


@st.composite
def fuzz_models(draw) -> FuzzCase:
    """A small valid model (see the module docstring), checked by onnx with full shape inference."""
    opset = draw(st.integers(13, 21))
    batch = draw(st.sampled_from([1, 2, "N"]))
    fuzz = Fuzz(draw(st.integers(0, 2**16)), batch)
    x = Act("x", draw(st.integers(1, MAX_CHANNELS)), (draw(st.integers(5, 12)), draw(st.integers(5, 12))))
    fuzz.inputs.append(fuzz.value_info(x))
    scope = Scope(fuzz, "fuzz")
    y = draw(body(scope, x))
    out, shape = draw(head(scope, y))
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape), *fuzz.extra_outputs]
    graph = helper.make_graph(scope.nodes, "fuzz", fuzz.inputs, outputs, scope.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=max(8, IR_FOR_OPSET[opset]))
    onnx.checker.check_model(model, full_check=True)
    return FuzzCase(model, fuzz.planted, batch if isinstance(batch, int) else 2,
                    (batch, x.channels, *x.spatial), fuzz.poisoned)


# ---------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------


def _feeds(case: FuzzCase) -> list[dict]:
    """The test's own inputs (not optimize's seed): both conditions when ``cond`` is an input."""
    rng = np.random.default_rng(12345)
    x = rng.uniform(-1.0, 1.0, (case.batch, *case.input_shape[1:])).astype(np.float32)
    cond = [inp for inp in case.model.graph.input if inp.name == "cond"]
    if cond:
        shape = [1] * len(cond[0].type.tensor_type.shape.dim)
        return [{"x": x, "cond": np.full(shape, flag)} for flag in (True, False)]
    return [{"x": x}]


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check_plan(case: FuzzCase, plan) -> None:
    """Every planted layer is in the plan; planted structures are found; found ones are real;
    a weight holding NaN or Inf is left alone."""
    layers = {layer.node: layer for layer in plan.layers}
    assert set(layers) == set(case.planted)
    for name, planted in case.planted.items():
        layer = layers[name]
        if not is_finite(planted.weight):
            assert layer.best is None and not layer.rewritten, (name, layer)
            assert layer.reason == "weight holds NaN or Inf", (name, layer.reason)
            continue
        if layer.best is not None and layer.best.family == "box":
            assert relative_residual(planted.weight, layer.best.payload.sizes) < FOUND_RESIDUAL, (name, layer)
        if planted.sizes is None or planted.findable is None:
            continue
        if not planted.findable:
            assert layer.best is None and not layer.rewritten, (name, layer.reason)
            continue
        assert layer.best is not None, (name, planted.sizes, layer.reason)
        if plan.select == "all":
            assert layer.rewritten, (name, layer.reason)


def _events(case: FuzzCase, plan) -> None:
    """What the example covers (``pytest --hypothesis-show-statistics``)."""
    event(f"layers rewritten by select=all: {len(plan.rewritten)}")
    if len({id(planted.weight) for planted in case.planted.values()}) < len(case.planted):
        event("two layers with one weight (one tensor or equal values)")
    ops = {node.op_type for node in case.model.graph.node}
    for op in sorted(ops & {"If", "Loop", "BatchNormalization", "Add", "Concat"}):
        event(f"has {op}")
    branches = [attr.g for node in case.model.graph.node for attr in node.attribute if attr.g.node]
    if any(node.op_type == "If" for graph in branches for node in graph.node):
        event("has an If in an If")
    main = {name for node in case.model.graph.node for name in node.output}
    for kind in ("If", "Loop"):
        bodies = [node for node in case.model.graph.node if node.op_type == kind]
        if bodies and any(layer.key not in main for layer in plan.rewritten):
            event(f"rewrites a layer in a subgraph of a model with a {kind}")
    for layer in plan.rewritten:
        event(f"rewritten {layer.op} {layer.chosen.lowering}")
        if layer.folded:
            event("folds a BatchNormalization")
        if layer.shared:
            event("shares a pool")


@given(fuzz_models())
@SETTINGS
def test_optimized_graphs_stay_equivalent(case):
    """Both selections give a checked model, equal outputs and the planted structures."""
    note(onnx.printer.to_text(case.model))  # printed with a failing example
    if case.poisoned:
        event("a weight holds an Inf or a NaN")
    original = case.model.SerializeToString()
    feeds = _feeds(case)
    expected = [_run(case.model, feed) for feed in feeds]
    for select in ("all", "cost"):
        try:
            new, report = sconv_onnx.optimize(case.model, select=select)
        except VerificationError as exc:  # only non-finite outputs, or rounding, may fail
            if not case.poisoned and _within_rounding(case.model, exc.report):
                event(f"select={select}: verification failed within the model's rounding")
                continue
            assert case.poisoned and _non_finite_failures(exc.report), exc.report.failures()
            _check_plan(case, exc.report.plan)
            event(f"select={select}: verification failed on non-finite outputs")
            continue
        assert report.verified
        # every rewritten layer was checked alone (in branches and loop bodies the inputs
        # never reach too) and met its bound
        checks = {check.layer.key: check.status for check in report.layer_checks}
        assert checks == {layer.key: "PASS" for layer in report.plan.rewritten}, [
            (check.layer.key, check.summary()) for check in report.layer_checks]
        onnx.checker.check_model(new, full_check=True)
        _check_plan(case, report.plan)
        if select == "all":
            _events(case, report.plan)
        for feed, reference in zip(feeds, expected):
            for y0, y1 in zip(reference, _run(new, feed)):
                _assert_equivalent(case, select, y0, y1)
    assert case.model.SerializeToString() == original  # the input model is never modified


#: Inputs moved by one float32 ulp, this many times, to see how far the original model's
#: own rounding moves its outputs.
ULP_SAMPLES = 8


def _within_rounding(model: onnx.ModelProto, report) -> bool:
    """Whether a failed verification is float32 rounding that an output amplifies: every
    layer passed alone, and the outputs differ by no more than 1-ulp changes of the
    inputs move the original's outputs.  An output that cancels to almost nothing does
    that (one dot product of 132 terms came to 5.3e-5; the rewrite's channel sum moved it
    by 8.3e-8, 1.6e-3 of it, and 1-ulp input changes by up to 3e-7); a wrong rewrite
    misses by orders of magnitude."""
    if report.errors is None or any(e.problem for e in report.errors):
        return False
    if any(check.status != "PASS" for check in report.layer_checks or ()):
        return False
    feeds = random_feeds(model, report.input_shapes, 0)  # optimize's own verification inputs
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    reference = dict(zip(names, session.run(names, feeds)))
    rng = np.random.default_rng(0)
    moved = dict.fromkeys(names, 0.0)
    for _ in range(ULP_SAMPLES):
        nudged = {name: value * (1 + np.float32(2**-23) * rng.choice([-1, 1], value.shape))
                  .astype(value.dtype) if value.dtype.kind == "f" else value
                  for name, value in feeds.items()}
        for name, value in zip(names, session.run(names, nudged)):
            moved[name] = max(moved[name], float(np.max(np.abs(value - reference[name]))))
    return all(e.max_abs <= moved[e.name] for e in report.errors)


def test_rounding_explains_only_errors_within_the_models_own():
    """:func:`_within_rounding` accepts an error no larger than 1-ulp input changes move
    the original's output, and refuses one a wrong rewrite would make."""
    rng = np.random.default_rng(7)
    builder = GraphBuilder("single")
    weight = builder.constant("w", rng.standard_normal((64, 1)).astype(np.float32))
    y = builder.op("MatMul", ["x", weight])
    model = builder.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 1])])
    _, report = sconv_onnx.optimize(model)
    output = report.errors[0]
    output.max_abs = 0.0
    assert _within_rounding(model, report)
    output.max_abs = 1e-3 * (1 + abs(float(_run(model, random_feeds(model, {"x": (1, 64)}))[0][0, 0])))
    assert not _within_rounding(model, report)


def _non_finite_failures(report) -> bool:
    """Whether every reason ``report`` failed verification is a NaN or an infinity."""
    failures = report.failures()
    return bool(failures) and all("NaN" in why or "infinit" in why for why in failures)


def _assert_equivalent(case: FuzzCase, select: str, y0: np.ndarray, y1: np.ndarray) -> None:
    """``y1`` is ``y0`` within :data:`MAX_REL_ERROR` of ``max|y0|``.

    An output that is not finite comes only from a poisoned weight; the rewrite
    is exact in finite arithmetic, and an infinity entering a rewritten layer
    may leave it as a NaN (``inf - inf`` in a sum-pool), so such an output is
    not compared (``optimize`` verified its own inputs).
    """
    assert y0.shape == y1.shape
    if not is_finite(y0):
        assert case.poisoned, select
        return
    scale = max(float(np.max(np.abs(y0), initial=0.0)), MIN_SCALE)
    error = float(np.max(np.abs(y0.astype(np.float64) - y1), initial=0.0))
    assert error <= MAX_REL_ERROR * scale, (select, error, scale)
