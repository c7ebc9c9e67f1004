"""MACs are counted in one shape context (issue 12): batch 1 whatever batch the data has,
and shapes onnxruntime observes where shape inference cannot tell them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sconv_onnx
from sconv_onnx.context import context_shapes
from sconv_onnx.shapes import infer_tensor_shapes

CONV_MACS = 6 * 6 * 8 * 4 * 9  # per sample: 8 filters of 4x3x3 over 6x6 positions
MATMUL_MACS = 36 * 8 * 5  # per sample: 36 rows of 8 features onto 5


def _dynamic_matmul_model() -> onnx.ModelProto:
    """``x[N,4,6,6]`` -> Conv -> Transpose -> Reshape to a shape computed from ``Shape``
    (onnx's inference cannot tell its dims) -> MatMul with a ``8 x 5`` weight."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "tail")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["t"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "fc"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_inference_cannot_tell_the_matmul_but_onnxruntime_can():
    dims = infer_tensor_shapes(_dynamic_matmul_model(), {"x": (1, 4, 6, 6)})["r"]
    assert not any(isinstance(dim, int) for dim in dims)  # the premise of the tests below


def test_every_layer_is_counted_at_batch_1_with_a_batched_calibration_set():
    model = _dynamic_matmul_model()
    calib = {"x": np.random.default_rng(1).standard_normal((8, 4, 6, 6)).astype(np.float32)}
    plan = sconv_onnx.analyze(model, calib_data=calib)
    macs = {layer.node: layer.macs_before for layer in plan.layers}
    assert macs == {"conv": CONV_MACS, "fc": MATMUL_MACS}  # not 8x for the MatMul's rows
    _, report = sconv_onnx.optimize(model, calib_data=calib, tol=1e-4)
    assert report.before.macs == report.after.macs == CONV_MACS + MATMUL_MACS
    assert any("observed in onnxruntime" in note for note in report.notes)
    assert any("counted at batch 1" in note for note in report.notes)


def test_a_hinted_batch_is_counted_at_batch_1_too():
    """Conv positions are counted per sample: a MatMul's rows must be too."""
    model = _dynamic_matmul_model()
    plan = sconv_onnx.analyze(model, input_shapes={"x": (2, 4, 6, 6)})
    assert {layer.node: layer.macs_before for layer in plan.layers} == {
        "conv": CONV_MACS, "fc": MATMUL_MACS}
    _, report = sconv_onnx.optimize(model, input_shapes={"x": (2, 4, 6, 6)})
    assert report.before.macs == report.plan.totals()["macs_before"]


def _inputs(*declared) -> onnx.ModelProto:
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in declared]
    graph = helper.make_graph([helper.make_node("Identity", [declared[0][0]], ["y"])], "g",
                              values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph)


def test_a_leading_dim_that_may_not_be_a_batch_is_left_alone():
    shapes = {"x": (8, 4), "h": (2, 8, 4), "lengths": (8,)}
    assert context_shapes(_inputs(("x", ["N", 4]), ("h", [2, "N", 4])),
                          shapes) == shapes  # N is h's axis 1 (time-major)
    assert context_shapes(_inputs(("x", ["N", 4]), ("lengths", ["N"])), shapes) == shapes
    assert context_shapes(_inputs(("x", ["N", 4]), ("h", ["M", 8, 4])), shapes) == shapes
    assert context_shapes(_inputs(("x", ["N", 4]), ("h", ["N", 8, 4])), shapes) == {
        "x": (1, 4), "h": (1, 8, 4), "lengths": (8,)}


def test_nodes_computed_from_constants_alone_count_no_macs():
    """A Conv weight rebuilt in the graph from constants (a shared generator's
    ``MatMul(codes, generator) -> Reshape``) is folded by onnxruntime when the session is
    created: its MatMul is no MAC of the model."""
    from sconv_onnx.stats import constant_tensors, model_stats

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "codes"),
             numpy_helper.from_array(rng.standard_normal((4, 72)).astype(np.float32), "gen"),
             numpy_helper.from_array(np.array([8, 8, 3, 3], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["codes", "gen"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert {"flat", "w"} <= constant_tensors(model.graph) and "y" not in constant_tensors(
        model.graph)
    stats = model_stats(model, infer_tensor_shapes(model))
    assert stats.macs == 8 * 36 * 8 * 9  # the conv's alone, not the MatMul's 8 * 72 * 4


def test_a_branch_that_reads_the_outer_graph_is_not_constant():
    """An ``If`` on a constant condition still computes from the graph's inputs (its
    branches read them): what follows it counts its MACs."""
    from onnx import TensorProto, helper, numpy_helper

    from sconv_onnx.stats import constant_tensors

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])])
    inits = [numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(np.ones((4, 8), np.float32), "w")]
    nodes = [helper.make_node("If", ["cond"], ["h"], then_branch=branch, else_branch=branch),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert "h" not in constant_tensors(model.graph)
