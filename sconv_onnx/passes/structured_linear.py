"""Structured fully connected layers: ``Gemm`` and ``MatMul`` with a constant weight.

A layer ``y = x W^T`` (``W``: ``OUT x IN``) is structured at ``c`` when
``W = alpha A(IN, c)^T``, i.e. every row of ``W`` is a sum of ``c`` windows
of ``IN - c + 1`` consecutive ones (the 1-D case of DESIGN.md section 1,
along the input features).  Then

    x W^T == S(x) alpha^T,   S(x)_j = x_j + .. + x_(j+IN-c)   (j < c)

so the layer becomes sliding sums over the features (CumSum, then a Slice
difference) and a layer with ``c`` inputs: ``OUT*c`` weights and MACs per
row instead of ``OUT*IN``.  ``Gemm`` keeps ``transA``, ``transB``,
``alpha``, ``beta`` and ``C``; ``MatMul`` keeps any leading dims of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import cost
from ..lowering import NodeEmitter, emit_window_sum
from ..plan import LayerPlan, Lowering, decide_by_cost
from ..structure import effective_tol, fit_alpha, narrowest_dtype, search
from .graphs import constant_value, drop_if_unused, stored_dtypes, walk
from .structured_conv import CUMSUM_OPSET, PlanContext

OP_TYPES = ("Gemm", "MatMul")
#: The constants a window sum adds (axis, axes, zero, count, upper start and end).
WINDOW_SUM_CONSTANTS = 6


@dataclass
class LinearSite:
    """A Gemm or MatMul node with, when constant, its weight as ``W`` (``OUT x IN``)."""

    graph: gs.Graph
    node: gs.Node
    name: str
    weight: np.ndarray | None
    geometry: cost.LinearGeometry | None
    opset: int
    feature_axis: int = -1
    skip_reason: str | None = None
    #: alpha (``OUT x c``) to write instead of the weight-space least squares (:mod:`..budget`)
    alpha: np.ndarray | None = None

    @property
    def stored_weight(self) -> np.ndarray:
        """The weight as the node stores it (``IN x OUT``, or ``OUT x IN`` for ``transB``)."""
        return self.weight if self.node.attrs.get("transB", 0) else self.weight.T


def find(graph: gs.Graph, static_shapes: dict, concrete_shapes: dict, opset: int) -> list[LinearSite]:
    """Every Gemm and MatMul of ``graph`` and of its subgraphs."""
    sites = []
    for owner, node in walk(graph):
        if node.op in OP_TYPES and node.domain in ("", "ai.onnx", None):
            shapes = concrete_shapes if owner is graph else {}
            sites.append(_site(owner, node, shapes, opset))
    return sites


def _site(graph, node, concrete_shapes, opset) -> LinearSite:
    name = node.name or node.outputs[0].name
    stored = constant_value(node.inputs[1])
    site = LinearSite(graph, node, name, None, None, opset)
    if stored is None:
        site.skip_reason = "weight is not a constant"
        if constant_value(node.inputs[0]) is not None:
            site.skip_reason = "constant left operand (only x @ W is handled)"
        return site
    if stored.ndim != 2:
        site.skip_reason = f"weight of rank {stored.ndim} (a batched MatMul)"
        return site
    if stored.dtype not in (np.float32, np.float64):
        site.skip_reason = f"weight dtype {stored.dtype}: onnxruntime's CumSum takes float32/float64"
        return site
    if opset < CUMSUM_OPSET:
        site.skip_reason = f"opset {opset} has no CumSum"
        return site
    transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
    site.weight = stored if transposed else stored.T
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        site.feature_axis = 0
    x_dims = concrete_shapes.get(node.inputs[0].name)
    rows = None
    if x_dims and all(isinstance(d, int) for d in x_dims):
        rows = int(np.prod(x_dims)) // site.weight.shape[1]
    site.geometry = cost.LinearGeometry(rows, site.weight.shape[1], site.weight.shape[0])
    return site


def plan(site: LinearSite, context: PlanContext) -> LayerPlan:
    """Decide ``site``: the smallest ``c`` within ``tol``, rewritten by cost unless ``select=all``.

    ``select="measured"`` has no single-layer timing for these layers yet
    and decides by the cost model (said in the reason).
    """
    layer = LayerPlan(node=site.name, op=site.node.op,
                      weight_shape=tuple(site.stored_weight.shape) if site.weight is not None else ())
    if site.skip_reason:
        layer.reason = site.skip_reason
        return layer
    geom = site.geometry
    layer.params_before = int(site.weight.size) + bias_size(site)
    before = cost.linear_ops(geom, None)
    layer.cost_before = cost.total_cost(geom, before)
    layer.macs_before = cost.total_macs(geom, before)
    layer.weight_dtype = narrowest_dtype(site.weight.dtype, *stored_dtypes(site.node.inputs[1]))
    tol = effective_tol(context.tol, layer.weight_dtype)
    nontrivial = [s for s in search(site.weight, tol) if s.sizes[0] != geom.in_features]
    if not nontrivial:
        layer.reason = f"no structure within tol {tol:g}"
        return layer
    layer.best = nontrivial[0]
    fill_choice(layer, site, layer.best)
    unmeasured = " (not measured: no single-layer timing for Gemm/MatMul)" if (
        context.select == "measured") else ""
    decide_by_cost(layer, context.select, cost.GAIN_MARGIN, unmeasured)
    return layer


def bias_size(site: LinearSite) -> int:
    """Elements of a constant ``C`` (Gemm), else 0."""
    bias = site.node.inputs[2] if len(site.node.inputs) > 2 else None
    value = constant_value(bias) if bias is not None else None
    return int(value.size) if value is not None else 0


def fill_choice(layer: LayerPlan, site: LinearSite, structure) -> None:
    """Record ``structure`` as ``layer``'s choice: predicted cost, MACs and params."""
    geom = site.geometry
    ops = cost.linear_ops(geom, structure.channels)
    layer.chosen, layer.lowering = structure, Lowering("cumsum", None)
    layer.cost_after = cost.total_cost(geom, ops)
    layer.macs_after = cost.total_macs(geom, ops)
    layer.params_after = (geom.out_features * structure.channels + bias_size(site)
                          + WINDOW_SUM_CONSTANTS)


def rewrite(site: LinearSite, layer: LayerPlan, taken_names: set[str], pools: dict) -> None:
    """Sliding sums over the input features, then the same node with the small weight."""
    node, under = site.node, layer.chosen.channels
    alpha = fit_alpha(site.weight, (under,)) if site.alpha is None else site.alpha
    alpha = alpha.astype(site.weight.dtype)  # OUT x c
    emitter = NodeEmitter(site.graph, node, site.name, taken_names)
    key = ("features", id(site.graph), node.inputs[0].name, site.feature_axis, site.geometry.in_features, under)
    if key not in pools:
        pools[key] = emit_window_sum(
            emitter, node.inputs[0], site.feature_axis, site.geometry.in_features, under,
            "feature_pool",
        )
    old_weight = node.inputs[1]
    node.inputs[0] = pools[key]
    transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
    node.inputs[1] = emitter.constant("alpha", alpha if transposed else np.ascontiguousarray(alpha.T))
    drop_if_unused(site.graph, old_weight)
