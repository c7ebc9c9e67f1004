"""Graph-view helpers shared by the passes: walk every (sub)graph, read constant
weights (folding cheap, exact constant subgraphs), remove a weight's producers
once nothing reads it.

An initializer that is also a graph input (IR >= 4) is only a default: the
user may feed another value at run time, so it is no constant.  The view marks
such tensors (:func:`mark_overridable`) and :func:`constant_value` does not
read them.
"""

from __future__ import annotations

import math

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
#: Largest ``ConstantOfShape`` output, in elements, that :func:`constant_value` makes:
#: a few bytes of shape can ask for any size (a 4096 x 4096 weight is 2^24 elements,
#: 64 MiB in float32).
MAX_FILL_ELEMENTS = 2**24
#: A ``Constant`` node's number attributes and the dtype ONNX gives each.
CONSTANT_NUMBERS = {"value_float": np.float32, "value_floats": np.float32,
                    "value_int": np.int64, "value_ints": np.int64}
#: Attribute set by :func:`mark_overridable` on an initializer that is a graph input too.
OVERRIDABLE = "_sconv_overridable"


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


def default_domain(node: gs.Node) -> bool:
    """``node`` is an op of the default (ai.onnx) domain."""
    return node.domain in ("", "ai.onnx", None)


def mark_overridable(tensor: gs.Constant) -> None:
    """Mark ``tensor``, an initializer listed among the graph inputs, as no constant."""
    setattr(tensor, OVERRIDABLE, True)


def is_overridable(tensor) -> bool:
    """Whether ``tensor`` is an initializer that a graph input may override."""
    return getattr(tensor, OVERRIDABLE, False)


def constant_value(tensor, depth: int = 0) -> np.ndarray | None:
    """The value of ``tensor`` when it is constant: an initializer (not an overridable
    one), a ``Constant`` node's output, or :data:`FOLDABLE_OPS` applied to constants
    (a fold numpy refuses, or a ``ConstantOfShape`` above :data:`MAX_FILL_ELEMENTS`,
    is none); else None."""
    if isinstance(tensor, gs.Constant):
        return None if is_overridable(tensor) else np.asarray(tensor.values)
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if not default_domain(producer):
        return None
    if producer.op == "Constant":
        return _constant_node_value(producer)
    if producer.op not in FOLDABLE_OPS or depth >= MAX_FOLD_DEPTH or len(producer.outputs) != 1:
        return None
    inputs = []
    for operand in producer.inputs:
        value = constant_value(operand, depth + 1) if operand.name else None
        if operand.name and value is None:
            return None
        inputs.append(value)
    try:
        return _fold(producer, inputs)
    except (ValueError, TypeError, IndexError, KeyError):  # ill-formed: onnxruntime will say
        return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    """A ``Constant`` node's value: its ``value`` tensor, or a number or list of
    :data:`CONSTANT_NUMBERS` in its dtype (``sparse_value`` and strings: None)."""
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return np.asarray(value.values)
    for key, dtype in CONSTANT_NUMBERS.items():
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    return None


def _sources(tensor, depth: int = 0):
    """``tensor`` and the tensors it is folded from by :data:`FOLDABLE_OPS`, with the
    node that makes each (None for an initializer or a graph input)."""
    producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None
    yield tensor, producer
    if producer is None or not default_domain(producer) or producer.op not in FOLDABLE_OPS:
        return
    if depth < MAX_FOLD_DEPTH:
        for operand in producer.inputs:
            if operand.name:
                yield from _sources(operand, depth + 1)


def reads_overridable(tensor) -> bool:
    """Whether ``tensor`` is, or is folded from, an overridable initializer."""
    return any(is_overridable(source) for source, _ in _sources(tensor))


def not_constant_reason(tensor) -> str:
    """Why :func:`constant_value` of ``tensor`` is None, to follow "weight" or "bias":
    it is, or is folded from, an overridable initializer, or a ``ConstantOfShape``
    above :data:`MAX_FILL_ELEMENTS`; else it is not a constant."""
    if reads_overridable(tensor):
        return "is a graph input (overridable initializer)"
    for _, producer in _sources(tensor):
        if producer is not None and producer.op == "ConstantOfShape":
            shape = constant_value(producer.inputs[0]) if producer.inputs else None
            problem = _fill_problem(shape) if shape is not None else None
            if problem:
                return f"is a ConstantOfShape {problem}"
    return "is not a constant"


def _fill_problem(shape: np.ndarray) -> str | None:
    """Why a ``ConstantOfShape`` of ``shape`` is not folded, or None."""
    dims = [int(d) for d in np.ravel(shape)]
    if any(d < 0 for d in dims):
        return f"of negative shape {dims}"
    if math.prod(dims) > MAX_FILL_ELEMENTS:
        return f"of {math.prod(dims)} elements (at most {MAX_FILL_ELEMENTS} are folded)"
    return None


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
        if _fill_problem(x):
            return None
        fill = node.attrs.get("value")
        fill = np.asarray(fill.values).ravel() if isinstance(fill, gs.Constant) else np.zeros(1, np.float32)
        return np.full([int(d) for d in np.ravel(x)], fill[0], dtype=fill.dtype)
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
