"""Graph-view helpers shared by the passes: walk every (sub)graph, read constant
weights, remove a weight once nothing reads it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def walk(graph: gs.Graph):
    """``(graph, node)`` for every node of ``graph`` and of its If/Loop/Scan bodies."""
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield from walk(attr)
        yield graph, node


def constant_value(tensor) -> np.ndarray | None:
    """The value of ``tensor`` when it is an initializer or a ``Constant`` node's output."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        value = producer.attrs.get("value") if producer.op == "Constant" else None
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def drop_if_unused(graph: gs.Graph, tensor) -> None:
    """Remove the ``Constant`` node behind ``tensor`` once nothing reads it.

    An unused initializer needs nothing: the export writes only referenced ones.
    """
    if tensor.outputs or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return
    if tensor in graph.outputs:
        return
    producer = tensor.inputs[0]
    if producer.op == "Constant" and producer in graph.nodes:
        graph.nodes.remove(producer)
        producer.outputs.clear()
