"""Graph-view helpers shared by the passes: walk every (sub)graph, read constant
weights (folding cheap, exact constant subgraphs), remove a weight's producers
once nothing reads it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

#: Attribute set on each subgraph by :func:`walk`: the graph that holds its node.
PARENT = "_sconv_parent"
#: Pure, exact ops whose output :func:`constant_value` computes when every
#: input is constant (a weight stored in another dtype or layout).
FOLDABLE_OPS = ("Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                "ConstantOfShape")
#: Longest chain of :data:`FOLDABLE_OPS` followed back from a weight.
MAX_FOLD_DEPTH = 8


def walk(graph: gs.Graph):
    """``(graph, node)`` for every node of ``graph`` and of its If/Loop/Scan bodies.

    Each body is tagged with its enclosing graph (:data:`PARENT`), so that
    :func:`drop_if_unused` can find an outer-scope producer.
    """
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                setattr(attr, PARENT, graph)
                yield from walk(attr)
        yield graph, node


def is_sorted(graph: gs.Graph) -> bool:
    """Whether in ``graph`` and each subgraph every node comes after the nodes of that
    graph whose outputs it reads."""
    scopes = {id(graph): graph}
    scopes.update((id(owner), owner) for owner, _ in walk(graph))
    for scope in scopes.values():
        local = {id(node) for node in scope.nodes}
        seen: set[int] = set()
        for node in scope.nodes:
            for tensor in node.inputs:
                producer = tensor.inputs[0] if tensor.inputs else None
                if producer is not None and id(producer) in local and id(producer) not in seen:
                    return False
            seen.add(id(node))
    return True


def _default_domain(node: gs.Node) -> bool:
    return node.domain in ("", "ai.onnx", None)


def constant_value(tensor, depth: int = 0) -> np.ndarray | None:
    """The value of ``tensor`` when it is constant: an initializer, a ``Constant``
    node's output, or :data:`FOLDABLE_OPS` applied to constants; else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if not _default_domain(producer):
        return None
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    if producer.op not in FOLDABLE_OPS or depth >= MAX_FOLD_DEPTH or len(producer.outputs) != 1:
        return None
    inputs = []
    for operand in producer.inputs:
        value = constant_value(operand, depth + 1) if operand.name else None
        if operand.name and value is None:
            return None
        inputs.append(value)
    return _fold(producer, inputs)


def stored_dtypes(tensor, depth: int = 0) -> list[np.dtype]:
    """Dtypes a constant weight was stored in along its fold chain, itself first.

    A weight kept in float16 or bfloat16 and widened by a ``Cast`` carries the
    narrow dtype's rounding: its tolerance floor is the narrow one's
    (:func:`sconv_onnx.structure.effective_tol`).
    """
    if isinstance(tensor, gs.Constant):
        return [np.asarray(tensor.values).dtype]
    value = constant_value(tensor, depth)
    if value is None:
        return []
    producer = tensor.inputs[0]
    upstream = []
    if producer.op in FOLDABLE_OPS and producer.op != "ConstantOfShape" and depth < MAX_FOLD_DEPTH:
        upstream = stored_dtypes(producer.inputs[0], depth + 1)
    return [value.dtype] + upstream


def _axes(node: gs.Node, inputs: list) -> list[int] | None:
    """Squeeze/Unsqueeze axes: the attribute (opset < 13) or the second input."""
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in np.ravel(inputs[1])]
    axes = node.attrs.get("axes")
    return [int(a) for a in axes] if axes is not None else None


def _fold(node: gs.Node, inputs: list) -> np.ndarray | None:
    """``node``'s output from constant ``inputs`` (numpy semantics equal ONNX's here)."""
    x = inputs[0] if inputs else None
    op = node.op
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if op == "Reshape":
        shape = [int(d) for d in inputs[1]]
        if not node.attrs.get("allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if op == "Transpose":
        return np.transpose(x, node.attrs.get("perm"))
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Squeeze":
        axes = _axes(node, inputs)
        return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
    if op == "Unsqueeze":
        axes = _axes(node, inputs)
        rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))
    if op == "ConstantOfShape":
        fill = node.attrs.get("value")
        fill = np.asarray(fill.values).ravel() if isinstance(fill, gs.Constant) else np.zeros(1, np.float32)
        return np.full([int(d) for d in x], fill[0], dtype=fill.dtype)
    return None


def _owner(graph: gs.Graph, node: gs.Node) -> gs.Graph | None:
    """The graph of ``graph``'s scope chain (itself, then enclosing ones) holding ``node``."""
    scope = graph
    while scope is not None:
        if any(candidate is node for candidate in scope.nodes):
            return scope
        scope = getattr(scope, PARENT, None)
    return None


def drop_if_unused(graph: gs.Graph, tensor) -> None:
    """Remove the ``Constant`` or :data:`FOLDABLE_OPS` node behind ``tensor`` once
    nothing reads it, then its own unread inputs' producers, in ``graph`` or an
    enclosing scope.

    An unused initializer needs nothing: the export writes only referenced
    ones.  Graph outputs and tensors still read anywhere (subgraphs
    included) are kept.
    """
    if isinstance(tensor, gs.Constant) or tensor.outputs or len(tensor.inputs) != 1:
        return
    producer = tensor.inputs[0]
    if producer.op != "Constant" and producer.op not in FOLDABLE_OPS:
        return
    owner = _owner(graph, producer)
    if owner is None:
        return
    if any(out.outputs or out in owner.outputs for out in producer.outputs):
        return
    operands = [t for t in producer.inputs if t.name]
    owner.nodes.remove(producer)
    producer.inputs.clear()
    producer.outputs.clear()
    for operand in operands:
        drop_if_unused(owner, operand)
