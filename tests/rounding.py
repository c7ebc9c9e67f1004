"""Rounding bounds for the exactness tests of single layers, derived from each lowering's
float additions.

A float32 sum of ``n`` terms is off by at most about ``n u`` times the sum of
the terms' absolute values (``u = 2^-24``; Higham, *Accuracy and Stability of
Numerical Algorithms*, ch. 3).  For a whole computation, the absolute values
summed at each step are what the same graph computes on magnitudes: every
float constant replaced by its absolute value, every ``Sub`` by an ``Add``,
run on ``|x|`` (:func:`magnitude_model`).  One more error is the fit's: the
float32 weight ``W`` is structured only up to its own rounding ``d`` (``|d| <=
u |W|``), and the rewrite computes with its projection, off by ``(I - P) d``,
whose norm is at most ``u ||W_o||`` for the weights ``W_o`` of output
channel ``o``; by Cauchy-Schwarz that moves an output by at most
``u ||W_o|| ||x_patch||`` (:func:`patch_norms`).  So, per output element,

    |rewritten - original| <= SAFETY u (n_rewrite M_rewrite + n_original M_original
                                        + max_o ||W_o|| ||x_patch||)

where ``n`` is the longest chain of roundings an output takes (a candidate's
``rounding_depth``; :func:`layer_depth` for the original layer) and ``M`` the
magnitude model's output.  Relative bounds on ``max|y|`` flake when the
outputs cancel to near zero (an ``x @ W`` of one row, a filter whose taps
nearly cancel): this one scales with what is summed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from sconv_onnx.runtime import run

UNIT_ROUNDOFF = {np.dtype(np.float16): 2.0**-11, np.dtype(np.float32): 2.0**-24,
                 np.dtype(np.float64): 2.0**-53}
#: Headroom over the sum bound (see the module docstring).
SAFETY = 2.0


def _absolute(tensor: onnx.TensorProto) -> None:
    values = numpy_helper.to_array(tensor)
    if values.dtype.kind == "f":
        tensor.CopyFrom(numpy_helper.from_array(np.abs(values), tensor.name))


def magnitude_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (main graph) computing on magnitudes: float constants made
    absolute, ``Sub`` made ``Add``, Gemm's ``alpha``/``beta`` made absolute."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        _absolute(init)
    for node in copy.graph.node:
        if node.op_type == "Sub":
            node.op_type = "Add"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _absolute(attr.t)
            elif node.op_type == "Gemm" and attr.name in ("alpha", "beta"):
                attr.f = abs(attr.f)
    return copy


def _layer(model: onnx.ModelProto) -> tuple[onnx.NodeProto, np.ndarray]:
    """The model's one Conv, ConvTranspose, Gemm or MatMul and its constant weight."""
    (node,) = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for constant in model.graph.node:
        if constant.op_type == "Constant":
            values[constant.output[0]] = numpy_helper.to_array(constant.attribute[0].t)
    return node, values[node.input[1]].astype(np.float64)


def filter_norm(model: onnx.ModelProto) -> float:
    """``max_o ||W_o||``: the largest 2-norm of the weights feeding one output channel."""
    node, weight = _layer(model)
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attrs.get("transB", 0)):
        rows = weight.reshape(weight.shape[0], -1)
    elif node.op_type == "ConvTranspose":  # output channel (g, j) reads W[inputs of g, j]
        group = attrs.get("group", 1)
        per_group = weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)
        rows = per_group.transpose(0, 2, 1, 3).reshape(group * weight.shape[1], -1)
    else:  # x @ W: the columns
        rows = weight.T
    return float(np.max(np.linalg.norm(rows, axis=1))) * abs(attrs.get("alpha", 1.0))


def patch_norms(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """``||x_patch||`` per output element: the layer with an all-ones weight, no bias,
    run on ``x^2``, square-rooted."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node, weight = _layer(copy)
    for init in copy.graph.initializer:
        if init.name == node.input[1]:
            init.CopyFrom(numpy_helper.from_array(np.ones(weight.shape, np.float32), init.name))
    for constant in copy.graph.node:
        if constant.op_type == "Constant" and constant.output[0] == node.input[1]:
            constant.attribute[0].t.CopyFrom(numpy_helper.from_array(
                np.ones(weight.shape, np.float32), constant.attribute[0].t.name))
    del node.input[2:]  # no bias
    for attr in node.attribute:
        if attr.name == "alpha":
            attr.f = 1.0
    squares = {key: np.square(value) for key, value in feeds.items()}
    return {name: np.sqrt(np.maximum(value, 0.0)) for name, value in run(copy, squares).items()}


def layer_depth(model: onnx.ModelProto) -> int:
    """Longest chain of roundings of an output of the model's one layer: its dot
    product, then the bias (and Gemm's ``alpha`` and ``beta``)."""
    node, weight = _layer(model)
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type == "ConvTranspose":
        return weight.shape[0] // attrs.get("group", 1) * math.prod(weight.shape[2:]) + 1
    if node.op_type == "Gemm":
        return weight.shape[1 if attrs.get("transB", 0) else 0] + 3
    if node.op_type == "MatMul":
        return weight.shape[0]
    return math.prod(weight.shape[1:]) + 1


def assert_within_rounding(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict,
                           depth_original: int, depth_rewritten: int) -> float:
    """Assert the outputs of the two models differ by at most the rounding bound; return
    the largest ratio of error to bound (for reports)."""
    magnitudes = {key: np.abs(value) for key, value in feeds.items()}
    outputs = [run(model, feeds) for model in (original, rewritten)]
    scales = [run(magnitude_model(model), magnitudes) for model in (original, rewritten)]
    fit = filter_norm(original)
    patches = patch_norms(original, feeds)
    worst = 0.0
    for name, y0 in outputs[0].items():
        y1 = outputs[1][name]
        assert y0.shape == y1.shape, name
        unit = UNIT_ROUNDOFF[np.dtype(y0.dtype)]
        bound = SAFETY * unit * (depth_original * scales[0][name].astype(np.float64)
                                 + depth_rewritten * scales[1][name].astype(np.float64)
                                 + fit * patches[name].astype(np.float64))
        error = np.abs(y0.astype(np.float64) - y1.astype(np.float64))
        assert np.all(error <= bound), (
            f"{name}: error {error.max():.3g} above the rounding bound where it is "
            f"{bound.flat[np.argmax(error - bound)]:.3g}")
        worst = max(worst, float(np.max(error / np.maximum(bound, 1e-300), initial=0.0)))
    return worst
