"""Structured fully connected layers: Gemm (all attributes) and MatMul (any leading dims)."""

import math
import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from rounding import assert_within_rounding, layer_depth

import sconv_onnx
from sconv_onnx.structure import expand
from sconv_onnx.verify import random_feeds

#: Examples per property: ``SCONV_PROPERTY_EXAMPLES`` when set, else 60.
SETTINGS = settings(max_examples=int(os.environ.get("SCONV_PROPERTY_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _weight(rng, out_features, in_features, under):
    """``OUT x IN``, structured at ``under`` input features (random when None)."""
    if under is None:
        return rng.standard_normal((out_features, in_features)).astype(np.float32)
    alpha = rng.standard_normal((out_features, under))
    return expand(alpha, (out_features, in_features)).astype(np.float32)


def _model(nodes, inputs, output_shape, inits, opset=17):
    graph = helper.make_graph(
        nodes, "fc", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@st.composite
def gemm_cases(draw, structured=True):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows, in_features, out_features = draw(st.integers(1, 4)), draw(st.integers(2, 24)), draw(st.integers(1, 8))
    under = draw(st.integers(1, in_features - 1)) if structured else None
    weight = _weight(rng, out_features, in_features, under)
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    attrs = {"transA": int(trans_a), "transB": int(trans_b)}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.floats(0.25, 2.0))
    inputs, inits = ["x", "W"], [numpy_helper.from_array(weight if trans_b else weight.T.copy(), "W")]
    bias_shape = draw(st.sampled_from([None, (out_features,), (1, out_features), (rows, out_features)]))
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "C"))
        inputs.append("C")
        if draw(st.booleans()):
            attrs["beta"] = draw(st.floats(0.25, 2.0))
    x_shape = [in_features, rows] if trans_a else [rows, in_features]
    model = _model([helper.make_node("Gemm", inputs, ["y"], name="fc", **attrs)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                   [rows, out_features], inits)
    return model, under


@st.composite
def matmul_cases(draw, structured=True):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    in_features, out_features = draw(st.integers(2, 24)), draw(st.integers(1, 8))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    under = draw(st.integers(1, in_features - 1)) if structured else None
    weight = _weight(rng, out_features, in_features, under)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, in_features])],
                   [*lead, out_features], [numpy_helper.from_array(weight.T.copy(), "W")])
    return model, under


def _check_rewritten(model, under):
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert layer.rewritten, layer.reason
    # a structure at c is also one at any c' whose window tiles c's: fewest is at most c
    assert layer.chosen.payload.structure.channels <= under
    alpha = [init for init in new.graph.initializer if init.name.endswith("sconv_alpha")]
    assert len(alpha) == 1 and layer.chosen.payload.structure.channels in alpha[0].dims
    assert "W" not in {init.name for init in new.graph.initializer}
    assert "CumSum" in {node.op_type for node in new.graph.node}
    # the plan counts every constant the rewrite writes, and every MAC
    assert sum(math.prod(init.dims) for init in new.graph.initializer) == layer.params_after
    assert (report.before.macs, report.after.macs) == (layer.macs_before, layer.macs_after)
    feeds = random_feeds(model, {"x": tuple(d.dim_value for d in
                                            model.graph.input[0].type.tensor_type.shape.dim)})
    assert_within_rounding(model, new, feeds, layer_depth(model), layer.chosen.rounding_depth)


@given(gemm_cases())
@SETTINGS
def test_structured_gemm_is_rewritten_exactly(case):
    _check_rewritten(*case)


@given(matmul_cases())
@SETTINGS
def test_structured_matmul_is_rewritten_exactly(case):
    _check_rewritten(*case)


@given(st.one_of(gemm_cases(structured=False), matmul_cases(structured=False)))
@SETTINGS
def test_random_fully_connected_weights_are_untouched(case):
    model, _ = case
    new, report = sconv_onnx.optimize(model, select="all")
    assert not report.plan.layers[0].rewritten
    assert new.SerializeToString() == model.SerializeToString()


def test_cost_model_rewrites_a_wide_structured_classifier_and_keeps_a_small_one():
    rng = np.random.default_rng(0)
    for in_features, out_features, expected in ((2048, 1000, "rewrite"), (16, 4, "keep")):
        weight = _weight(rng, out_features, in_features, in_features // 2)
        model = _model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_features])],
                       [1, out_features],
                       [numpy_helper.from_array(weight, "W"),
                        numpy_helper.from_array(np.zeros(out_features, np.float32), "C")])
        layer = sconv_onnx.analyze(model).layers[0]
        assert layer.best.payload.structure.channels == in_features // 2
        assert layer.decision == expected, layer.reason


def test_constant_left_operand_is_left_alone_with_a_reason():
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "A")
    model = _model([helper.make_node("MatMul", ["A", "x"], ["y"], name="left")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])], [3, 2], [weight])
    layer = sconv_onnx.analyze(model).layers[0]
    assert layer.decision == "keep" and "left operand" in layer.reason
