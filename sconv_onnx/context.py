"""The shape context MACs are counted in: one batch for every layer, shapes onnxruntime
observes where inference cannot tell them.

A model's MACs are counted at batch 1, whatever batch the verification or
calibration data, or an ``--input-shape`` hint, has (a calibration set of 8 samples must not make a final MatMul, whose rows
carry the batch, look 8 times larger than the convs, whose positions are
counted per sample).  Where onnx's shape inference cannot tell the shapes of a
layer's tensors in the main graph (a ``Reshape`` to a computed shape, a
``Loop``'s outputs), onnxruntime runs the model once at the context's shapes
with those tensors as extra outputs, so that no layer is left out of the
count or of a MAC budget.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import InputError
from .runtime import observe
from .shapes import declared_dims, graph_inputs, known_dims
from .verify import random_feeds

#: The ops whose MACs are counted from their input and output shapes (:mod:`sconv_onnx.stats`).
COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "CumSum")


def context_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, tuple[int, ...]]:
    """``shapes`` (the run's input shapes) at batch 1: the leading dim set to 1 where the
    model declares it dynamic, in every input of rank 2 or more.

    Left as they are when that dim may not be a batch: inputs whose leading
    symbols differ, or a symbol that an input also carries elsewhere (a
    time-major ``[T, N, F]`` beside ``[N, F]``, or a rank-1 ``[N]``).
    """
    inputs = graph_inputs(model)
    declared = {inp.name: declared_dims(inp) for inp in inputs}
    leading = {name: dims[0] for name, dims in declared.items()
               if len(dims) >= 2 and not isinstance(dims[0], int) and shapes.get(name)}
    symbols = set(leading.values())
    elsewhere = {dim for dims in declared.values() for dim in dims[1:] if isinstance(dim, str)}
    elsewhere |= {dims[0] for dims in declared.values() if len(dims) == 1}
    if len(symbols) != 1 or symbols & elsewhere:
        return dict(shapes)
    return {name: (1, *shape[1:]) if name in leading else shape for name, shape in shapes.items()}


def context_feeds(model: onnx.ModelProto, context: dict, feeds: dict | None,
                  seed: int) -> dict:
    """Inputs at the ``context`` shapes: the user's arrays cut to the context's batch (they
    hold every input, checked), else seeded random ones."""
    if feeds:
        return {name: np.asarray(value)[: context[name][0]] if context.get(name) else value
                for name, value in feeds.items()}
    return random_feeds(model, context, seed)


def unknown_layer_tensors(model: onnx.ModelProto, shapes: dict) -> list[str]:
    """The inputs and outputs of the main graph's counted layers (:data:`COUNTED_OPS`)
    whose dims ``shapes`` does not tell."""
    names = []
    for node in model.graph.node:
        if node.op_type in COUNTED_OPS and node.domain in ("", "ai.onnx"):
            names += [name for name in list(node.input[:2]) + list(node.output[:1])
                      if name and not known_dims(shapes.get(name))]
    return list(dict.fromkeys(names))


def with_observed(model: onnx.ModelProto, shapes: dict, feeds_at_context) -> tuple[dict, int]:
    """``shapes`` completed with what onnxruntime observes for the counted layers' tensors
    it does not tell (:func:`unknown_layer_tensors`); and how many it observed.
    ``feeds_at_context()`` makes the inputs, only when something is unknown."""
    unknown = unknown_layer_tensors(model, shapes)
    if not unknown or feeds_at_context is None:
        return shapes, 0
    try:
        feeds = feeds_at_context()
    except InputError:  # inputs it cannot make (strings): the shapes stay unknown
        return shapes, 0
    observed = {name: dims for name, (_, dims) in observe(model, unknown, feeds).items()}
    return {**shapes, **observed}, len(observed)
