"""bench output, cost-model decisions on known cases, shared pools, measured selection."""

import json

import numpy as np
import onnx
import pytest
from conv_models import ConvSpec, make_model
from onnx import TensorProto, helper, numpy_helper
from sconv_onnx.models import demo_cnn
from sconv_onnx.models.build import MODELS

import sconv_onnx
from sconv_onnx.cli import main
from sconv_onnx.revert import WHOLE_MODEL_MARGIN
from sconv_onnx.select import MEASURED_MARGIN
from sconv_onnx.structure import expand


@pytest.fixture
def pair(tmp_path):
    source, target = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(demo_cnn.build(), str(source))
    assert main(["optimize", str(source), str(target), "--quiet"]) == 0
    return source, target


def test_bench_prints_medians_and_the_pair_ratio(pair, capsys):
    capsys.readouterr()
    assert main(["bench", *map(str, pair), "--runs", "5", "--warmup", "1", "--threads", "1",
                 "--profile"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("A: ") and lines[1].startswith("B: ")
    assert lines[2].split() == ["model", "median", "ms", "p90", "ms"]
    assert "B / A: " in out and "median of 5 per-pair ratios; 1 threads, spinning off" in out
    assert "per op type" in out and "AveragePool" in out


def test_bench_json_has_timings_ratios_and_profile(pair, capsys):
    capsys.readouterr()
    assert main(["bench", *map(str, pair), "--runs", "4", "--warmup", "0", "--json", "--profile"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"schema_version", "tool", "threads", "runs", "warmup", "timings",
                           "ratios", "profile"}
    assert [t["name"] for t in result["timings"]] == ["A", "B"]
    assert all(t["median_ms"] > 0 and t["p90_ms"] >= t["median_ms"] for t in result["timings"])
    assert result["ratios"][0] == 1.0 and result["ratios"][1] > 0
    assert all(len(values) == 2 for values in result["profile"].values())
    assert result["profile"]["Conv"][0] > 0


def test_bench_single_model_and_bad_counts(pair, capsys):
    capsys.readouterr()
    assert main(["bench", str(pair[0]), "--runs", "3", "--warmup", "0"]) == 0
    assert " / " not in capsys.readouterr().out
    assert main(["bench", str(pair[0]), "--runs", "0"]) == 2
    assert "--runs must be an integer >= 1" in capsys.readouterr().err


def test_optimize_bench_prints_the_ab_line(pair, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "c.onnx"
    assert main(["optimize", str(pair[0]), str(out), "--quiet", "--bench", "--runs", "3",
                 "--warmup", "0"]) == 0
    assert "rewritten / original: " in capsys.readouterr().out


def test_cost_model_never_rewrites_depthwise_3x3_at_n2():
    # measured 1.03-2x slower at every MobileNetV2 shape (benchmarks/CALIBRATION.md)
    for channels, size, stride in ((32, 112, 1), (144, 56, 2), (384, 14, 1), (960, 7, 1)):
        spec = ConvSpec(in_per_group=1, out_channels=channels, group=channels, kernel=(3, 3),
                        spatial=(size, size), strides=(stride, stride), pads=(1, 1, 1, 1),
                        sizes=(1, 2, 2))
        layer = sconv_onnx.analyze(make_model(spec)).layers[0]
        assert layer.best.payload.sizes == (1, 2, 2)
        assert layer.decision == "keep" and layer.decided_by == "cost", (channels, layer.reason)


def test_cost_model_skips_1x1_channel_pooling_where_it_loses():
    # c = C/2 on a 1x1 conv with C = O = 64: the pool costs as much as it saves
    spec = ConvSpec(in_per_group=64, out_channels=64, group=1, kernel=(1, 1), spatial=(28, 28),
                    sizes=(32, 1, 1))
    layer = sconv_onnx.analyze(make_model(spec)).layers[0]
    assert layer.best.payload.sizes == (32, 1, 1)
    assert layer.decision == "keep" and layer.decided_by == "cost"
    # 2-D, wide: the 0/1 matrix costs what it saves, CumSum would leave the NCHWc layout
    spec = ConvSpec(in_per_group=512, out_channels=512, group=1, kernel=(1, 1), spatial=(7, 7),
                    sizes=(256, 1, 1))
    assert sconv_onnx.analyze(make_model(spec)).layers[0].decision == "keep"
    # 1-D and wide, CumSum pays
    spec = ConvSpec(in_per_group=512, out_channels=512, group=1, kernel=(1,), spatial=(500,),
                    sizes=(256, 1))
    layer = sconv_onnx.analyze(make_model(spec)).layers[0]
    assert layer.decision == "rewrite" and layer.chosen.payload.lowering.channel == "cumsum"


def test_cost_model_prefers_spatial_structure_alone_when_channel_pooling_costs_more():
    # structured at c = C - 1 (window of 2 channels): pooling saves almost nothing
    spec = ConvSpec(in_per_group=128, out_channels=128, group=1, kernel=(3, 3), spatial=(28, 28),
                    pads=(1, 1, 1, 1), sizes=(127, 2, 2))
    # the box family alone: a 2x2 structure is also a depthwise-then-1x1 interleaved
    # product (each 3x3 kernel lies in the 4 boxes' span), the igc family's
    layer = sconv_onnx.analyze(make_model(spec), families=["box"]).layers[0]
    assert layer.best.payload.sizes == (127, 2, 2)
    assert layer.decision == "rewrite" and layer.chosen.payload.sizes == (128, 2, 2)
    assert layer.chosen.payload.lowering.channel is None


def _resnet_like_block(channels: int = 64) -> onnx.ModelProto:
    """x -> conv3x3/2 (c=C/2, n=2) and x -> conv1x1/2 (c=C/2): both read x, same channel pool."""
    rng = np.random.default_rng(0)
    w3 = expand(rng.standard_normal((2 * channels, channels // 2, 2, 2)),
                (2 * channels, channels, 3, 3)).astype(np.float32)
    w1 = expand(rng.standard_normal((2 * channels, channels // 2, 1, 1)),
                (2 * channels, channels, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["a"], name="conv3x3", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["x", "w1"], ["b"], name="downsample", strides=[2, 2]),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * channels, 14, 14])],
        [numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(w1, "w1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_layers_reading_the_same_tensor_share_one_channel_pool():
    model = _resnet_like_block(512)
    new, report = sconv_onnx.optimize(model)
    first, second = report.plan.layers
    assert first.rewritten and second.rewritten
    assert first.chosen.payload.lowering.channel == second.chosen.payload.lowering.channel
    assert first.shared == () and second.shared == ("channel pool",)
    pools = [n for n in new.graph.node if n.op_type == "CumSum" or
             (n.op_type == "Conv" and n.name.endswith("sconv_channel_pool"))]
    assert len(pools) == 1
    # the shared pool's constants are counted once, with the first layer
    assert second.params_after == second.weight_shape[0] * second.chosen.payload.structure.dof
    assert report.max_rel_error < 1e-5


def test_measured_selection_records_its_timings_and_keeps_only_wins():
    model = _resnet_like_block(64)
    _, report = sconv_onnx.optimize(model, select="measured", threads=1)
    for layer in report.plan.layers:
        assert layer.measured_ratio is not None and layer.measured_ratio > 0
        if layer.decided_by != "excluded":
            assert layer.decided_by == "measured"
            assert layer.rewritten == (layer.measured_ratio <= MEASURED_MARGIN)
    if report.plan.rewritten:
        assert report.plan.model_ratio <= WHOLE_MODEL_MARGIN
    assert report.max_rel_error < 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_benchmark_models_never_get_3d_pooling_and_stay_exact(name):
    """select=all on every benchmark model: pools have the conv's rank; outputs unchanged."""
    model = MODELS[name].build(size="small")
    rank = len(MODELS[name].input_shape("small")) - 2
    new, report = sconv_onnx.optimize(model, select="all")
    assert report.plan.rewritten
    pools = [n for n in new.graph.node if n.op_type == "AveragePool"]
    for pool in pools:
        kernel = next(a.ints for a in pool.attribute if a.name == "kernel_shape")
        assert len(kernel) == rank
    before = {n.op_type for n in model.graph.node}
    assert {n.op_type for n in new.graph.node} - before <= {"AveragePool", "CumSum", "Slice", "Sub", "Add",
                                                             "Gather"}  # igc's shuffles
    assert report.max_rel_error < 1e-4


def test_measured_selection_reverts_layers_when_the_whole_model_is_not_faster(monkeypatch):
    """The whole-model A/B check is the arbiter: a slower model loses its least gainful rewrites."""
    from sconv_onnx import revert

    verdicts = iter([1.2, 0.5])
    monkeypatch.setattr(revert, "whole_model_ratio", lambda *args: next(verdicts))
    model = demo_cnn.build()
    _, report = sconv_onnx.optimize(model, select="measured", threads=1)
    reverted = [layer for layer in report.plan.layers if layer.decided_by == "excluded"]
    assert reverted and all(not layer.rewritten and layer.excluded for layer in reverted)
    assert report.plan.model_ratio == 0.5
    [note] = [note for note in report.notes if note.startswith("whole-model check")]
    assert "1.200x with" in note and "then 0.500x with" in note and note.endswith(": kept")
    kept = [layer for layer in report.plan.layers if layer.rewritten]
    assert max(layer.measured_ratio for layer in kept) <= min(layer.measured_ratio for layer in reverted)
