"""Weights from anywhere: constant subgraphs, shared weights, outer-scope weights in If bodies.

Each structured weight must be found whatever computes it, the rewritten
model must match the original, and what computed the old weight must be gone
once nothing reads it (else the model keeps both weights).
"""

import ml_dtypes
import numpy as np
import onnx
import pytest
from conv_models import IR_FOR_OPSET
from onnx import TensorProto, helper, numpy_helper

import sconv_onnx
from sconv_onnx.runtime import run
from sconv_onnx.structure import expand
from sconv_onnx.verify import compare_outputs

OPSET = 17
#: A 3x3 conv weight with 4 inputs, structured at c=2, n=2x2.
WEIGHT = expand(np.random.default_rng(0).standard_normal((8, 2, 2, 2)), (8, 4, 3, 3)).astype(np.float32)


def _conv_model(nodes: list, initializers: list, weight: str = "w", opset: int = OPSET) -> onnx.ModelProto:
    """``z = Conv(x, weight)`` after ``nodes`` that compute ``weight``."""
    conv = helper.make_node("Conv", ["x", weight], ["z"], name="conv")
    graph = helper.make_graph(
        nodes + [conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4, 9, 9))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, (1, 8, 7, 7))], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=IR_FOR_OPSET[opset])
    onnx.checker.check_model(model)
    return model


def _int64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


FOLD_CASES = {
    "Cast from float16": (
        [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT)],
        [numpy_helper.from_array(WEIGHT.astype(np.float16), "w16")],
    ),
    "Cast from bfloat16": (
        [helper.make_node("Cast", ["wb"], ["w"], to=TensorProto.FLOAT)],
        [numpy_helper.from_array(WEIGHT.astype(ml_dtypes.bfloat16), "wb")],
    ),
    "Reshape with 0 and -1": (
        [helper.make_node("Reshape", ["flat", "shape"], ["w"])],
        [numpy_helper.from_array(WEIGHT.reshape(8, 36), "flat"), _int64("shape", [0, -1, 3, 3])],
    ),
    "Transpose then Identity": (
        [helper.make_node("Transpose", ["wt"], ["t"], perm=[1, 0, 3, 2]),
         helper.make_node("Identity", ["t"], ["w"])],
        [numpy_helper.from_array(np.ascontiguousarray(WEIGHT.transpose(1, 0, 3, 2)), "wt")],
    ),
    "Squeeze, Reshape, Unsqueeze, Reshape": (
        [helper.make_node("Squeeze", ["w5", "ax0"], ["s"]),
         helper.make_node("Reshape", ["s", "flat3"], ["s3"]),
         helper.make_node("Unsqueeze", ["s3", "ax0"], ["u"]),
         helper.make_node("Reshape", ["u", "shape"], ["w"])],
        [numpy_helper.from_array(WEIGHT[None], "w5"), _int64("ax0", [0]), _int64("flat3", [32, 3, 3]),
         _int64("shape", [8, 4, 3, 3])],
    ),
    "ConstantOfShape": (
        [helper.make_node("ConstantOfShape", ["shape"], ["w"],
                          value=numpy_helper.from_array(np.array([0.25], np.float32)))],
        [_int64("shape", [8, 4, 3, 3])],
    ),
    "Constant node": (
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(WEIGHT))], [],
    ),
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_weights_computed_by_constant_subgraphs_are_folded(case):
    nodes, initializers = FOLD_CASES[case]
    model = _conv_model(nodes, initializers)
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert layer.rewritten, layer.reason
    assert report.verified
    # the chain that computed the old weight is gone, with its inputs
    assert not {n.op_type for n in new.graph.node} & {"Cast", "Reshape", "Transpose", "Identity",
                                                     "Squeeze", "Unsqueeze", "ConstantOfShape"}
    assert all(init.name.startswith("conv/sconv_") for init in new.graph.initializer)
    assert sum(int(np.prod(i.dims)) for i in new.graph.initializer) < WEIGHT.size


