"""``optimize(int8=True)`` / ``--int8`` (issue 15): the rewrite leaves out what int8
quantization cannot hold: pools over channels (their sums' common part fills the 256
levels, and the small layer after them takes differences), CumSum running sums, and
weights rebuilt in the graph (onnxruntime's quantizers want initializers).
``benchmarks/INT8.md`` has the measured errors."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from sconv_onnx.models import csg_resnet, demo_cnn

import sconv_onnx
from sconv_onnx.cli import main
from sconv_onnx.plan import CHANNEL_SUMS, POOL_BEFORE


def test_int8_keeps_spatial_pools_and_drops_channel_pools():
    model = demo_cnn.build()
    usual = sconv_onnx.analyze(model, select="all")
    assert any("matrix" in layer.chosen.lowering for layer in usual.rewritten)
    plan = sconv_onnx.analyze(model, select="all", int8=True)
    assert plan.int8 and not usual.int8 and plan.to_dict()["int8"] is True
    for layer in plan.rewritten:
        assert layer.chosen.int8_safe and "matrix" not in layer.chosen.lowering
        assert "cumsum" not in layer.chosen.lowering
    by_node = {layer.node: layer for layer in plan.layers}
    # a 1x1 conv's only structure pools over channels: nothing int8 can hold
    assert not by_node["conv23"].rewritten and by_node["conv23"].decided_by == "skipped"
    assert by_node["conv23"].reason == f"box: int8: {CHANNEL_SUMS}"
    # a 3x3 conv structured over channels and space keeps its spatial part (c = C)
    spatial = [layer for layer in plan.rewritten
               if layer.weight_shape[2:] == (3, 3) and layer.chosen.family == "box"]
    assert spatial and all(layer.chosen.label.startswith(f"c={layer.weight_shape[1]} ")
                           for layer in spatial)


def test_int8_leaves_shared_generators_out_so_the_quantizer_runs(tmp_path):
    """A shared generator's rebuilt weights are not initializers: quantize_dynamic refuses
    them. With int8, the csg family rewrites nothing and the quantizer runs."""
    model = csg_resnet.build("cifar")
    usual, _ = sconv_onnx.optimize(model)
    onnx.save(usual, str(tmp_path / "usual.onnx"))
    with pytest.raises(ValueError, match="initializer"):
        quantize_dynamic(str(tmp_path / "usual.onnx"), str(tmp_path / "q1.onnx"),
                         weight_type=QuantType.QInt8)
    safe, report = sconv_onnx.optimize(model, int8=True)
    assert not any(layer.family == "csg" for layer in report.plan.rewritten)
    onnx.save(safe, str(tmp_path / "safe.onnx"))
    quantize_dynamic(str(tmp_path / "safe.onnx"), str(tmp_path / "q2.onnx"),
                     weight_type=QuantType.QInt8)
    assert (tmp_path / "q2.onnx").stat().st_size > 0


def test_the_command_line_takes_int8(tmp_path, capsys):
    path = tmp_path / "demo.onnx"
    onnx.save(demo_cnn.build(), str(path))
    assert main(["analyze", str(path), "--select", "all", "--int8"]) == 0
    out = capsys.readouterr().out
    assert f"box: --int8: {CHANNEL_SUMS}" in out and "matrix" not in out


def _spatial_conv(pads, group: int = 1, bias: bool = True, batchnorm: bool = False):
    """A stride-1 3x3 conv whose kernels are 2x2 boxes spread over 3x3 (c = C, n = 2x2),
    with ``pads``, ``group`` and an optional bias and BatchNormalization after it."""
    rng = np.random.default_rng(3)
    channels, out = 8, 8
    alpha = rng.standard_normal((out, channels // group, 2, 2)).astype(np.float32)
    weight = np.zeros((out, channels // group, 3, 3), np.float32)
    for i in range(2):
        for j in range(2):
            weight[:, :, i:i + 2, j:j + 2] += alpha[:, :, i:i + 1, j:j + 1]
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["z"], name="conv", pads=list(pads), group=group,
                              kernel_shape=[3, 3])]
    last = "z"
    if batchnorm:
        for name, value in (("scale", rng.uniform(0.5, 2, out)), ("shift", rng.standard_normal(out)),
                            ("mean", rng.standard_normal(out)), ("var", rng.uniform(0.5, 2, out))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn_{name}"))
        nodes.append(helper.make_node("BatchNormalization", ["z", "bn_scale", "bn_shift", "bn_mean",
                                                             "bn_var"], ["y"], name="bn"))
        last = "y"
    size = 12
    out_size = [size + pads[i] + pads[2 + i] - 2 for i in range(2)]
    graph = helper.make_graph(
        nodes, "spatial", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         [1, channels, size, size])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, out, *out_size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pads,group,bias,batchnorm", [
    ((1, 1, 1, 1), 1, True, False), ((0, 0, 0, 0), 1, False, False),
    ((0, 1, 2, 1), 2, True, False), ((1, 1, 1, 1), 1, True, True)])
def test_int8_pools_after_the_small_conv(pads, group, bias, batchnorm):
    """With int8 a stride-1 spatial structure is written as the small conv (with the
    layer's pads, bias and folded BN) then an AveragePool of its output: exact, and the
    pool before it is left out as a risk."""
    model = _spatial_conv(pads, group, bias, batchnorm)
    usual = sconv_onnx.analyze(model, select="all")
    # fewer MACs: the pool first (an all-ones conv where a pad reaches the window)
    assert usual.layers[0].chosen.lowering == ("ones_conv" if max(pads) >= 2 else "avgpool")
    new, report = sconv_onnx.optimize(model, select="all", int8=True)
    (layer,) = report.plan.layers
    assert layer.rewritten and layer.chosen.lowering == "avgpool_after"
    assert layer.folded == (("bn",) if batchnorm else ())
    assert [node.op_type for node in new.graph.node] == ["Conv", "AveragePool"]
    conv, pool = new.graph.node
    assert pool.input[0] == conv.output[0] and pool.output[0] == model.graph.output[0].name
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [2, 2] and attrs["pads"] == list(pads)
    assert attrs["group"] == group and len(conv.input) == (3 if bias or batchnorm else 2)
    assert report.status == "PASS" and report.max_rel_error < 1e-5
    # the plan's MACs are the written model's
    assert report.after.macs == report.plan.totals()["macs_after"]
    assert usual.layers[0].chosen.int8_risk == POOL_BEFORE
