"""Cost model: MACs and predicted time of a Conv and of its structured lowerings.

Units.  Costs are in *MAC-equivalents per output position* of the layer
(batch 1): one multiply-add of a dense convolution counts 1.  Element-wise
and memory-bound work is charged per element it touches.  Decisions compare
ratios, so the unit cancels out.

Constants come from the measurements in DESIGN.md section 2 (onnxruntime CPU,
2 cores):

* a 3x3 -> 2x2 rewrite ran at 0.47-0.51 of the time for a MAC ratio of 0.44,
  and 0.44-0.58 in our own single-layer runs: small kernels run about 15 %
  less efficiently per MAC (``SMALL_KERNEL``);
* channel pooling by CumSum + Slice-difference: 1x1 convs with c = C/2 ran
  at 1.03x (C=256) and 0.81x (C=512) of the original, i.e. about 150
  MAC-equivalents per input element; for 3x3 convs it beats the 0/1 matrix
  from C of about 256 on (0.30x vs 0.33x at C=512, 0.44x vs 0.40x at C=128);
* a fixed 0/1 1x1 conv costs its MACs, like any dense conv;
* depthwise and pooling work is memory-bound: ``MEMORY`` per element read or
  written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: MAC-equivalents per tensor element read or written by an operator.
MEMORY = 4.0
#: MAC-equivalents per input element of the CumSum channel pooling.
CUMSUM_ELEMENT = 150.0
#: Relative cost of a MAC in a conv whose kernel is smaller than the original.
SMALL_KERNEL = 1.15
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
    """One operator of a lowering, per output position: its MACs and predicted cost."""

    op: str
    macs: float
    cost: float


def _op(op: str, macs: float, elements: float, mac_weight: float = 1.0) -> OpCost:
    """An operator doing ``macs`` multiply-adds and touching ``elements`` elements."""
    return OpCost(op, macs, macs * mac_weight + elements * MEMORY)


def original_ops(geom: ConvGeometry) -> list[OpCost]:
    """The untouched Conv."""
    macs = geom.out_channels * geom.in_channels_per_group * math.prod(geom.kernel)
    elements = geom.in_channels * math.prod(geom.strides) + geom.out_channels
    return [_op("Conv", macs, elements)]


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
            ops.append(OpCost("CumSum", macs, CUMSUM_ELEMENT * inputs))
        else:
            ops.append(
                _op(
                    "Conv",
                    pooled_channels * per_group * full_positions,
                    (geom.in_channels + pooled_channels) * full_positions,
                )
            )
    if spatial is not None and "spatial" not in shared:
        positions = geom.pooled_positions(window)
        ops.append(
            _op(
                "AveragePool" if spatial == "avgpool" else "Conv",
                pooled_channels * math.prod(window) * positions,
                2 * pooled_channels * positions,
            )
        )
    small_macs = geom.out_channels * under_c * math.prod(under_k)
    ops.append(
        _op(
            "Conv",
            small_macs,
            pooled_channels * full_positions + geom.out_channels,
            mac_weight=SMALL_KERNEL if tuple(under_k) != tuple(geom.kernel) else 1.0,
        )
    )
    return ops


def total_cost(ops: list[OpCost]) -> float:
    """Predicted time in MAC-equivalents per output position."""
    return sum(op.cost for op in ops)


def total_macs(geom: ConvGeometry, ops: list[OpCost]) -> int | None:
    """MACs (additions of the pools included) for batch 1, when shapes are known."""
    if geom.out_spatial is None:
        return None
    return round(sum(op.macs for op in ops) * math.prod(geom.out_spatial))
