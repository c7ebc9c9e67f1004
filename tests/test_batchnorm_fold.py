"""Unfused BatchNormalization after a structured conv is folded into the rewrite when exact."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conv_models import ConvSpec, make_model
from onnx import TensorProto, helper, numpy_helper
from sconv_onnx.models.build import MODELS

import sconv_onnx


def _with_batchnorm(spec: ConvSpec, *, second_reader=False, stats_as_input=False) -> onnx.ModelProto:
    """``Conv -> BatchNormalization -> Relu`` with seeded statistics."""
    model = make_model(spec)
    graph, rng, out = model.graph, np.random.default_rng(1), spec.out_channels
    stats = {
        "bn_scale": rng.uniform(0.5, 2.0, out), "bn_shift": rng.standard_normal(out),
        "bn_mean": rng.standard_normal(out), "bn_var": rng.uniform(0.5, 2.0, out),
    }
    for name, value in stats.items():
        if stats_as_input and name == "bn_scale":
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [out]))
        else:
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    graph.node.extend([
        helper.make_node("BatchNormalization", ["z", *stats], ["normed"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["normed"], ["r"], name="relu"),
    ])
    graph.output[0].name = "r"
    if second_reader:
        graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, list(spec.input_shape)))
    return model


SPEC = ConvSpec(in_per_group=8, out_channels=8, group=1, kernel=(3, 3), spatial=(10, 10),
                pads=(1, 1, 1, 1), sizes=(4, 2, 2))


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_after_a_structured_conv_is_folded_into_the_rewrite(bias):
    spec = ConvSpec(**{**SPEC.__dict__, "bias": bias})
    model = _with_batchnorm(spec)
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert layer.rewritten and layer.chosen.payload.sizes == (4, 2, 2)
    assert layer.folded == ("bn",)
    ops = [node.op_type for node in new.graph.node]
    assert "BatchNormalization" not in ops
    conv = next(node for node in new.graph.node if node.name == "conv")
    assert conv.output[0] == "normed" and len(conv.input) == 3
    assert not {"bn_scale", "bn_shift", "bn_mean", "bn_var"} & {i.name for i in new.graph.initializer}
    assert report.max_rel_error < 1e-5


def test_batchnorm_is_kept_when_the_conv_output_has_another_reader():
    model = _with_batchnorm(SPEC, second_reader=True)
    new, report = sconv_onnx.optimize(model, select="all")
    (layer,) = report.plan.layers
    assert layer.rewritten and layer.folded == ()
    assert "BatchNormalization" in [node.op_type for node in new.graph.node]
    assert report.max_rel_error < 1e-5


def test_batchnorm_with_runtime_statistics_is_not_folded():
    model = _with_batchnorm(SPEC, stats_as_input=True)
    new, report = sconv_onnx.optimize(model, select="all", inputs={
        "x": np.random.default_rng(0).standard_normal(SPEC.input_shape).astype(np.float32),
        "bn_scale": np.full(SPEC.out_channels, 1.5, np.float32),
    })
    assert report.plan.layers[0].folded == ()
    assert "BatchNormalization" in [node.op_type for node in new.graph.node]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_benchmark_models_with_unfused_batchnorm_keep_their_structure(name):
    """Every BN after a conv is folded (issue 15: 16 of 53 on a ResNet-50 before): into the
    rewrite of a rewritten layer, into the weights of a kept one; only those after a weight
    the graph rebuilds from a shared generator (csg's size form) stay."""
    model = MODELS[name].build(batchnorm=True, size="small")
    new, report = sconv_onnx.optimize(model, select="all")
    rewritten = [layer for layer in report.plan.layers if layer.rewritten and layer.op == "Conv"]
    rebuilt = [layer for layer in rewritten if layer.chosen.family == "csg" and not layer.folded]
    assert rewritten and all(len(layer.folded) == 1 for layer in rewritten
                             if layer not in rebuilt)
    before = [node.op_type for node in model.graph.node].count("BatchNormalization")
    after = [node.op_type for node in new.graph.node].count("BatchNormalization")
    assert after == len(rebuilt)
    more = before - after - sum(len(layer.folded) for layer in rewritten)
    assert more > 0 and any(note.startswith(f"folded {more} more BatchNormalization")
                            for note in report.notes)
    assert report.max_rel_error < 1e-4


def test_batchnorm_after_a_kept_conv_is_folded_into_its_weights():
    """A conv with no structure keeps its op, and takes its BN: the weight and bias change,
    the outputs do not (beyond rounding)."""
    spec = ConvSpec(**{**SPEC.__dict__, "sizes": None})
    model = _with_batchnorm(spec)
    new, report = sconv_onnx.optimize(model)
    assert not report.plan.rewritten
    assert [node.op_type for node in new.graph.node] == ["Conv", "Relu"]
    assert new.graph.node[0].output[0] == "normed" and len(new.graph.node[0].input) == 3
    assert report.max_rel_error < 1e-5 and report.status == "PASS"


def test_batchnorm_after_a_conv_whose_weight_is_shared_stays():
    """Folding into a weight two convs read would change the other one: left alone."""
    spec = ConvSpec(**{**SPEC.__dict__, "sizes": None})
    model = _with_batchnorm(spec)
    graph = model.graph
    conv = graph.node[0]
    graph.node.append(helper.make_node("Conv", [conv.input[0], conv.input[1]], ["z2"],
                                       name="twin", pads=[1, 1, 1, 1]))
    graph.output.append(helper.make_tensor_value_info("z2", TensorProto.FLOAT, list(spec.input_shape)))
    new, report = sconv_onnx.optimize(model)
    assert "BatchNormalization" in [node.op_type for node in new.graph.node]
    assert report.max_rel_error < 1e-5


def test_batchnorm_in_a_branch_reading_the_conv_outside_stays():
    """A BN inside an ``If`` branch that reads a kept conv's output from the outer graph
    is not this conv's to fold (its node lives in the branch): left, and the run passes."""
    spec = ConvSpec(**{**SPEC.__dict__, "sizes": None})
    model = _with_batchnorm(spec)
    graph = model.graph
    bn, relu = graph.node[1], graph.node[2]
    del graph.node[1:]
    shape = list(spec.input_shape)
    branch = helper.make_graph([bn, relu], "then", [], [
        helper.make_tensor_value_info("r", TensorProto.FLOAT, shape)])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["r2"])], "else", [], [
        helper.make_tensor_value_info("r2", TensorProto.FLOAT, shape)])
    graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    graph.node.append(helper.make_node("If", ["flag"], ["r_if"], then_branch=branch,
                                       else_branch=other))
    graph.output[0].name = "r_if"
    new, report = sconv_onnx.optimize(model, inputs={
        "x": np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32),
        "flag": np.array(True)})
    assert report.status == "PASS"
    branches = next(node for node in new.graph.node if node.op_type == "If").attribute
    then = next(attribute.g for attribute in branches if attribute.name == "then_branch")
    assert "BatchNormalization" in [node.op_type for node in then.node]


