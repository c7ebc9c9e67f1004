"""The plan: per layer, the candidates found, the one chosen, and why.

Plain data.  The CLI tables, the JSON report and the tests all read it; a
decision that is not in the plan did not happen.  The rewrite takes its
decisions from the plan alone: which candidate each layer gets, with the
candidate's ``payload`` (e.g. a data-fitted alpha); what a family derives
from them and the site's weight (the weight-space least squares) is a
function of the two.

A :class:`Candidate` is one way a family can rewrite a site.  What it costs
is a sum of :class:`Part` s, so that a piece another layer already computes
(a shared sum-pool, a shared generator) is charged once: the
:mod:`~sconv_onnx.select` module passes the keys already taken.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .cost import OpCost, total_cost

#: :attr:`Candidate.int8_risk` of a rewrite that pools over channels or input features.
CHANNEL_SUMS = "it pools over channels, whose sums int8 cannot hold"
#: :attr:`Candidate.int8_risk` of a spatial pool before the small conv where one after it
#: would do (:mod:`sconv_onnx.passes.box.pools`, ``avgpool_after``).
POOL_BEFORE = ("its pool's output is rounded to int8 and the small conv amplifies that "
               "rounding; the pool after the conv averages it instead")
#: :attr:`Candidate.int8_risk` of a rewrite that computes the layer's weight in the graph.
REBUILT_WEIGHT = "it rebuilds the weight in the graph, which onnxruntime's quantizers refuse"

Decision = Literal["rewrite", "keep"]
#: How candidates are chosen (:mod:`sconv_onnx.select`).
SelectMode = Literal["cost", "all", "measured"]
#: What settled a layer's decision:
#: ``skipped`` (the family cannot handle it: see the reason), ``no_candidate`` (no
#: structure within the tolerance), ``cost``, ``all``, ``measured`` (the selection
#: mode's rule), ``budget`` (the MAC budget's greedy step) or ``excluded`` (kept by
#: the whole-model check of ``select="measured"``).
DecidedBy = Literal["skipped", "no_candidate", "cost", "all", "measured", "budget", "excluded"]

REWRITE: Decision = "rewrite"
KEEP: Decision = "keep"
SELECT_MODES: tuple[SelectMode, ...] = ("cost", "all", "measured")


@dataclass(frozen=True)
class Part:
    """A piece of a candidate's rewrite and what it adds.

    ``params``: constant elements it writes; ``ops``: its operators, per output
    position of the layer (:class:`sconv_onnx.cost.OpCost`), at ``positions``
    output positions (batch 1; None when the shapes are unknown).  ``macs`` and
    ``cost`` derive from them (:mod:`sconv_onnx.macs`,
    :func:`sconv_onnx.cost.total_cost`, with the cost model's current
    constants): per run, or per output position when the positions are
    unknown.  A ``key`` marks a piece that another layer may compute too (the
    same sum-pool of the same tensor): it is charged to the first layer
    decided that uses it.  ``member`` is the key (:attr:`LayerPlan.key`, the
    layer's first output tensor) of the group site's layer it belongs to
    (None: the whole site, charged to its first layer).
    """

    kind: str
    params: int
    ops: tuple[OpCost, ...]
    positions: int | None
    key: Hashable | None = None
    member: str | None = None

    @property
    def macs(self) -> float:
        return math.fsum(op.macs for op in self.ops) * (self.positions or 1)

    @property
    def cost(self) -> float:
        return total_cost(self.positions, self.ops)


@dataclass(frozen=True)
class Candidate:
    """One way to rewrite a site: pure data, made by a family's ``candidates``.

    ``label`` names the structure (e.g. ``c=32 n=2x2``), ``lowering`` how it is
    emitted (e.g. ``matrix+avgpool``; empty when there is one way);
    ``residual`` is the weight-space distance ``||W - W'||_F / ||W||_F``;
    ``parts`` what it costs; ``payload`` what the family's ``emit`` needs
    (opaque to the selector; ``payload.to_dict()``, when it has one, goes to
    the JSON report).  ``rounding_depth`` bounds the float
    additions an output takes through the rewrite (its rounding error is at
    most about ``rounding_depth * u`` of the magnitudes summed, ``u`` the
    dtype's unit roundoff).  ``absorbs`` names nodes the rewrite removes
    besides the layer (a folded BatchNormalization).  ``approximate``
    candidates lie outside the tolerance and are offered only to the MAC
    budget, with their output errors on the calibration data.  A ``size_only``
    group candidate runs as its layers do (its parts carry their own ops: a
    kernel rebuilt from constants, folded when the model is loaded) and
    stores fewer params; ``members`` names the layer keys a group candidate
    covers when the selector took it for some of its site's layers (None: all).
    ``int8_risk`` says why int8 quantization would not hold the rewrite
    (empty: it would; ``optimize(int8=True)`` leaves such candidates out):
    :data:`CHANNEL_SUMS` (sums over many channels, whose common part fills
    the 256 levels while the small conv after them takes differences of
    neighbouring windows; CumSum running sums are worse) or
    :data:`REBUILT_WEIGHT` (a weight computed in the graph, which onnxruntime's
    quantizers refuse: they want initializers).  Small spatial windows are
    safe.
    """

    family: str
    label: str
    residual: float
    parts: tuple[Part, ...]
    lowering: str = ""
    payload: Any = field(default=None, compare=False, repr=False)
    rounding_depth: int = 0
    absorbs: tuple[str, ...] = ()
    approximate: bool = False
    output_error: float | None = None
    output_error_weight_alpha: float | None = None
    size_only: bool = False
    members: tuple[str, ...] | None = None
    int8_risk: str = ""

    @property
    def int8_safe(self) -> bool:
        return not self.int8_risk

    def _unshared(self, taken: Iterable[Hashable]) -> list[Part]:
        taken = set(taken)
        return [part for part in self.parts if part.key is None or part.key not in taken]

    def shared(self, taken: Iterable[Hashable]) -> tuple[str, ...]:
        """Kinds of the parts that an earlier layer computes already (their keys in ``taken``)."""
        taken = set(taken)
        return tuple(part.kind for part in self.parts if part.key is not None and part.key in taken)

    def params(self, taken: Iterable[Hashable] = ()) -> int:
        return sum(part.params for part in self._unshared(taken))

    def macs(self, taken: Iterable[Hashable] = ()) -> int:
        """MACs at batch 1 (per output position when the shapes are unknown), less ``taken``."""
        return round(math.fsum(part.macs for part in self._unshared(taken)))

    def cost(self, taken: Iterable[Hashable] = ()) -> float:
        """Predicted time (:func:`sconv_onnx.cost.total_cost`), less ``taken``."""
        return math.fsum(part.cost for part in self._unshared(taken))

    @property
    def keys(self) -> tuple[Hashable, ...]:
        """The keys of its shareable parts."""
        return tuple(part.key for part in self.parts if part.key is not None)

    def details(self) -> dict:
        """The payload's own description (``payload.to_dict()``), for the JSON report."""
        describe = getattr(self.payload, "to_dict", None)
        return describe() if describe is not None else {}

    @property
    def per_run(self) -> bool:
        """Whether ``macs`` and ``cost`` are per run (shapes known), not per output position."""
        return all(part.positions is not None for part in self.parts)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "label": self.label,
            "lowering": self.lowering,
            "residual": self.residual,
            "params": self.params(),
            "macs": self.macs(),
            "cost": self.cost(),
            "units": "per run" if self.per_run else "per output position",
            "rounding_depth": self.rounding_depth,
            "approximate": self.approximate,
            "details": self.details(),
            "int8_risk": self.int8_risk,
        }


@dataclass
class LayerPlan:
    """Everything decided about one layer.

    ``params_*`` count weights (the rewrite's own constants included after);
    ``macs_*`` are multiply-adds at batch 1 (:mod:`sconv_onnx.macs`), None
    when the shapes are not known; ``cost_*`` are the cost model's
    predictions in MAC-equivalents per run (per output position, without the
    node overhead, when the shapes are not known: comparable within a layer
    only).  The ``*_after`` values are the
    chosen candidate's, less the parts it shares (``shared``: computed by an
    earlier layer).  ``best`` is the layer's most compressive candidate within
    the tolerance, ``chosen`` the one the decision is about (rewritten, or
    kept with the reason).  ``measured_ratio`` is the chosen candidate's time
    over the original's, timed side by side on the layer alone
    (``select="measured"`` only).  With calibration data, ``output_error`` is
    the relative error of the layer's output (bias excluded) with the weights
    written, ``output_error_weight_alpha`` with the weight-space least-squares
    ones (see :mod:`sconv_onnx.datafit`).
    """

    node: str
    op: str
    weight_shape: tuple[int, ...]
    #: the layer's first output tensor: unique in the model (SSA), so the layer's key
    key: str = ""
    group: int = 1
    #: the least precise dtype the weight was stored in (a Cast may widen it)
    weight_dtype: str = ""
    family: str | None = None
    best: Candidate | None = None
    chosen: Candidate | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    cost_before: float | None = None
    cost_after: float | None = None
    measured_ratio: float | None = None
    output_error: float | None = None
    output_error_weight_alpha: float | None = None
    decision: Decision = KEEP
    decided_by: DecidedBy = "no_candidate"
    #: kinds of the chosen candidate's parts computed by an earlier layer (e.g. ``channel pool``)
    shared: tuple[str, ...] = ()
    #: nodes the rewrite removes besides the layer (e.g. a folded BatchNormalization)
    folded: tuple[str, ...] = ()
    #: why the layer was excluded (the whole-model check of ``select="measured"``), if it was
    excluded: str | None = None
    reason: str = ""

    @property
    def rewritten(self) -> bool:
        return self.decision == REWRITE

    @property
    def residual(self) -> float | None:
        candidate = self.chosen or self.best
        return None if candidate is None else candidate.residual

    def to_dict(self) -> dict:
        """Every field; a kept layer's ``*_after`` values are None (it has no rewrite)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.rewritten:
            data["params_after"] = data["macs_after"] = data["cost_after"] = None
        data["weight_shape"] = list(self.weight_shape)
        for key in ("best", "chosen"):
            value = getattr(self, key)
            data[key] = None if value is None else value.to_dict()
        data["shared"], data["folded"] = list(self.shared), list(self.folded)
        return data


@dataclass
class Plan:
    """The per-layer plans of one model, with the settings that produced them."""

    tol: float
    select: SelectMode
    layers: list[LayerPlan] = field(default_factory=list)
    #: the families that looked for sites, in the order they were asked
    families: tuple[str, ...] = ()
    #: ``select="measured"``: the whole rewritten model's time over the original's.
    model_ratio: float | None = None
    #: the MAC budget (fraction of the original layers' MACs), when one was set
    target_macs: float | None = None
    #: how a budget's alphas were solved: ``"data"`` or ``"weights"`` (:mod:`sconv_onnx.budget`)
    alpha_fit: str | None = None
    #: what the selection has to say about the whole plan (e.g. a budget out of reach)
    notes: list[str] = field(default_factory=list)
    #: a budget's approximate candidates per layer key it could move (not reported)
    budget_options: dict = field(default_factory=dict, repr=False)
    #: how many moves the budget's greedy sequence had before any cut (not reported)
    budget_moves: int = 0
    #: a budget's refitted candidates: ``id(refit)`` -> the site's candidate it was
    #: fitted from, so that the refit is emitted for that site (not reported)
    refit_of: dict = field(default_factory=dict, repr=False)
    #: a budget's fidelity on the calibration data, as checked against its bound
    #: (:mod:`sconv_onnx.endtoend`); None without a budget
    budget_check: dict | None = None
    #: planned for int8 quantization: candidates int8 cannot hold were left out
    int8: bool = False

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
            "families": list(self.families),
            "model_ratio": self.model_ratio,
            "target_macs": self.target_macs,
            "alpha_fit": self.alpha_fit,
            "int8": self.int8,
            "budget_check": self.budget_check,
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": self.totals(),
        }
