"""``optimize(int8=True)`` / ``--int8`` (issue 15): the rewrite leaves out what int8
quantization cannot hold: pools over channels (their sums' common part fills the 256
levels, and the small layer after them takes differences), CumSum running sums, and
weights rebuilt in the graph (onnxruntime's quantizers want initializers).
``benchmarks/INT8.md`` has the measured errors."""

import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic
from sconv_onnx.models import csg_resnet, demo_cnn

import sconv_onnx
from sconv_onnx.cli import main
from sconv_onnx.plan import CHANNEL_SUMS


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
    spatial = [layer for layer in plan.rewritten if layer.weight_shape[2:] == (3, 3)]
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
