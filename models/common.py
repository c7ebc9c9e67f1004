"""Shared pieces of the model builders: structured weights and ONNX node helpers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sconv_onnx.structure import expand

#: IR version written by the builders: onnxruntime 1.31 refuses IR 14, the
#: default of onnx 1.23's make_model (DESIGN.md section 2).
IR_VERSION = 8


def structured_weight(
    rng: np.random.Generator, shape: tuple[int, ...], sizes: tuple[int, ...], noise: float = 0.0
) -> np.ndarray:
    """A float32 weight of ``shape`` that is exactly structured at ``sizes`` (plus relative noise).

    ``alpha`` is drawn with He-like scaling so that activations keep their size.
    """
    fan_in = int(np.prod(shape[1:]))
    alpha = rng.standard_normal((shape[0],) + tuple(sizes))
    weight = expand(alpha, shape)
    weight *= np.sqrt(2.0 / fan_in) / (weight.std() + 1e-12)
    if noise:
        weight += noise * np.linalg.norm(weight) / np.sqrt(weight.size) * rng.standard_normal(shape)
    return weight.astype(np.float32)


class GraphBuilder:
    """Accumulates nodes and initializers; names tensors ``<prefix><n>``."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def constant(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None,
           output: str | None = None, **attrs) -> str:
        """Append a node; its output is ``output`` or a fresh name."""
        out = output or self.fresh(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None = None, **attrs) -> str:
        inputs = [x, self.constant("w", weight)]
        if bias is not None:
            inputs.append(self.constant("b", bias))
        return self.op("Conv", inputs, "conv", **attrs)

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
            producer_name="sconv-onnx models",
        )
        onnx.checker.check_model(model)
        return model


def float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
