"""Cost model: MACs and predicted time of a Conv and of its structured lowerings.

Units.  Costs are in *MAC-equivalents per output position* of the layer
(batch 1): one multiply-add of a dense convolution counts 1.  Element-wise
and memory-bound work is charged per element it touches.  Decisions compare
ratios, so the unit cancels out.

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

import math
from dataclasses import dataclass

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

    def pooled_positions(self, window: tuple[int, ...]) -> float:
        """Positions of a stride-1 sum-pool with ``window``, per output position."""
        out = self.out_spatial
        if self.in_spatial is None or out is None or self.pads is None:
            return float(math.prod(self.strides))
        rank = len(self.kernel)
        pooled = [
            self.in_spatial[i] + self.pads[i] + self.pads[rank + i] - self.dilations[i] * (window[i] - 1)
            for i in range(rank)
        ]
        return math.prod(pooled) / max(1, math.prod(out))


@dataclass(frozen=True)
class OpCost:
    """One operator of a lowering, per output position of the layer.

    ``macs``: multiply-adds (a pool's additions count as MACs);
    ``elements``: tensor elements read and written; ``kind`` selects the
    price of a MAC: ``"dense"`` (1), ``"small"`` (a conv with a smaller
    kernel than the original, :data:`SMALL_KERNEL`), ``"pool"``
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
        price = {"dense": 1.0, "small": SMALL_KERNEL, "pool": POOL_ADD}[self.kind]
        return self.macs * price + self.elements * MEMORY


def original_ops(geom: ConvGeometry) -> list[OpCost]:
    """The untouched Conv."""
    macs = geom.out_channels * geom.in_channels_per_group * math.prod(geom.kernel)
    elements = geom.in_channels * math.prod(geom.strides) + geom.out_channels
    return [OpCost("Conv", macs, elements)]


def lowered_ops(
    geom: ConvGeometry,
    sizes: tuple[int, ...],
    channel: str | None,
    spatial: str | None,
    shared: frozenset[str] = frozenset(),
) -> list[OpCost]:
    """Channel pool, spatial sum-pool and small Conv for structure ``sizes``.

    ``shared`` names the pools (``"channel"``, ``"spatial"``) that another
    layer already computes on the same input: they cost nothing here.
    """
    under_c, under_k = sizes[0], sizes[1:]
    per_group = geom.in_channels_per_group
    window = tuple(k - n + 1 for k, n in zip(geom.kernel, under_k))
    full_positions = float(math.prod(geom.strides))
    ops: list[OpCost] = []
    pooled_channels = geom.in_channels
    if channel is not None:
        pooled_channels = geom.group * under_c
        if "channel" in shared:
            pass
        elif channel == "cumsum":
            inputs = geom.in_channels * full_positions
            macs = inputs + 2 * pooled_channels * full_positions
            ops.append(OpCost("CumSum", macs, inputs, kind="cumsum", nodes=6))
        else:
            ops.append(OpCost(
                "Conv",
                pooled_channels * per_group * full_positions,
                (geom.in_channels + pooled_channels) * full_positions,
            ))
    if spatial is not None and "spatial" not in shared:
        positions = geom.pooled_positions(window)
        ops.append(OpCost(
            "AveragePool" if spatial == "avgpool" else "Conv",
            pooled_channels * math.prod(window) * positions,
            2 * pooled_channels * positions,
            kind="pool",
        ))
    small_macs = geom.out_channels * under_c * math.prod(under_k)
    ops.append(OpCost(
        "Conv",
        small_macs,
        pooled_channels * full_positions + geom.out_channels,
        kind="small" if tuple(under_k) != tuple(geom.kernel) else "dense",
    ))
    return ops


def total_cost(geom, ops: list[OpCost]) -> float:
    """Predicted time in MAC-equivalents per output position.

    Each graph node also costs :data:`NODE_OVERHEAD` once per run, spread
    over the layer's output positions (``geom.positions``, when known).
    """
    positions = geom.positions
    overhead = NODE_OVERHEAD * sum(op.nodes for op in ops) / positions if positions else 0.0
    return sum(op.cost for op in ops) + overhead


def total_macs(geom, ops: list[OpCost]) -> int | None:
    """MACs (additions of the pools included) for batch 1, when shapes are known."""
    if geom.positions is None:
        return None
    return round(sum(op.macs for op in ops) * geom.positions)


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


def linear_ops(geom: LinearGeometry, under: int | None) -> list[OpCost]:
    """Per row: the layer as is (``under`` None), or sliding sums then a ``under``-input layer.

    At batch 1 a fully connected layer reads its whole weight for few rows,
    so the weight's elements are charged per row (:data:`MEMORY` each).
    """
    rows = geom.rows or 1
    features = geom.in_features if under is None else under
    ops = []
    if under is not None:
        ops.append(OpCost("CumSum", geom.in_features + 2 * under, geom.in_features,
                          kind="cumsum", nodes=6))
    macs = features * geom.out_features
    ops.append(OpCost("Gemm", macs, macs / rows + features + geom.out_features))
    return ops


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


def transpose_ops(geom: TransposeGeometry, sizes: tuple[int, ...] | None) -> list[OpCost]:
    """Per output position: the ConvTranspose as is (``sizes`` None), or its lowering.

    The lowering of structure ``(c, n)`` (see
    :mod:`sconv_onnx.passes.structured_conv_transpose`) is a ConvTranspose
    with ``c`` outputs per group and kernel ``n``, an all-ones depthwise
    Conv over the ``K-n+1`` window (when ``n != K``) and a 0/1 1x1 Conv that
    spreads ``c`` channels to ``C`` per group (when ``c != C``).  The
    intermediate tensors are charged at the output resolution.
    """
    per_input = geom.inputs_per_output
    in_elements = geom.in_channels * per_input
    if sizes is None:
        macs = geom.in_channels * geom.out_channels_per_group * math.prod(geom.kernel) * per_input
        return [OpCost("ConvTranspose", macs, in_elements + geom.out_channels)]
    under_c, under_k = sizes[0], tuple(sizes[1:])
    small_channels = geom.group * under_c
    ops = [OpCost(
        "ConvTranspose",
        geom.in_channels * under_c * math.prod(under_k) * per_input,
        in_elements + small_channels,
        kind="small" if under_k != tuple(geom.kernel) else "dense",
    )]
    if under_k != tuple(geom.kernel):
        window = math.prod(k - n + 1 for k, n in zip(geom.kernel, under_k))
        ops.append(OpCost("Conv", small_channels * window, 2 * small_channels, kind="pool"))
    if under_c != geom.out_channels_per_group:
        ops.append(OpCost("Conv", geom.out_channels * under_c, small_channels + geom.out_channels))
    return ops
