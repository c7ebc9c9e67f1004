"""The plan: per layer, the structure found, the lowering chosen, and why.

Plain data.  The CLI tables, the JSON report and the tests all read it; a
decision that is not in the plan did not happen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .structure import Structure

REWRITE = "rewrite"
KEEP = "keep"


@dataclass(frozen=True)
class Lowering:
    """How the sum-pool is emitted.

    ``channel``: ``"cumsum"`` (CumSum over channels, then a Slice difference)
    or ``"matrix"`` (a fixed 0/1 1x1 Conv), or None when no channel pooling.
    ``spatial``: ``"avgpool"`` (AveragePool, window area folded into alpha)
    or ``"ones_conv"`` (depthwise all-ones Conv), or None.
    """

    channel: str | None
    spatial: str | None

    def label(self) -> str:
        parts = [p for p in (self.channel, self.spatial) if p]
        return "+".join(parts) if parts else "conv only"


@dataclass
class LayerPlan:
    """Everything decided about one layer.

    ``params_*`` count weights (the sum-pool's own constants included after);
    ``macs_*`` are multiply-adds at batch 1 (the pool's additions included),
    None when the shapes are not known; ``cost_*`` are the cost model's
    predictions in MAC-equivalents per output position; ``measured_ratio``
    is the chosen candidate's time over the original's, timed side by side
    on the layer alone (``select="measured"`` only).  ``residual`` (of
    ``chosen``) is the weight-space error ``||W - A alpha||_F / ||W||_F``.
    """

    node: str
    op: str
    weight_shape: tuple[int, ...]
    group: int = 1
    #: the least precise dtype the weight was stored in (a Cast may widen it)
    weight_dtype: str = ""
    best: Structure | None = None
    chosen: Structure | None = None
    lowering: Lowering | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    cost_before: float | None = None
    cost_after: float | None = None
    measured_ratio: float | None = None
    #: with calibration data: relative error of the layer's output (bias excluded) with
    #: the alpha written, and with the weight-space alpha (see :mod:`sconv_onnx.datafit`)
    output_error: float | None = None
    output_error_weight_alpha: float | None = None
    decision: str = KEEP
    reason: str = ""

    @property
    def rewritten(self) -> bool:
        return self.decision == REWRITE

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("best", "chosen"):
            value = getattr(self, key)
            data[key] = (
                None
                if value is None
                else {"sizes": list(value.sizes), "residual": value.residual, "label": value.label()}
            )
        data["lowering"] = None if self.lowering is None else asdict(self.lowering)
        data["weight_shape"] = list(self.weight_shape)
        return data


def decide_by_cost(layer: LayerPlan, select: str, gain_margin: float, note: str = "") -> None:
    """Rewrite ``layer`` when ``select="all"`` or its predicted cost ratio is at most
    ``gain_margin``; otherwise keep it.  ``note`` ends the reason (e.g. why it was
    not measured).  Needs ``chosen``, ``lowering``, ``cost_before`` and ``cost_after``.
    """
    ratio = layer.cost_after / layer.cost_before
    if select == "all" or ratio <= gain_margin:
        layer.decision = REWRITE
        prefix = "select=all; " if select == "all" else ""
        layer.reason = f"{prefix}predicted time {ratio:.2f}x{note}"
    else:
        layer.decision = KEEP
        label = layer.chosen.label()
        if layer.lowering is not None and layer.lowering.label() != "conv only":
            label += f" {layer.lowering.label()}"
        layer.reason = f"no gain predicted ({label}: {ratio:.2f}x){note}"


@dataclass
class Plan:
    """The per-layer plans of one model, with the settings that produced them."""

    tol: float
    select: str
    layers: list[LayerPlan] = field(default_factory=list)
    #: ``select="measured"``: the whole rewritten model's time over the original's.
    model_ratio: float | None = None
    #: the MAC budget (fraction of the original Conv/Gemm/MatMul MACs), when one was set
    target_macs: float | None = None
    #: how a budget's alphas were solved: ``"data"`` or ``"weights"`` (:mod:`sconv_onnx.budget`)
    alpha_fit: str | None = None

    @property
    def rewritten(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.rewritten]

    def totals(self) -> dict:
        """Sums over all analysed layers (MACs only when every layer's are known)."""
        layers = self.layers
        macs_known = all(layer.macs_before is not None for layer in layers)
        return {
            "layers": len(layers),
            "rewritten": len(self.rewritten),
            "params_before": sum(layer.params_before for layer in layers),
            "params_after": sum(
                layer.params_after if layer.rewritten else layer.params_before for layer in layers
            ),
            "macs_before": sum(layer.macs_before for layer in layers) if macs_known else None,
            "macs_after": (
                sum(layer.macs_after if layer.rewritten else layer.macs_before for layer in layers)
                if macs_known
                else None
            ),
        }

    def to_dict(self) -> dict:
        return {
            "tol": self.tol,
            "select": self.select,
            "model_ratio": self.model_ratio,
            "target_macs": self.target_macs,
            "alpha_fit": self.alpha_fit,
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": self.totals(),
        }
