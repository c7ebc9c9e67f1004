"""The sum-pools of a box-structured rewrite, one class per lowering.

For a structure ``(c, n_1..n_r)`` of a layer with ``C`` channels per group
and kernel ``K``, the sum-pool has window ``C - c + 1`` over channels
(inside each group) and ``K_i - n_i + 1`` over spatial axis ``i``, at
stride 1, with the layer's dilation and padding (docs/DESIGN.md section 1).

Each class below is the *one* definition of its lowering: the cost model's
operator (``op``), the constants it writes (``constant_shapes``, from which
the plan counts parameters), the float additions an output takes
(``depth``, for rounding bounds) and the nodes (``emit``) all come from it.
The property tests (``tests/test_conv_rewrite_property.py``,
``test_conv_transpose.py``, ``test_linear_rewrite.py``) check that a
rewritten model holds exactly the constants the plan counted.

Lowerings:

* :class:`ChannelMatrix`: a 1x1 Conv with a fixed 0/1 weight ``(g*c, C, 1..1)``,
  ``group = g``; any opset, any dtype.
* :class:`WindowSum`: ``S = cs[L-1 : L-1+c] - cs[0 : c] + x[0 : c]`` with
  ``cs = CumSum(x, axis)``, ``L = size - c + 1``; channels (one group,
  opset >= 11, float32, not 2-D: there it leaves onnxruntime's NCHWc layout)
  or the input features of a fully connected layer.
* :class:`SpatialPool` ``avgpool``: ``AveragePool(count_include_pad=1)``; the
  caller multiplies alpha by the window area.  2-D only (1-D ran 0.69x vs
  0.62x for the all-ones conv on the audio model), opset <= 18 (where it runs
  on MLAS), no dilation, each pad smaller than the window, float32.
* :class:`SpatialPool` ``ones_conv``: depthwise Conv with an all-ones kernel:
  exact for any rank, dilation, opset and float dtype.
* :class:`SpatialPool` ``avgpool_after``: the same sum, moved after the small
  conv.  Sum-pool and conv are both convolutions and commute:
  ``conv(x, alpha (*) ones(w)) = sumpool_w(conv(x, alpha))``, with the layer's
  padding on the small conv and none on the pool; at stride 1 only (a
  strided layer would need the small conv at full resolution).  Written as
  ``AveragePool`` of ``conv(x, area * alpha)``: the conv's output has the
  layer's range, and int8 rounds it where the pool then averages the
  rounding over ``area`` positions, where a pool first is rounded at its
  output and the small conv amplifies that (issue 15, ``benchmarks/INT8.md``:
  ResNet-18-B rewritten with ``--int8``, static QDQ, from 1.30x to 1.02x the
  quantized original's error).  2-D, opset <= 18, float32,
  like ``avgpool``; the pool runs over the layer's output channels.
* :class:`ChannelSpread`: the transpose of :class:`ChannelMatrix`, for
  ConvTranspose: a 0/1 1x1 Conv ``(g*C, c, 1..1)`` spreading ``c`` channels
  to ``C`` per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ... import cost
from ...structure import window
from ..base import NodeEmitter

#: :class:`SpatialPool` method of the pool after the small conv.
AFTER = "avgpool_after"


def count(shapes: list[tuple[int, ...]]) -> int:
    """Elements of constants with ``shapes``."""
    return sum(math.prod(shape) for shape in shapes)


def channel_window_matrix(group: int, channels: int, under: int, rank: int, dtype) -> np.ndarray:
    """0/1 weight ``(group*under, channels, 1..1)``: row ``j`` sums channels ``j..j+channels-under``."""
    span = window(channels, under)
    block = np.zeros((under, channels), dtype=dtype)
    for j in range(under):
        block[j, j : j + span] = 1
    matrix = np.tile(block, (group, 1))
    return matrix.reshape(matrix.shape + (1,) * rank)


def channel_spread_matrix(group: int, channels: int, under: int, rank: int, dtype) -> np.ndarray:
    """0/1 weight ``(group*channels, under, 1..1)``: ``A(channels, under)`` per group.

    Output channel ``o`` of a group sums inputs ``j`` with ``0 <= o - j <= channels - under``:
    the transpose of :func:`channel_window_matrix`'s window sum.
    """
    span = window(channels, under)
    block = np.zeros((channels, under), dtype=dtype)
    for j in range(under):
        block[j : j + span, j] = 1
    matrix = np.tile(block, (group, 1))
    return matrix.reshape(matrix.shape + (1,) * rank)


@dataclass(frozen=True)
class ChannelMatrix:
    """Channel windows summed by a grouped 1x1 Conv with a 0/1 weight."""

    group: int
    channels: int
    under: int
    rank: int

    def constant_shapes(self) -> list[tuple[int, ...]]:
        return [(self.group * self.under, self.channels) + (1,) * self.rank]

    def op(self, positions: float) -> cost.OpCost:
        """Per output position of the layer, the pool running at ``positions``."""
        return cost.conv_op(self.group * self.under, self.channels, self.group * self.channels,
                            (1,) * self.rank, positions, positions)

    @property
    def depth(self) -> int:
        return window(self.channels, self.under)

    def emit(self, at: NodeEmitter, x: gs.Tensor, dtype) -> gs.Tensor:
        (shape,) = self.constant_shapes()
        weight = channel_window_matrix(self.group, self.channels, self.under, self.rank, dtype)
        assert weight.shape == shape
        attrs = {"group": self.group, "kernel_shape": [1] * self.rank}
        return at.node("Conv", "channel_pool", [x, at.constant("channel_sum", weight)], attrs)


@dataclass(frozen=True)
class WindowSum:
    """Sliding sums of ``size - under + 1`` consecutive entries along ``axis`` (``under`` of
    them), by a CumSum and a Slice difference (opset >= 11)."""

    axis: int
    size: int
    under: int
    #: the graph nodes it takes: CumSum, three Slices, Sub, Add
    NODES = 6

    def constant_shapes(self) -> list[tuple[int, ...]]:
        # the CumSum axis (a scalar), then Slice's axes, zero, count, upper start and end
        return [()] + [(1,)] * 5

    def op(self, inputs: float) -> cost.OpCost:
        """Per output position of the layer, over ``inputs`` elements of ``x``."""
        return cost.cumsum_op(inputs, self.NODES)

    @property
    def depth(self) -> int:
        return self.size + 2  # the prefix sums, then one subtraction and one addition

    def emit(self, at: NodeEmitter, x: gs.Tensor, name: str) -> gs.Tensor:
        span = window(self.size, self.under)
        int64 = np.int64
        values = [np.array(self.axis, int64), np.array([self.axis], int64), np.array([0], int64),
                  np.array([self.under], int64), np.array([span - 1], int64),
                  np.array([self.size], int64)]
        assert [v.shape for v in values] == self.constant_shapes()
        axis, axes, zero, under, start, end = (
            at.constant(suffix, value) for suffix, value in zip(
                ("axis", "axes", "zero", "count", "upper_start", "upper_end"), values))
        cumsum = at.node("CumSum", "cumsum", [x, axis])
        upper = at.node("Slice", "upper", [cumsum, start, end, axes])
        lower = at.node("Slice", "lower", [cumsum, zero, under, axes])
        head = at.node("Slice", "head", [x, zero, under, axes])
        difference = at.node("Sub", "window_diff", [upper, lower])
        return at.node("Add", name, [difference, head])


@dataclass(frozen=True)
class SpatialPool:
    """Stride-1 sum (``ones_conv``) or mean (``avgpool``; ``avgpool_after``: of the small
    conv's output) over ``window`` of ``channels`` channels, with ``dilations`` and zero
    padding ``pads``."""

    method: str
    channels: int
    window: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    def constant_shapes(self) -> list[tuple[int, ...]]:
        return [(self.channels, 1) + self.window] if self.method == "ones_conv" else []

    @property
    def averages(self) -> bool:
        """An ``AveragePool`` (alpha carries the window's area), not a sum."""
        return self.method in ("avgpool", AFTER)

    def op(self, positions: float, reads: float | None = None) -> cost.OpCost:
        """Per output position of the layer, the pool writing ``positions`` positions
        (reading ``reads``, default as many)."""
        return cost.pool_op(self.channels, self.window, positions,
                            "AveragePool" if self.averages else "Conv", reads)

    @property
    def depth(self) -> int:
        # an average is a sum and a division; alpha carries the area back (one product)
        return math.prod(self.window) + (2 if self.averages else 0)

    def emit_after(self, at: NodeEmitter, conv: gs.Node) -> gs.Node:
        """``avgpool_after``: an AveragePool inserted after ``conv``, taking its output;
        ``conv`` writes a new tensor into it.  Returns the pool node."""
        if self.method != AFTER or any(self.pads):
            raise ValueError("only avgpool_after runs after the conv, unpadded")
        pooled = conv.outputs[0]
        conv.outputs[0] = gs.Variable(at.name("conv_out"))
        pool = gs.Node("AveragePool", at.name("sum_pool_after"),
                       {"kernel_shape": list(self.window), "strides": [1] * len(self.window)},
                       [conv.outputs[0]], [pooled])
        at.graph.nodes.insert(at.graph.nodes.index(conv) + 1, pool)
        return pool

    def emit(self, at: NodeEmitter, x: gs.Tensor, dtype, bias: gs.Tensor | None = None,
             output: gs.Variable | None = None) -> gs.Tensor:
        """The pool's output; ``ones_conv`` may add a per-channel ``bias`` and write ``output``."""
        attrs: dict = {"kernel_shape": list(self.window), "strides": [1] * len(self.window)}
        if any(self.pads):
            attrs["pads"] = list(self.pads)
        if self.method == "avgpool":
            if bias is not None or output is not None:
                raise ValueError("avgpool takes no bias and makes its own output")
            attrs["count_include_pad"] = 1
            return at.node("AveragePool", "sum_pool", [x], attrs)
        (shape,) = self.constant_shapes()
        ones = at.constant("ones", np.ones(shape, dtype=dtype))
        attrs["group"] = self.channels
        if any(d != 1 for d in self.dilations):
            attrs["dilations"] = list(self.dilations)
        inputs = [x, ones] + ([bias] if bias is not None else [])
        return at.node("Conv", "sum_pool", inputs, attrs, output=output)


@dataclass(frozen=True)
class ChannelSpread:
    """The transposed channel pool of a ConvTranspose: ``c`` channels spread to ``C`` per
    group by a 0/1 1x1 Conv with weight ``A(C, c)``, zero padding ``pads``."""

    group: int
    channels: int
    under: int
    rank: int
    pads: tuple[int, ...]

    def constant_shapes(self) -> list[tuple[int, ...]]:
        return [(self.group * self.channels, self.under) + (1,) * self.rank]

    def op(self) -> cost.OpCost:
        """Per output position of the layer (it runs at the output's resolution)."""
        return cost.conv_op(self.group * self.channels, self.under, self.group * self.under,
                            (1,) * self.rank, 1.0)

    @property
    def depth(self) -> int:
        return window(self.channels, self.under)

    def emit(self, at: NodeEmitter, x: gs.Tensor, dtype, bias: gs.Tensor | None,
             output: gs.Variable) -> gs.Tensor:
        (shape,) = self.constant_shapes()
        matrix = channel_spread_matrix(self.group, self.channels, self.under, self.rank, dtype)
        assert matrix.shape == shape
        inputs = [x, at.constant("channel_spread", matrix)] + ([bias] if bias is not None else [])
        attrs = {"group": self.group, "kernel_shape": [1] * self.rank, "pads": list(self.pads)}
        return at.node("Conv", "channel_spread", inputs, attrs, output=output)
