"""Targeted rewrite cases: each lowering, its limits, and what must be kept."""

import numpy as np
import onnx
import pytest
from conv_models import ConvSpec, make_model, weight_elements
from onnx import helper, numpy_helper

import sconv_onnx
from sconv_onnx.passes.box.conv import Lowering, lowering_options
from sconv_onnx.runtime import run
from sconv_onnx.verify import compare_outputs, random_feeds


def _ops(model):
    return [node.op_type for node in model.graph.node]


def _site(spec):
    """The site of ``spec``'s conv and the structure chosen for it at ``select="all"``."""
    from sconv_onnx import pipeline
    from sconv_onnx.options import Options

    options = Options(select="all", families=("box",))  # the box family's lowerings
    analysis = pipeline.analyse(make_model(spec), options, {"x": spec.input_shape})
    (entry,), (layer,) = analysis.entries, pipeline.plan(analysis).layers
    return entry.site, layer.chosen.payload.structure


def test_wide_1d_conv_uses_cumsum_channel_pooling_and_2d_uses_the_matrix():
    spec = ConvSpec(in_per_group=512, out_channels=512, group=1, kernel=(3,), spatial=(500,),
                    pads=(1, 1), sizes=(256, 2))
    new, report = sconv_onnx.optimize(make_model(spec))
    (layer,) = report.plan.layers
    assert layer.rewritten and layer.chosen.payload.lowering == Lowering("cumsum", "ones_conv")
    assert "CumSum" in _ops(new) and "AveragePool" not in _ops(new)
    assert report.max_rel_error < 1e-5
    # the same layer in 2-D stays in the NCHWc layout: matrix conv and AveragePool
    spec = ConvSpec(in_per_group=512, out_channels=512, group=1, kernel=(3, 3), spatial=(7, 7),
                    pads=(1, 1, 1, 1), sizes=(256, 2, 2))
    new, report = sconv_onnx.optimize(make_model(spec))
    assert report.plan.layers[0].chosen.payload.lowering == Lowering("matrix", "avgpool")
    assert "CumSum" not in _ops(new)


def test_small_channel_counts_prefer_the_matrix_conv():
    # measured: matrix 0.57x, cumsum 0.78x of the original (benchmarks/CALIBRATION.md)
    spec = ConvSpec(in_per_group=64, out_channels=64, group=1, kernel=(3, 3), spatial=(56, 56),
                    pads=(1, 1, 1, 1), sizes=(32, 2, 2))
    _, report = sconv_onnx.optimize(make_model(spec))
    assert report.plan.layers[0].chosen.payload.lowering == Lowering("matrix", "avgpool")


def test_no_avgpool_at_opset_19_or_with_dilation_or_large_pads():
    base = {"in_per_group": 4, "out_channels": 4, "group": 1, "kernel": (3, 3), "spatial": (12, 12),
            "sizes": (4, 2, 2)}
    for extra in ({"opset": 19}, {"dilations": (2, 2)}, {"pads": (2, 2, 2, 2)}):
        site, structure = _site(ConvSpec(**{**base, **extra}))
        options = {option.spatial for option in lowering_options(site, structure)}
        # a pad as large as the window is no matter to the pool after the conv (unpadded)
        assert options == ({"ones_conv", "avgpool_after"} if "pads" in extra
                           else {"ones_conv"}), extra
    site, structure = _site(ConvSpec(**base, pads=(1, 1, 1, 1)))
    assert Lowering(None, "avgpool") in lowering_options(site, structure)


def test_grouped_channel_pooling_never_uses_cumsum_or_3d_pooling():
    spec = ConvSpec(in_per_group=8, out_channels=8, group=2, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(4, 3, 3))
    site, structure = _site(spec)
    options = lowering_options(site, structure)
    assert options == [Lowering("matrix", None)]
    new, report = sconv_onnx.optimize(make_model(spec), select="all")
    assert "AveragePool" not in _ops(new) and "CumSum" not in _ops(new)
    assert report.max_rel_error < 1e-5


def test_3d_conv_with_channel_structure_pools_channels_with_a_1x1x1_conv():
    spec = ConvSpec(in_per_group=6, out_channels=4, group=1, kernel=(3, 3, 3), spatial=(6, 6, 6),
                    pads=(1,) * 6, sizes=(3, 2, 2, 2))
    new, report = sconv_onnx.optimize(make_model(spec), select="all")
    pools = [n for n in new.graph.node if n.op_type == "AveragePool"]
    assert all(len(n.attribute[0].ints) == 3 for n in pools if n.attribute[0].name == "kernel_shape")
    assert report.max_rel_error < 1e-5


