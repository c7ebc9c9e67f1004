"""The shape context MACs are counted in: one batch for every layer, shapes onnxruntime
observes where inference cannot tell them.

A model's MACs are counted at batch 1, or at the batch the user's
``--input-shape`` gives, whatever batch the verification or calibration data
has (a calibration set of 8 samples must not make a final MatMul, whose rows
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
from .shapes import declared_dims, graph_inputs
from .verify import random_feeds

#: The ops whose MACs are counted from their input and output shapes (:mod:`sconv_onnx.stats`).
COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "CumSum")


def context_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                   hinted: set[str]) -> dict[str, tuple[int, ...]]:
    """``shapes`` (the run's input shapes) with a dynamic leading (batch) dim set to 1,
    except for the inputs the user gave a shape for (``hinted``)."""
    context = dict(shapes)
    for inp in graph_inputs(model):
        dims, shape = declared_dims(inp), shapes.get(inp.name)
        if shape and inp.name not in hinted and dims and not isinstance(dims[0], int):
            context[inp.name] = (1, *shape[1:])
    return context


def context_feeds(model: onnx.ModelProto, context: dict, feeds: dict | None,
                  seed: int) -> dict:
    """Inputs at the ``context`` shapes: the user's arrays cut to the context's batch where
    they match it otherwise, else seeded random ones."""
    if feeds and all(name in feeds and np.asarray(feeds[name]).shape[1:] == tuple(shape[1:])
                     and len(feeds[name]) >= shape[0] for name, shape in context.items() if shape):
        return {name: np.asarray(feeds[name])[: context[name][0]] if context.get(name) else
                np.asarray(feeds[name]) for name in context}
    return random_feeds(model, context, seed)


def _known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)


def unknown_layer_tensors(model: onnx.ModelProto, shapes: dict) -> list[str]:
    """The inputs and outputs of the main graph's counted layers (:data:`COUNTED_OPS`)
    whose dims ``shapes`` does not tell."""
    names = []
    for node in model.graph.node:
        if node.op_type in COUNTED_OPS and node.domain in ("", "ai.onnx"):
            names += [name for name in list(node.input[:2]) + list(node.output[:1])
                      if name and not _known(shapes.get(name))]
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