def test_low_precision_storage_sets_the_tolerance_floor_and_bound():
    nodes, initializers = FOLD_CASES["Cast from bfloat16"]
    _, report = sconv_onnx.optimize(_conv_model(nodes, initializers), select="all")
    (layer,) = report.plan.layers
    assert layer.weight_dtype == "bfloat16"
    # rounding to bfloat16 leaves ~2e-3 residual: found only thanks to the floor
    assert 1e-4 < layer.chosen.residual < 2 * 2.0**-8
    assert report.max_error == pytest.approx(5e-2)
    assert report.max_rel_error < report.max_error


def test_weight_computed_from_a_graph_input_is_not_a_constant():
    """A Reshape whose shape comes from the input is not folded: the weight is not constant."""
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Gather", ["xs", "one"], ["c"], axis=0),
             helper.make_node("Concat", ["eight", "c", "three", "three"], ["shape"], axis=0),
             helper.make_node("Reshape", ["flat", "shape"], ["w"])]
    initializers = [numpy_helper.from_array(WEIGHT.ravel(), "flat"), _int64("one", [1]),
                    _int64("eight", [8]), _int64("three", [3])]
    model = _conv_model(nodes, initializers)
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert not layer.rewritten and layer.reason == "weight is not a constant"
    assert new.SerializeToString() == model.SerializeToString()


def test_weight_shared_by_two_convs_and_another_reader():
    """Both convs are rewritten; the initializer stays because an Add still reads it."""
    convs = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x2", "w"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["w", "w"], ["w2"])]
    graph = helper.make_graph(
        convs, "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, (1, 4, 9, 9)) for name in ("x", "x2")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, (1, 8, 7, 7)),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, (1, 8, 9, 9)),
         helper.make_tensor_value_info("w2", TensorProto.FLOAT, WEIGHT.shape)],
        [numpy_helper.from_array(WEIGHT, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_FOR_OPSET[OPSET])
    new, report = sconv_onnx.optimize(model, select="all")
    assert [layer.rewritten for layer in report.plan.layers] == [True, True]
    assert report.verified
    assert "w" in {init.name for init in new.graph.initializer}


def _if_model(outer_nodes: list, initializers: list, weight: str) -> onnx.ModelProto:
    """``If(c)``: both branches convolve ``x`` with the outer-scope ``weight``; the
    main graph convolves it too."""
    def branch(name, pads):
        conv = helper.make_node("Conv", ["x", weight], [f"{name}_y"], name=f"{name}_conv", pads=pads)
        return helper.make_graph([conv], name, [], [
            helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, (1, 8, 9, 9))])
    nodes = outer_nodes + [
        helper.make_node("Conv", ["x", weight], ["z"], name="outer_conv", pads=[1, 1, 1, 1]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch("then", [1, 1, 1, 1]),
                         else_branch=branch("else", [2, 0, 0, 2])),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4, 9, 9)),
         helper.make_tensor_value_info("c", TensorProto.BOOL, ())],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 8, 9, 9)),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, (1, 8, 9, 9))],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_FOR_OPSET[OPSET])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("source", ["initializer", "Cast chain"])
def test_outer_scope_weight_used_in_if_branches(source):
    if source == "initializer":
        model = _if_model([], [numpy_helper.from_array(WEIGHT, "w")], "w")
    else:
        model = _if_model([helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT)],
                          [numpy_helper.from_array(WEIGHT.astype(np.float16), "w16")], "w")
    new, report = sconv_onnx.optimize(model, select="all")
    assert sorted(layer.node for layer in report.plan.rewritten) == ["else_conv", "outer_conv", "then_conv"]
    # the old weight and what computed it are gone from every scope
    assert {i.name for i in new.graph.initializer} & {"w", "w16"} == set()
    assert "Cast" not in {n.op_type for n in new.graph.node}
    # both branches match (random verification inputs take only one)
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype(np.float32)
    for condition in (True, False):
        feeds = {"x": x, "c": np.array(condition)}
        errors = compare_outputs(run(model, feeds), run(new, feeds))
        assert max(e.max_rel for e in errors) < 1e-3