def test_same_padding_with_stride_on_dynamic_size_is_skipped_with_a_reason():
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(9, 9),
                    strides=(2, 2), auto_pad="SAME_UPPER", sizes=(4, 2, 2))
    model = make_model(spec)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    plan = sconv_onnx.analyze(model, input_shapes={"x": (1, 4, 9, 9)})
    assert not plan.layers[0].rewritten
    assert "auto_pad SAME" in plan.layers[0].reason
    # with stride 1 the pads do not depend on the size: rewritten
    spec.strides = (1, 1)
    model = make_model(spec)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    new, report = sconv_onnx.optimize(model, select="all", input_shapes={"x": (1, 4, 9, 9)})
    assert report.plan.layers[0].rewritten
    # and the rewrite holds at another size too
    feeds = random_feeds(model, {"x": (1, 4, 13, 7)})
    (error,) = compare_outputs(run(model, feeds), run(new, feeds))
    assert error.max_rel < 1e-5


def test_model_fields_value_info_and_names_are_kept():
    spec = ConvSpec(in_per_group=8, out_channels=8, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(4, 2, 2), opset=13)
    model = make_model(spec)
    model.ir_version = 7
    model.producer_name, model.producer_version, model.model_version = "tester", "9.9", 42
    model.doc_string = "a doc"
    model.metadata_props.add(key="author", value="someone")
    model.graph.node.append(helper.make_node("Relu", ["z"], ["r"], name="relu"))
    model.graph.output[0].name = "r"
    model.graph.value_info.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 8, 8, 8]))
    new, _ = sconv_onnx.optimize(model, select="all")
    assert new.ir_version == 7
    assert [(o.domain, o.version) for o in new.opset_import] == [("", 13)]
    assert (new.producer_name, new.producer_version, new.model_version) == ("tester", "9.9", 42)
    assert new.doc_string == "a doc"
    assert {p.key: p.value for p in new.metadata_props} == {"author": "someone"}
    assert "z" in {v.name for v in new.graph.value_info}
    assert [n.name for n in new.graph.node if n.op_type == "Conv"][-1] == "conv"
    assert new.graph.node[-1].output[0] == "r"


def test_constant_node_weight_is_removed_and_shared_weight_is_kept():
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(4, 2, 2), weight_as_constant_node=True)
    new, _ = sconv_onnx.optimize(make_model(spec), select="all")
    assert "W" not in weight_elements(new)
    assert "Constant" not in _ops(new)
    # a second consumer of W (an Identity to a second output) keeps it alive
    model = make_model(spec)
    model.graph.node.append(helper.make_node("Identity", ["W"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [4, 4, 3, 3]))
    new, report = sconv_onnx.optimize(model, select="all")
    assert report.plan.layers[0].rewritten
    assert "W" in weight_elements(new)
    assert report.max_rel_error < 1e-5


def test_input_model_is_not_modified():
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2))
    model = make_model(spec)
    # an unnamed Constant tensor that no pass reads: graphsurgeon holds it lazily and
    # its export would name it in place (in the caller's model, were it not copied)
    output = model.graph.output[0].name
    model.graph.output[0].name = "y_conv"
    model.graph.node[-1].output[0] = "y_conv"
    model.graph.node.extend([
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Add", ["y_conv", "one"], [output]),
    ])
    model.graph.output[0].name = output
    before = model.SerializeToString()
    new, report = sconv_onnx.optimize(model, select="all")
    assert report.plan.layers[0].rewritten and "Add" in _ops(new)
    assert model.SerializeToString() == before


def test_conv_inside_an_if_branch_is_rewritten():
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2))
    inner = make_model(spec).graph
    then_graph = helper.make_graph(list(inner.node), "then", [], list(inner.output), list(inner.initializer))
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z_else"])], "else", [],
        [helper.make_tensor_value_info("z_else", onnx.TensorProto.FLOAT, ["a", "b", "c", "d"])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [node], "with_if", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["a", "b", "c", "d"])], [cond],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    new, report = sconv_onnx.optimize(model, select="all")
    assert report.plan.layers[0].rewritten
    then_branch = next(a.g for a in new.graph.node[0].attribute if a.name == "then_branch")
    then_ops = [n.op_type for n in then_branch.node]
    assert then_ops.count("Conv") + then_ops.count("AveragePool") >= 2
    assert report.max_rel_error < 1e-5


