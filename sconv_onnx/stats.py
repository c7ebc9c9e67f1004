"""Whole-model statistics for the before/after table: ops, params, MACs, size."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx


@dataclass
class ModelStats:
    """``macs`` counts multiply-adds of Conv, ConvTranspose, Gemm and MatMul plus the additions
    of AveragePool and CumSum, at the verification input shapes (None when a
    shape is unknown); ``params`` counts elements of initializers and
    ``Constant`` tensors; ``size`` is the serialized size in bytes."""

    ops: Counter = field(default_factory=Counter)
    params: int = 0
    macs: int | None = 0
    size: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ops"] = dict(sorted(self.ops.items()))
        return data


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """Multiply-adds of one node, or None when its shapes are unknown."""
    def known(name):
        dims = shapes.get(name)
        return dims if dims is not None and all(isinstance(d, int) for d in dims) else None

    out = known(node.output[0]) if node.output else None
    if node.op_type == "Conv":
        weight = known(node.input[1])
        if out is None or weight is None:
            return None
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":  # each input element spreads over (C/g) x prod(K) outputs
        x, weight = known(node.input[0]), known(node.input[1])
        if x is None or weight is None:
            return None
        return math.prod(x) * math.prod(weight[1:])
    if node.op_type in ("Gemm", "MatMul"):
        a = known(node.input[0])
        if out is None or a is None:
            return None
        transposed = node.op_type == "Gemm" and any(
            attr.name == "transA" and attr.i for attr in node.attribute
        )
        inner = a[-2] if transposed else a[-1]
        return math.prod(out) * inner
    if node.op_type == "AveragePool":
        kernel = next(list(attr.ints) for attr in node.attribute if attr.name == "kernel_shape")
        return None if out is None else math.prod(out) * math.prod(kernel)
    if node.op_type == "CumSum":
        x = known(node.input[0])
        return None if x is None else math.prod(x)
    return 0


def model_stats(model: onnx.ModelProto, shapes: dict) -> ModelStats:
    """Stats of ``model``; ``shapes`` maps main-graph tensor names to inferred dims."""
    stats = ModelStats(size=model.ByteSize())
    for graph in _graphs(model.graph):
        stats.params += sum(math.prod(init.dims) for init in graph.initializer)
        for node in graph.node:
            stats.ops[node.op_type] += 1
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        stats.params += math.prod(attr.t.dims)
            if graph is model.graph and stats.macs is not None:
                macs = _node_macs(node, shapes)
                stats.macs = None if macs is None else stats.macs + macs
    return stats
