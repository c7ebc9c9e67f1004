"""A float32 copy of a bfloat16 model, so that onnxruntime's CPU provider can verify it.

onnxruntime 1.31's CPU provider has no bfloat16 Conv (a bfloat16 model is
rejected at load: "Type 'tensor(bfloat16)' ... is invalid").  Verification
then runs both models with every bfloat16 tensor widened to float32:
weights keep their bfloat16 values exactly (widening is exact), only the
arithmetic is float32.  It checks the rewrite (structure, alpha, rounding of
alpha to bfloat16), not bfloat16 arithmetic.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from .modelio import graphs

BFLOAT16 = onnx.TensorProto.BFLOAT16
FLOAT = onnx.TensorProto.FLOAT


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """True when a graph input, output or initializer of the main graph is bfloat16."""
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    return (any(v.type.tensor_type.elem_type == BFLOAT16 for v in values)
            or any(init.data_type == BFLOAT16 for init in graph.initializer))


def _widen_tensor(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == BFLOAT16:
        values = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _widen_graph(graph: onnx.GraphProto) -> None:
    """Widen ``graph`` and its subgraphs in place."""
    for scope in graphs(graph):
        for init in scope.initializer:
            _widen_tensor(init)
        for value in list(scope.input) + list(scope.output) + list(scope.value_info):
            if value.type.tensor_type.elem_type == BFLOAT16:
                value.type.tensor_type.elem_type = FLOAT
        for node in scope.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    _widen_tensor(attr.t)
                elif node.op_type == "Cast" and attr.name == "to" and attr.i == BFLOAT16:
                    attr.i = FLOAT


def widen_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every bfloat16 tensor, type and Cast target made float32."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _widen_graph(copy.graph)
    return copy


def widen_feeds(feeds: dict) -> dict:
    """``feeds`` with bfloat16 arrays widened to float32."""
    return {name: value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value
            for name, value in feeds.items()}
