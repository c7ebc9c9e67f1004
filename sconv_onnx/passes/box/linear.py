"""Structured fully connected layers: ``Gemm`` and ``MatMul`` with a constant weight.

A layer ``y = x W^T`` (``W``: ``OUT x IN``) is structured at ``c`` when
``W = alpha A(IN, c)^T``, i.e. every row of ``W`` is a sum of ``c`` windows
of ``IN - c + 1`` consecutive ones (the 1-D case of docs/DESIGN.md section 1,
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

from ... import cost
from ...plan import CHANNEL_SUMS, Candidate, Part
from ...structure import Structure, effective_tol, fit_alpha, search
from ..base import Emitter
from ..graphs import constant_value, drop_if_unused
from .conv import (
    CUMSUM_OPSET,
    BoxChoice,
    LayerSite,
    Lowering,
    operands_problem,
    read_node,
    search_weight_problem,
)
from .pools import WindowSum, count

OP_TYPES = ("Gemm", "MatMul")


@dataclass(kw_only=True)
class LinearSite(LayerSite):
    """A Gemm or MatMul node with, when constant, its weight as ``W`` (``OUT x IN``)."""

    geometry: cost.LinearGeometry | None = None
    opset: int = 0
    #: the axis of ``x`` that holds the input features
    feature_axis: int = -1


def stored_weight(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """``weight`` (``OUT x IN``) as the node stores it (``IN x OUT``, or ``OUT x IN`` for
    ``transB``)."""
    return weight if node.attrs.get("transB", 0) else weight.T


def find(view, family: str) -> list[LinearSite]:
    """Every Gemm and MatMul of the model, subgraphs included."""
    return [_site(family, owner, node, view.shapes(owner)[1], view.opset)
            for owner, node in view.nodes()
            if node.op in OP_TYPES and node.domain in ("", "ai.onnx", None)]


def _site(family, graph, node, concrete_shapes, opset) -> LinearSite:
    stored, bias, _, info = read_node(node)
    site = LinearSite(family=family, layers=(info,), graph=graph, node=node, opset=opset)
    site.skip_reason = operands_problem(node, stored, bias)
    if stored is None and constant_value(node.inputs[0]) is not None:
        site.skip_reason = "constant left operand (only x @ W is handled)"
    if site.skip_reason:
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
    site.weight = stored if node.op == "Gemm" and node.attrs.get("transB", 0) else stored.T
    site.skip_reason = search_weight_problem(site.weight)
    if site.skip_reason:
        return site
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        site.feature_axis = 0
    site.bias_size = int(bias.size) if bias is not None else 0
    x_dims = concrete_shapes.get(node.inputs[0].name)
    rows = None
    if x_dims and all(isinstance(d, int) for d in x_dims):
        rows = int(np.prod(x_dims)) // site.weight.shape[1]
    geom = site.geometry = cost.LinearGeometry(rows, site.weight.shape[1], site.weight.shape[0])
    site.price([cost.linear_op(geom, geom.in_features)], geom.positions)
    return site


def window_sum(site: LinearSite, under: int) -> tuple[WindowSum, tuple]:
    """The sliding sums over the features for ``c = under``, and their key (layers reading
    the same input with the same sums share them)."""
    step = WindowSum(site.feature_axis, site.geometry.in_features, under)
    key = ("features", id(site.graph), site.node.inputs[0].name, site.feature_axis,
           site.geometry.in_features, under)
    return step, key


def alpha_shape(site: LinearSite, structure: Structure) -> tuple[int, int]:
    """The small layer's weight as :func:`emit` solves it: ``(OUT, c)`` (stored transposed
    unless ``transB``)."""
    return (site.geometry.out_features, structure.channels)


def candidate(site: LinearSite, structure: Structure, family: str,
              alpha: np.ndarray | None = None, approximate: bool = False) -> Candidate:
    """``structure`` (``c``) as a :class:`~sconv_onnx.plan.Candidate`: sliding sums, then
    the layer with ``c`` inputs."""
    geom, under = site.geometry, structure.channels
    step, key = window_sum(site, under)
    pool_op = step.op(geom.in_features)
    layer_op = cost.linear_op(geom, under)
    parts = (
        Part("feature pool", count(step.constant_shapes()), (pool_op,), geom.positions, key),
        Part("layer", count([alpha_shape(site, structure)]) + site.bias_size, (layer_op,),
             geom.positions),
    )
    return Candidate(family=family, label=structure.label(), residual=structure.residual,
                     parts=parts, lowering="cumsum",
                     payload=BoxChoice(structure, Lowering("cumsum", None), alpha),
                     rounding_depth=1 + step.depth + under, approximate=approximate,
                     int8_risk=CHANNEL_SUMS)


def candidates(site: LinearSite, tol: float, family: str) -> list[Candidate]:
    """Every ``c`` within ``tol``, smallest first."""
    tol = effective_tol(tol, site.layer.weight_dtype)
    return [candidate(site, structure, family) for structure in search(site.weight, tol)
            if structure.channels != site.geometry.in_features]


def emit(site: LinearSite, choice: BoxChoice, emitter: Emitter) -> None:
    """Sliding sums over the input features (shared by key), then the same node with the
    small weight."""
    node, graph = emitter.node(site.node), emitter.graph_of(site.node)
    under = choice.structure.channels
    alpha = fit_alpha(site.weight, (under,)) if choice.alpha is None else choice.alpha
    assert alpha.shape == alpha_shape(site, choice.structure)
    alpha = alpha.astype(site.weight.dtype)
    at = emitter.at(site.node, site.name)
    step, key = window_sum(site, under)
    x = node.inputs[0]
    old_weight = node.inputs[1]
    node.inputs[0] = emitter.shared(key, lambda: step.emit(at, x, "feature_pool"))
    node.inputs[1] = at.constant("alpha", np.ascontiguousarray(stored_weight(node, alpha)))
    drop_if_unused(graph, old_weight)
