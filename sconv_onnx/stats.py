"""Whole-model statistics for the before/after table: ops, params, MACs, size."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx

from . import macs
from .modelio import graphs
from .shapes import known_dims


@dataclass
class ModelStats:
    """``macs`` counts the multiply-adds of :mod:`sconv_onnx.macs` (Conv, ConvTranspose,
    Gemm, MatMul, and the additions of AveragePool and CumSum) at the shapes given,
    except in nodes computed from constants alone (:func:`constant_tensors`:
    onnxruntime folds them when the session is created):
    the MAC context (:mod:`sconv_onnx.context`; None when a shape is unknown); ``params`` counts elements of initializers and
    ``Constant`` tensors; ``size`` is the serialized size in bytes."""

    ops: Counter = field(default_factory=Counter)
    params: int = 0
    macs: int | None = 0
    size: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ops"] = dict(sorted(self.ops.items()))
        return data


def _known(shapes: dict, name: str) -> list[int] | None:
    dims = shapes.get(name)
    return dims if known_dims(dims) else None


def _int_attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((attr.i for attr in node.attribute if attr.name == name), default)


def node_macs(node: onnx.NodeProto, shapes: dict) -> float | None:
    """MACs of one node (:mod:`sconv_onnx.macs`), or None when its shapes are unknown."""
    out = _known(shapes, node.output[0]) if node.output else None
    if node.op_type == "Conv":
        weight = _known(shapes, node.input[1])
        if out is None or weight is None:
            return None
        return macs.conv(math.prod(out), weight[1], weight[2:])
    if node.op_type == "ConvTranspose":
        x, weight = _known(shapes, node.input[0]), _known(shapes, node.input[1])
        if x is None or weight is None:
            return None
        return macs.conv_transpose(math.prod(x), weight[1], weight[2:])
    if node.op_type in ("Gemm", "MatMul"):
        a = _known(shapes, node.input[0])
        if out is None or a is None:
            return None
        transposed = node.op_type == "Gemm" and _int_attr(node, "transA")
        return macs.matmul(math.prod(out), a[-2] if transposed else a[-1])
    if node.op_type == "AveragePool":
        kernel = next(list(attr.ints) for attr in node.attribute if attr.name == "kernel_shape")
        return None if out is None else macs.pool(math.prod(out), kernel)
    if node.op_type == "CumSum":
        x = _known(shapes, node.input[0])
        return None if x is None else macs.cumsum(math.prod(x))
    return 0


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors of ``graph`` computed from constants alone: its initializers that are not
    graph inputs, ``Constant`` outputs, and the outputs of foldable nodes whose inputs are
    all such (nodes in graph order, as ONNX sorts them)."""
    inputs = {value.name for value in graph.input}
    constant = {init.name for init in graph.initializer} - inputs
    for node in graph.node:
        if node.op_type == "Constant" or (
                node.input and all(name in constant for name in node.input if name)
                and _foldable(node)):
            constant.update(node.output)
    return constant


def _foldable(node: onnx.NodeProto) -> bool:
    """A node onnxruntime can fold given constant inputs: of the standard domain, without
    subgraphs (an ``If`` or ``Loop`` body reads tensors of the enclosing graph) and not
    random."""
    return (node.domain in ("", "ai.onnx") and not node.op_type.startswith("Random")
            and not node.op_type.startswith("Multinomial")
            and not any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for attr in node.attribute))


def model_stats(model: onnx.ModelProto, shapes: dict) -> ModelStats:
    """Stats of ``model``; ``shapes`` maps main-graph tensor names to inferred dims."""
    stats = ModelStats(size=model.ByteSize())
    folded = constant_tensors(model.graph)
    for graph in graphs(model.graph):
        stats.params += sum(math.prod(init.dims) for init in graph.initializer)
        for node in graph.node:
            stats.ops[node.op_type] += 1
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        stats.params += math.prod(attr.t.dims)
            if graph is model.graph and stats.macs is not None and not (
                    node.output and node.output[0] in folded):
                count = node_macs(node, shapes)
                stats.macs = None if count is None else stats.macs + round(count)
    return stats