def test_batchnorm_whose_statistic_is_made_from_a_graph_input_stays():
    """An overridable statistic behind an Identity is no constant: not folded."""
    spec = ConvSpec(**{**SPEC.__dict__, "sizes": None})
    model = _with_batchnorm(spec, stats_as_input=True)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.full(spec.out_channels, 1.5, np.float32),
                                                     "bn_scale"))
    graph.node.insert(0, helper.make_node("Identity", ["bn_scale"], ["bn_scale_copy"]))
    bn = next(node for node in graph.node if node.op_type == "BatchNormalization")
    bn.input[1] = "bn_scale_copy"
    new, report = sconv_onnx.optimize(model)
    assert "BatchNormalization" in [node.op_type for node in new.graph.node]
    assert "bn_scale" in [inp.name for inp in new.graph.input]
    assert report.status == "PASS"


#: Found by the graph fuzzer: one weight read by convs in both branches of an ``If`` and in
#: a nested ``If``, each conv followed by a BN (onnx-graphsurgeon's graph copy gives each
#: branch its own copy of ``w``, one reader each).
_SHARED_ACROSS_BRANCHES = """
<ir_version: 8, opset_import: ["" : 13]>
fuzz (float[1,2,5,5] x, bool cond) => (float[1,2,5,3] out)
   <float[2,2,1,1] w = {0.12573022,-0.13210486,0.64042264,0.104900114},
    float[2] s = {1.5942448,1.3154374}, float[2] b = {-0.12654215,-0.062327445},
    float[2] m = {0.0041325977,-0.23250307}, float[2] v = {0.5503784,1.5944831},
    bool yes = {1}>
{
   out = If (yes) <else_branch: graph = e () => (float[1,2,5,3] c0) {
      c0 = Conv <dilations: ints = [1, 2], strides: ints = [1, 2]> (x, w)
   }, then_branch: graph = t () => (float[1,2,5,3] inner) {
      c1 = Conv <dilations: ints = [1, 2], strides: ints = [1, 2]> (x, w)
      n1 = BatchNormalization (c1, s, b, m, v)
      inner = If (cond) <else_branch: graph = e2 () => (float[1,2,5,3] n2) {
         c2 = Conv <auto_pad: string = "SAME_UPPER"> (n1, w)
         n2 = BatchNormalization (c2, s, b, m, v)
      }, then_branch: graph = t2 () => (float[1,2,5,3] n3) {
         c3 = Conv (n1, w)
         n3 = BatchNormalization (c3, s, b, m, v)
      }>
   }>
}
"""


def test_batchnorm_after_a_weight_shared_across_branches_stays():
    """A weight read in several branches is shared even where each branch holds its own
    copy of it: no BN is folded into it, and both conditions give the original's outputs
    (folding changed the weight under the other branches' convs: 0.24 of the output)."""
    model = onnx.parser.parse_model(_SHARED_ACROSS_BRANCHES)
    new, report = sconv_onnx.optimize(model, select="all")
    assert not any("folded" in note for note in report.notes), report.notes
    x = np.random.default_rng(1).uniform(-1, 1, (1, 2, 5, 5)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert np.array_equal(_outputs(new, feeds), _outputs(model, feeds))


def _outputs(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
