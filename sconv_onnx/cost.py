"""Cost model: predicted time of a layer and of the operators that replace it.

Units.  An operator (:class:`OpCost`) is described *per output position* of
the layer it belongs to; :func:`total_cost` turns a list of them into
*MAC-equivalents per run* (batch 1): one multiply-add of a dense convolution
counts 1, element-wise and memory-bound work is charged per element it
touches, and each graph node has a fixed overhead.  Decisions compare
ratios, so the unit cancels out; absolute costs let the costs of several
layers (a shared pool, a group of layers) add up.  MACs are counted by
:mod:`sconv_onnx.macs`, the same definition the report's totals use.

Families build their candidates' operators from the helpers here
(:func:`conv_op`, :func:`pool_op`, :func:`cumsum_op`, :func:`linear_op`,
:func:`conv_transpose_op`), so that every family is priced alike.

Constants are fitted by ``python benchmarks/calibrate.py`` (results and
method in ``benchmarks/CALIBRATION.md``): every structured layer of the
benchmark models is timed against each candidate rewrite, in context, on
this machine (onnxruntime CPU, 2 threads), and a coordinate search picks the
constants that best predict the measured time ratios.  What the fit says:

* the layers are memory-bound more than MAC-bound: an element read or
  written costs about ``MEMORY`` = 45 MAC-equivalents, a sum-pool's additions
  almost nothing beyond their memory traffic (``POOL_ADD``);
* every extra graph node costs about ``NODE_OVERHEAD`` (1e5 MAC-equivalents,
  about a microsecond at the ~90 GMAC/s this machine reaches on ResNet-18);
* CumSum channel pooling (1-D and 3-D convs only) costs about
  ``CUMSUM_ELEMENT`` = 110 MAC-equivalents per input element;
* a conv with a smaller kernel than the original runs about 10 % less
  efficiently per MAC (``SMALL_KERNEL``).

The fit is flat: repeated runs land on different constants that agree with
80-87 % of the measured single-layer keep/rewrite decisions.  Among them,
these are the ones whose whole-model results hold (``benchmarks/RESULTS.md``):
a later fit with ``MEMORY`` = 1 agreed with more single layers but made
MobileNetV2 1.07x slower as a whole (its 1x1 convs are memory-bound).  The
cost model is a screen; ``--select measured`` is the arbiter.

Measured there, and so predicted here: depthwise convs and 1x1 convs with
channel pooling lose (0.9-2x slower) unless the pool is shared; 3x3 convs at
``n=2`` win (0.33-0.8x).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from . import macs

#: MAC-equivalents per tensor element read or written by an operator.
MEMORY = 45.0
#: MAC-equivalents per input element of the CumSum channel pooling.
CUMSUM_ELEMENT = 110.0
#: Relative cost of a MAC in a conv whose kernel is smaller than the original.
SMALL_KERNEL = 1.1
#: MAC-equivalents per addition of a sum-pool (AveragePool or all-ones depthwise Conv).
POOL_ADD = 0.0625
#: MAC-equivalents per graph node and run (scheduling, allocation, layout).
NODE_OVERHEAD = 1e5
#: A rewrite must be predicted at most this fraction of the original's cost.
GAIN_MARGIN = 0.9
#: Relative cost of a MAC in a 2-D grouped conv whose channels per group are not whole
#: NCHWc blocks (docs/DESIGN.md section 2: an interleaved pair with 8 channels per group
#: ran 0.43 of the dense conv at 0.14 of its MACs, about 3x its MAC ratio).
UNBLOCKED = 3.0


@functools.cache
def nchwc_block() -> int:
    """Floats per NCHWc block of onnxruntime's CPU convolutions on this machine: 16 with
    AVX-512, else 8 (read from ``/proc/cpuinfo``; 8 where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def blocked(*channels_per_group: int) -> bool:
    """Whether a 2-D conv with these channels per group (in and out) runs in whole
    NCHWc blocks (:func:`nchwc_block`)."""
    block = nchwc_block()
    return all(count % block == 0 for count in channels_per_group)


@dataclass(frozen=True)
class ConvGeometry:
    """What the cost model needs to know about a Conv layer (batch 1)."""

    out_channels: int
    in_channels_per_group: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None  # begin..., end...
    in_spatial: tuple[int, ...] | None
    out_spatial: tuple[int, ...] | None

    @property
    def in_channels(self) -> int:
        return self.in_channels_per_group * self.group

    @property
    def positions(self) -> int | None:
        """Output positions at batch 1, when the output shape is known."""
        return math.prod(self.out_spatial) if self.out_spatial is not None else None

    @property
    def input_positions(self) -> float:
        """Input positions per output position: exact when both sizes are known, else
        ``prod(strides)`` (exact for SAME padding)."""
        if self.in_spatial is None or self.out_spatial is None:
            return float(math.prod(self.strides))
        return math.prod(self.in_spatial) / max(1, math.prod(self.out_spatial))

    def pooled_spatial(self, window: tuple[int, ...]) -> tuple[int, ...] | None:
        """Spatial size of a stride-1 sum-pool over ``window`` with the layer's pads and
        dilations (the small conv's input), when the input size is known."""
        if self.in_spatial is None or self.pads is None:
            return None
        rank = len(self.kernel)
        return tuple(self.in_spatial[i] + self.pads[i] + self.pads[rank + i]
                     - self.dilations[i] * (window[i] - 1) for i in range(rank))

    def unpooled_positions(self, window: tuple[int, ...]) -> float:
        """Positions of a conv output that a stride-1 pool with ``window`` and no padding
        then brings to the layer's output size, per output position: ``prod(out_i +
        window_i - 1) / prod(out_i)`` (1 when the output size is unknown)."""
        if self.out_spatial is None:
            return 1.0
        wider = math.prod(size + width - 1 for size, width in zip(self.out_spatial, window))
        return wider / max(1, math.prod(self.out_spatial))

    def pooled_positions(self, window: tuple[int, ...]) -> float:
        """Positions of a stride-1 sum-pool with ``window``, per output position."""
        pooled = self.pooled_spatial(window)
        if pooled is None or self.out_spatial is None:
            return float(math.prod(self.strides))
        return math.prod(pooled) / max(1, math.prod(self.out_spatial))


@dataclass(frozen=True)
class OpCost:
    """One operator of a lowering, per output position of the layer.

    ``macs``: multiply-adds (a pool's additions count as MACs);
    ``elements``: tensor elements read and written; ``kind`` selects the
    price of a MAC: ``"dense"`` (1), ``"small"`` (a conv with a smaller
    kernel than the original, :data:`SMALL_KERNEL`), ``"unblocked"`` (a 2-D
    grouped conv outside whole NCHWc blocks, :data:`UNBLOCKED`), ``"pool"``
    (:data:`POOL_ADD`) or ``"cumsum"`` (priced per input element,
    :data:`CUMSUM_ELEMENT`, instead); ``nodes``: graph nodes it takes.
    """

    op: str
    macs: float
    elements: float
    kind: str = "dense"
    nodes: int = 1

    @property
    def cost(self) -> float:
        """Predicted time of this operator in MAC-equivalents per output position."""
        if self.kind == "cumsum":
            return self.elements * CUMSUM_ELEMENT
        price = {"dense": 1.0, "small": SMALL_KERNEL, "unblocked": UNBLOCKED,
                 "pool": POOL_ADD}[self.kind]
        return self.macs * price + self.elements * MEMORY


def conv_op(out_channels: int, in_per_group: int, in_channels: int, kernel: tuple[int, ...],
            in_positions: float, out_positions: float = 1.0, kind: str = "dense",
            op: str = "Conv") -> OpCost:
    """A convolution, per output position of the layer: it writes ``out_channels`` at
    ``out_positions`` and reads ``in_channels`` at ``in_positions`` (positions per output
    position of the layer: a 1x1 conv over the input runs at ``in_positions =
    out_positions =`` :attr:`ConvGeometry.input_positions`)."""
    return OpCost(op, macs.conv(out_channels * out_positions, in_per_group, kernel),
                  in_channels * in_positions + out_channels * out_positions, kind)


def pool_op(channels: int, window: tuple[int, ...], positions: float, op: str,
            reads: float | None = None) -> OpCost:
    """A stride-1 sum-pool over ``window`` writing ``channels`` at ``positions`` per output
    position of the layer (AveragePool, or an all-ones depthwise Conv), reading them at
    ``reads`` positions (default: as many)."""
    reads = positions if reads is None else reads
    return OpCost(op, macs.pool(channels * positions, window), channels * (positions + reads),
                  "pool")


def gather_op(channels: float) -> OpCost:
    """A channel permutation (``Gather`` on axis 1) of ``channels`` per output position:
    memory traffic only, each element read and written once."""
    return OpCost("Gather", 0.0, 2 * channels)


def cumsum_op(inputs: float, nodes: int) -> OpCost:
    """A CumSum and its Slice-difference (``nodes`` graph nodes in all) over ``inputs`` elements
    per output position, priced per element (:data:`CUMSUM_ELEMENT`)."""
    return OpCost("CumSum", macs.cumsum(inputs), inputs, "cumsum", nodes)


def original_ops(geom: ConvGeometry) -> list[OpCost]:
    """The untouched Conv."""
    return [conv_op(geom.out_channels, geom.in_channels_per_group, geom.in_channels, geom.kernel,
                    geom.input_positions)]


def total_cost(positions: int | None, ops) -> float:
    """Predicted time of ``ops`` in MAC-equivalents per run (batch 1).

    ``ops`` are per output position of a layer with ``positions`` output
    positions: their costs are multiplied by it, and each graph node adds
    :data:`NODE_OVERHEAD` once.  When the positions are unknown (None) the
    result is per output position and the node overhead is left out (decisions
    compare ratios of one layer's costs, so that holds for ratios).
    """
    per_position = sum(op.cost for op in ops)
    if not positions:
        return per_position
    return per_position * positions + NODE_OVERHEAD * sum(op.nodes for op in ops)


@dataclass(frozen=True)
class LinearGeometry:
    """A fully connected layer ``y = x W^T``: ``rows`` input rows (batch 1; None if
    unknown), ``in_features`` and ``out_features``."""

    rows: int | None
    in_features: int
    out_features: int

    @property
    def positions(self) -> int | None:
        """Output positions: the rows."""
        return self.rows


def linear_op(geom: LinearGeometry, features: int) -> OpCost:
    """Per row: a fully connected layer with ``features`` inputs.

    At batch 1 a fully connected layer reads its whole weight for few rows,
    so the weight's elements are charged per row (:data:`MEMORY` each).
    """
    rows = geom.rows or 1
    weight = features * geom.out_features
    return OpCost("Gemm", macs.matmul(geom.out_features, features),
                  weight / rows + features + geom.out_features)


@dataclass(frozen=True)
class TransposeGeometry:
    """What the cost model needs to know about a ConvTranspose layer (batch 1).

    ``in_channels`` in all, ``out_channels_per_group`` per group; spatial
    sizes when known.
    """

    in_channels: int
    out_channels_per_group: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    in_spatial: tuple[int, ...] | None
    out_spatial: tuple[int, ...] | None

    @property
    def out_channels(self) -> int:
        return self.out_channels_per_group * self.group

    @property
    def positions(self) -> int | None:
        """Output positions at batch 1, when the output shape is known."""
        return math.prod(self.out_spatial) if self.out_spatial is not None else None

    @property
    def inputs_per_output(self) -> float:
        """Input positions per output position (``1/prod(strides)`` when unknown)."""
        if self.in_spatial is None or self.out_spatial is None:
            return 1.0 / math.prod(self.strides)
        return math.prod(self.in_spatial) / max(1, math.prod(self.out_spatial))


def conv_transpose_op(geom: TransposeGeometry, out_per_group: int, kernel: tuple[int, ...],
                      kind: str = "dense") -> OpCost:
    """Per output position: a ConvTranspose from the layer's input to ``out_per_group``
    channels per group with ``kernel`` (the layer itself, or its small version)."""
    inputs = geom.in_channels * geom.inputs_per_output
    return OpCost("ConvTranspose", macs.conv_transpose(inputs, out_per_group, kernel),
                  inputs + geom.group * out_per_group, kind)