@pytest.mark.parametrize("select", ["cost", "all"])
def test_default_tolerance_rejects_noisy_weights_and_loose_tolerance_takes_them(select):
    spec = ConvSpec(in_per_group=32, out_channels=32, group=1, kernel=(3, 3), spatial=(16, 16),
                    pads=(1, 1, 1, 1), sizes=(16, 2, 2))
    model = make_model(spec)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    noisy = weight + 1e-2 * weight.std() * np.random.default_rng(0).standard_normal(weight.shape)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), "W"))
    _, report = sconv_onnx.optimize(model, select=select)
    assert not report.plan.layers[0].rewritten
    _, report = sconv_onnx.optimize(model, select=select, tol=0.05)
    layer = report.plan.layers[0]
    assert layer.rewritten and layer.chosen.payload.sizes == (16, 2, 2)
    assert 0 < layer.chosen.residual < 0.05
    assert report.max_error is None and 0 < report.max_rel_error < 0.1


def _as_float16(model):
    from onnx import TensorProto

    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def test_float16_weights_are_solved_in_float64_and_written_back_in_float16():
    spec = ConvSpec(in_per_group=8, out_channels=8, group=1, kernel=(3, 3), spatial=(12, 12),
                    pads=(1, 1, 1, 1), sizes=(4, 2, 2))
    model = _as_float16(make_model(spec))
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert layer.rewritten and layer.chosen.payload.sizes == (4, 2, 2)
    # rounding to float16 alone leaves ~3e-4 residual: the tolerance floor for float16 admits it
    assert 1e-5 < layer.chosen.residual < 1e-3
    alpha = next(init for init in new.graph.initializer if init.name.endswith("sconv_alpha"))
    assert alpha.data_type == onnx.TensorProto.FLOAT16
    assert {n.op_type for n in new.graph.node} <= {"Conv"}  # no AveragePool/CumSum in float16
    assert report.max_error == 1e-2 and report.max_rel_error < 1e-2


def _as_bfloat16(model):
    import ml_dtypes
    from onnx import TensorProto

    for init in model.graph.initializer:
        values = numpy_helper.to_array(init).astype(ml_dtypes.bfloat16)
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return model


def test_bfloat16_model_is_verified_widened_to_float32(tmp_path, capsys):
    from sconv_onnx.cli import main
    from sconv_onnx.runtime import WIDENED_NOTE, session

    spec = ConvSpec(in_per_group=8, out_channels=8, group=1, kernel=(3, 3), spatial=(10, 10),
                    pads=(1, 1, 1, 1), sizes=(4, 2, 2))
    model = _as_bfloat16(make_model(spec))
    with pytest.raises(Exception, match="bfloat16"):  # why widening is needed at all
        session(model)
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert layer.rewritten and layer.weight_dtype == "bfloat16"
    assert {init.data_type for init in new.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    assert WIDENED_NOTE in report.notes
    assert report.max_error == 5e-2 and 0 < report.max_rel_error < 1e-2
    # the verify command widens too, and says so
    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(new, tmp_path / "b.onnx")
    assert main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                 "--max-error", "0.05"]) == 0
    assert f"note: {WIDENED_NOTE}" in capsys.readouterr().out


def test_quantized_convs_are_reported_and_left_alone():
    from onnx import TensorProto

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    w8 = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "w8")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    nodes = [
        helper.make_node("DequantizeLinear", ["w8", "scale", "zero"], ["w"], name="dq"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="qdq_conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "scale", "zero"], ["yq"], name="q"),
        helper.make_node("ConvInteger", ["yq", "w8"], ["z"], name="int_conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "quantized", [x],
                              [helper.make_tensor_value_info("z", TensorProto.INT32, [1, 4, 8, 8])],
                              [w8, scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    new, report = sconv_onnx.optimize(model, select="all")
    reasons = {layer.node: (layer.op, layer.decision, layer.reason) for layer in report.plan.layers}
    assert reasons["qdq_conv"] == ("Conv", "keep", "quantized weight (QDQ): left as is")
    assert reasons["int_conv"] == ("ConvInteger", "keep", "quantized layer (ConvInteger): left as is")
    assert new.SerializeToString() == model.SerializeToString()
