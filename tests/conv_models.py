"""Builders of single-Conv test models, with exactly structured or random weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sconv_onnx.structure import expand

#: Lowest IR version that each opset needs (onnxruntime 1.31 reads IR <= 13).
IR_FOR_OPSET = {**{v: 7 for v in range(11, 15)}, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


@dataclass
class ConvSpec:
    """One Conv (or ConvTranspose) layer: geometry, attributes and how its weight is stored.

    For a ConvTranspose, ``in_per_group`` and ``out_channels`` keep their
    meaning (input channels per group, output channels in all) and the
    structure ``sizes`` lies along the output channels per group.
    """

    in_per_group: int
    out_channels: int
    group: int
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    auto_pad: str | None = None
    bias: bool = True
    weight_as_constant_node: bool = False
    opset: int = 17
    dynamic_batch: bool = False
    batch: int = 1
    sizes: tuple[int, ...] | None = None  # structure (c, n..); None: random weight
    seed: int = 0
    extra_attrs: dict = field(default_factory=dict)
    op: str = "Conv"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.op == "ConvTranspose":
            return (self.in_per_group * self.group, self.out_channels // self.group) + tuple(self.kernel)
        return (self.out_channels, self.in_per_group) + tuple(self.kernel)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_per_group * self.group) + tuple(self.spatial)


def make_weight(spec: ConvSpec) -> np.ndarray:
    rng = np.random.default_rng(spec.seed)
    if spec.sizes is None:
        return rng.standard_normal(spec.weight_shape).astype(np.float32)
    alpha = rng.standard_normal(spec.weight_shape[:1] + tuple(spec.sizes))
    return expand(alpha, spec.weight_shape).astype(np.float32)


def make_model(spec: ConvSpec, weight: np.ndarray | None = None) -> onnx.ModelProto:
    """``z = Conv(x, W[, B])`` (or ConvTranspose) with the attributes of ``spec``, ``W``
    :func:`make_weight`'s unless given.

    No activation follows: the relative error ``max|dz| / max|z|`` stays
    meaningful (a Relu can leave a single tiny positive output).
    """
    weight = make_weight(spec) if weight is None else weight.astype(np.float32)
    nodes, inits = [], []
    if spec.weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight)))
    else:
        inits.append(numpy_helper.from_array(weight, "W"))
    inputs = ["x", "W"]
    if spec.bias:
        rng = np.random.default_rng(spec.seed + 1)
        inits.append(numpy_helper.from_array(rng.standard_normal(spec.out_channels).astype(np.float32), "B"))
        inputs.append("B")
    attrs = {"group": spec.group, **spec.extra_attrs}
    for key in ("strides", "dilations", "pads", "auto_pad"):
        value = getattr(spec, key)
        if value is not None:
            attrs[key] = list(value) if key != "auto_pad" else value
    nodes.append(helper.make_node(spec.op, inputs, ["z"], name="conv", **attrs))
    x_shape = list(spec.input_shape)
    if spec.dynamic_batch:
        x_shape[0] = "N"
    graph = helper.make_graph(
        nodes, "one_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [f"z{i}" for i in range(len(x_shape))])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=IR_FOR_OPSET[spec.opset]
    )
    onnx.checker.check_model(model)
    return model


def weight_elements(model: onnx.ModelProto) -> dict[str, int]:
    """Element counts of every initializer and ``Constant`` output, by name."""
    counts = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            counts[node.output[0]] = int(np.prod(node.attribute[0].t.dims))
    return counts
