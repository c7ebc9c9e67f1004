"""Emit the sum-pool of a structured layer as ONNX nodes (onnx-graphsurgeon).

For a structure ``(c, n_1..n_r)`` of a Conv with ``C`` input channels per
group and kernel ``K``, the sum-pool has window ``C - c + 1`` over channels
(inside each group) and ``K_i - n_i + 1`` over spatial axis ``i``, at stride
1, with the Conv's dilation and padding (DESIGN.md section 1).  Channel and
spatial pooling commute with each other and with zero padding, so channels
are pooled first (fewer channels for the spatial pool) and the padding goes
on the spatial pool, or stays on the small Conv when there is none.

Lowerings:

* channel ``"cumsum"``: ``S = cs[L-1 : L-1+c] - cs[0 : c] + x[0 : c]`` with
  ``cs = CumSum(x, axis=1)`` and ``L = C - c + 1``; one group only,
  opset >= 11, float32, and not 2-D (where it leaves the NCHWc layout).
* channel ``"matrix"``: a 1x1 Conv with a fixed 0/1 weight of shape
  ``(g*c, C, 1..1)``, ``group = g``; any opset, any dtype.
* spatial ``"avgpool"``: ``AveragePool(count_include_pad=1)``; the caller
  multiplies alpha by the window area.  2-D only (where it joins the NCHWc
  layout; 1-D ran 0.69x vs 0.62x for the all-ones conv on the audio model),
  opset <= 18 (where it runs on MLAS), no dilation, each pad smaller than
  the window, float32.
* spatial ``"ones_conv"``: depthwise Conv with an all-ones kernel: exact, any
  rank, dilation, opset and dtype.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs


class NodeEmitter:
    """Adds uniquely named nodes to ``graph`` just before ``anchor``."""

    def __init__(self, graph: gs.Graph, anchor: gs.Node, base: str, taken: set[str]):
        self.graph = graph
        self.anchor = anchor
        self.base = base
        self.taken = taken

    def name(self, suffix: str) -> str:
        candidate = f"{self.base}/sconv_{suffix}"
        counter = 1
        while candidate in self.taken:
            counter += 1
            candidate = f"{self.base}/sconv_{suffix}_{counter}"
        self.taken.add(candidate)
        return candidate

    def constant(self, suffix: str, values: np.ndarray) -> gs.Constant:
        # np.ascontiguousarray would turn a 0-d array (CumSum's axis) into shape (1,)
        return gs.Constant(self.name(suffix), np.array(values, order="C"))

    def node(self, op: str, suffix: str, inputs: list, attrs: dict | None = None,
             output: gs.Variable | None = None) -> gs.Variable:
        """Insert ``op`` and return its output: a new tensor, or ``output`` when given."""
        output = output if output is not None else gs.Variable(self.name(f"{suffix}_out"))
        node = gs.Node(op, self.name(suffix), attrs or {}, list(inputs), [output])
        self.graph.nodes.insert(self.graph.nodes.index(self.anchor), node)
        return output


def channel_window_matrix(group: int, channels: int, under: int, rank: int, dtype) -> np.ndarray:
    """0/1 weight ``(group*under, channels, 1..1)``: row ``j`` sums channels ``j..j+channels-under``."""
    window = channels - under + 1
    block = np.zeros((under, channels), dtype=dtype)
    for j in range(under):
        block[j, j : j + window] = 1
    matrix = np.tile(block, (group, 1))
    return matrix.reshape(matrix.shape + (1,) * rank)


def channel_spread_matrix(group: int, channels: int, under: int, rank: int, dtype) -> np.ndarray:
    """0/1 weight ``(group*channels, under, 1..1)``: ``A(channels, under)`` per group.

    Output channel ``o`` of a group sums inputs ``j`` with ``0 <= o - j <= channels - under``:
    the transpose of :func:`channel_window_matrix`'s window sum.
    """
    window = channels - under + 1
    block = np.zeros((channels, under), dtype=dtype)
    for j in range(under):
        block[j : j + window, j] = 1
    matrix = np.tile(block, (group, 1))
    return matrix.reshape(matrix.shape + (1,) * rank)


def emit_channel_pool(
    emitter: NodeEmitter, x, lowering: str, group: int, channels: int, under: int, rank: int, dtype
):
    """Sum windows of ``channels - under + 1`` channels inside each group."""
    if lowering == "matrix":
        weight = emitter.constant("channel_sum", channel_window_matrix(group, channels, under, rank, dtype))
        attrs = {"group": group, "kernel_shape": [1] * rank}
        return emitter.node("Conv", "channel_pool", [x, weight], attrs)
    if lowering != "cumsum" or group != 1:
        raise ValueError(f"channel lowering {lowering!r} needs one group")
    return emit_window_sum(emitter, x, 1, channels, under, "channel_pool")


def emit_window_sum(emitter: NodeEmitter, x, axis: int, size: int, under: int, name: str):
    """Sliding sums of ``size - under + 1`` consecutive entries along ``axis`` (``under`` of them).

    ``S = cs[L-1 : L-1+c] - cs[0 : c] + x[0 : c]`` with ``cs = CumSum(x, axis)``,
    ``L = size - under + 1`` and ``c = under``: opset >= 11.
    """
    window = size - under + 1
    axes = emitter.constant("axes", np.array([axis], dtype=np.int64))
    zero = emitter.constant("zero", np.array([0], dtype=np.int64))
    count = emitter.constant("count", np.array([under], dtype=np.int64))
    cumsum = emitter.node("CumSum", "cumsum", [x, emitter.constant("axis", np.array(axis, dtype=np.int64))])
    upper = emitter.node(
        "Slice",
        "upper",
        [
            cumsum,
            emitter.constant("upper_start", np.array([window - 1], dtype=np.int64)),
            emitter.constant("upper_end", np.array([size], dtype=np.int64)),
            axes,
        ],
    )
    lower = emitter.node("Slice", "lower", [cumsum, zero, count, axes])
    head = emitter.node("Slice", "head", [x, zero, count, axes])
    difference = emitter.node("Sub", "window_diff", [upper, lower])
    return emitter.node("Add", name, [difference, head])


def emit_spatial_pool(
    emitter: NodeEmitter,
    x,
    lowering: str,
    channels: int,
    window: tuple[int, ...],
    dilations: tuple[int, ...],
    pads: tuple[int, ...],
    dtype,
    bias: gs.Tensor | None = None,
    output: gs.Variable | None = None,
):
    """Stride-1 sum (``ones_conv``) or mean (``avgpool``) over ``window``, zero padding ``pads``.

    ``ones_conv`` may add a per-channel ``bias`` and write into ``output``.
    """
    attrs: dict = {"kernel_shape": list(window), "strides": [1] * len(window)}
    if any(pads):
        attrs["pads"] = list(pads)
    if lowering == "avgpool":
        attrs["count_include_pad"] = 1
        if bias is not None or output is not None:
            raise ValueError("avgpool takes no bias and makes its own output")
        return emitter.node("AveragePool", "sum_pool", [x], attrs)
    ones = emitter.constant("ones", np.ones((channels, 1) + tuple(window), dtype=dtype))
    attrs["group"] = channels
    if any(d != 1 for d in dilations):
        attrs["dilations"] = list(dilations)
    inputs = [x, ones] + ([bias] if bias is not None else [])
    return emitter.node("Conv", "sum_pool", inputs, attrs, output=output)


def pool_constant_count(
    channel: str | None, spatial: str | None, group: int, channels: int, under: tuple[int, ...],
    kernel: tuple[int, ...],
) -> int:
    """Elements of the constants that :func:`emit_channel_pool` and :func:`emit_spatial_pool` add."""
    under_c = under[0]
    count = 0
    if channel == "matrix":
        count += group * under_c * channels
    elif channel == "cumsum":
        count += 6  # axis, axes, zero, count, upper start and end
    if spatial == "ones_conv":
        pooled = group * under_c if channel else group * channels
        count += pooled * math.prod(k - n + 1 for k, n in zip(kernel, under[1:]))
    return count
