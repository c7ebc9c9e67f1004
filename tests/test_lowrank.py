"""The low-rank family (issue 12): two thin layers for a MAC budget, fitted on the data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sconv_onnx
from sconv_onnx.passes.lowrank import (
    RANK_STEP,
    SpatialFactors,
    factor,
    fit_horizontal,
    output_error,
    ranks,
    spatial_truncations,
)


def _low_rank(rng, rows: int, cols: int, rank: int, noise: float = 0.0) -> np.ndarray:
    weight = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / rank
    return (weight + noise * rng.standard_normal((rows, cols))).astype(np.float32)


def _model(rng) -> onnx.ModelProto:
    """A strided 1x1 conv (96 <- 64 channels) and a Gemm (``transB``, 128 <- 96), both
    of rank 16; a Relu after the Gemm, so that it is not a classifier's last layer (which
    the budget leaves alone while the data shows few of its classes)."""
    conv_w = _low_rank(rng, 96, 64, 16).reshape(96, 64, 1, 1)
    fc_w = _low_rank(rng, 128, 96, 16)
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], strides=[2, 2], name="pw"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], transB=1, name="fc"),
             helper.make_node("Relu", ["g"], ["y"])]
    inits = [numpy_helper.from_array(conv_w, "wc"), numpy_helper.from_array(fc_w, "w1"),
             numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), "b1")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 128])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_factors_are_exact_at_full_rank_weighted_or_not():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 40))
    patches = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40))  # correlated
    for fitted in (factor(weight, 24), factor(weight, 24, patches)):
        assert np.allclose(fitted.up @ fitted.down, weight, atol=1e-9)
        assert output_error(weight, fitted, patches) < 1e-9


def test_data_aware_factors_lose_less_output_than_weight_space_ones():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((32, 48))
    scales = np.geomspace(10, 0.01, 48)  # inputs of very different energy per feature
    patches = rng.standard_normal((2000, 48)) * scales
    plain, fitted = factor(weight, 8), factor(weight, 8, patches)
    assert output_error(weight, fitted, patches) < 0.5 * output_error(weight, plain, patches)


def test_few_patches_do_not_make_a_perfect_fit_that_fails_on_other_inputs():
    """A classifier sees one row per sample: with fewer rows than inputs, an unshrunk fit
    would reproduce them exactly (error ~0) and be far off on other inputs."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((64, 128))
    seen, unseen = rng.standard_normal((16, 128)), rng.standard_normal((2000, 128))
    fitted, plain = factor(weight, 16, seen), factor(weight, 16)
    assert output_error(weight, fitted, seen) > 0.3  # no illusion of a free move
    assert output_error(weight, fitted, unseen) < 1.05 * output_error(weight, plain, unseen)


def test_ranks_are_whole_blocks_below_break_even():
    offered = ranks(512, 256)  # break-even 170.7
    assert offered == [160, 128, 112, 96, 64, 48] and all(r % RANK_STEP == 0 for r in offered)
    assert ranks(4, 4) == []  # break-even 2: no whole block below it


def test_budget_takes_low_rank_layers_and_their_macs_match_the_written_model():
    rng = np.random.default_rng(2)
    model = _model(rng)
    calib = {"x": rng.standard_normal((16, 64, 8, 8)).astype(np.float32)}
    # the conv at rank 16 alone leaves 0.48 of the MACs: 0.45 needs the Gemm too
    new, report = sconv_onnx.optimize(model, calib_data=calib, target_macs=0.45)
    layers = {layer.node: layer for layer in report.plan.layers}
    assert all(layer.family == "lowrank" and layer.decided_by == "budget"
               for layer in layers.values())
    assert {layer.chosen.label for layer in layers.values()} <= {"rank 16", "rank 32", "rank 48"}
    # the plan's MACs are the emitted nodes' MACs, counted afresh on the written model
    assert report.plan.totals()["macs_after"] == report.after.macs < 0.45 * report.before.macs
    assert [node.op_type for node in new.graph.node].count("Conv") == 2
    assert all(check.status == "PASS" for check in report.layer_checks)
    assert report.max_rel_error < 1e-5  # rank 16 is the weights' own rank


def test_without_a_budget_the_family_offers_nothing():
    plan = sconv_onnx.analyze(_model(np.random.default_rng(3)))
    assert "lowrank" in plan.families
    assert all(layer.family != "lowrank" and not layer.rewritten for layer in plan.layers)


@pytest.mark.parametrize("fit", ["data", "weights"])
def test_both_fits_reach_the_budget(fit):
    rng = np.random.default_rng(4)
    model = _model(rng)
    calib = {"x": rng.standard_normal((8, 64, 8, 8)).astype(np.float32)}
    _, report = sconv_onnx.optimize(model, calib_data=calib, target_macs=0.6, alpha_fit=fit,
                                    min_agreement=0)
    assert report.after.macs <= 0.6 * report.before.macs


def _kxk_model(rng, weight: np.ndarray, **attrs) -> onnx.ModelProto:
    """One 2-D conv with ``weight`` and a bias on a ``N x C x 17 x 19`` input, then a Relu."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="k", **attrs),
             helper.make_node("Relu", ["c"], ["y"])]
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(len(weight)).astype(np.float32), "b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1], 17, 19])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", len(weight), "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_spatial_factors_are_exact_at_full_rank_and_the_data_fit_keeps_them():
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((20, 12, 3, 5))
    patches = rng.standard_normal((300, 12 * 15))
    full = spatial_truncations(weight, [min(20 * 5, 12 * 3)])[0]
    assert np.allclose(full.expand(weight.shape), weight, atol=1e-9)
    assert output_error(weight, full, patches) < 1e-9
    assert output_error(weight, fit_horizontal(weight, full, patches, patches), patches) < 1e-9


def test_spatial_data_fit_loses_less_output_than_the_weight_space_one():
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((32, 16, 3, 3))
    scales = np.repeat(np.geomspace(10, 0.01, 16), 9)  # channels of very different energy
    patches = rng.standard_normal((3000, 16 * 9)) * scales
    plain = spatial_truncations(weight, [8])[0]
    fitted = fit_horizontal(weight, plain, patches, patches)
    assert output_error(weight, fitted, patches) < 0.8 * output_error(weight, plain, patches)


def _split_by_the_budget(rng, weight: np.ndarray, target: float, **attrs):
    """``weight``'s conv forced to ``target`` by the lowrank family: its layer, the two
    convs' weight shapes, and the report (the MACs and errors checked here)."""
    model = _kxk_model(rng, weight, **attrs)
    calib = {"x": rng.standard_normal((8, weight.shape[1], 17, 19)).astype(np.float32)}
    new, report = sconv_onnx.optimize(model, calib_data=calib, target_macs=target, max_error=10,
                                      families=["lowrank"])
    [layer] = report.plan.layers
    shapes = {init.name: tuple(init.dims) for init in new.graph.initializer}
    first, second = (node for node in new.graph.node if node.op_type == "Conv")
    assert report.plan.totals()["macs_after"] == report.after.macs < target * report.before.macs
    assert report.max_rel_error < 1e-5
    assert all(check.status == "PASS" for check in report.layer_checks)
    return layer, shapes[first.input[1]], shapes[second.input[1]]


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 3], "pads": [0, 2, 1, 0], "dilations": [1, 2]},
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 1]},
    {"strides": [3, 1], "auto_pad": "SAME_LOWER"},
])
def test_a_spatially_low_rank_kxk_conv_becomes_two_convs_with_its_geometry_split(attrs):
    """Exact weights of spatial rank 16: the budget takes the spatial split (the channel
    split would lose), the written model is exact, its MACs are the plan's."""
    rng = np.random.default_rng(8)
    weight = SpatialFactors(rng.standard_normal((16, 48, 3)),
                            rng.standard_normal((64, 16, 3)) / 30).expand((64, 48, 3, 3))
    layer, first, second = _split_by_the_budget(rng, weight, 0.7, **attrs)
    assert layer.chosen.label.startswith("spatial rank")
    assert (first[2:], second[2:]) == ((3, 1), (1, 3))


def test_a_kxk_conv_of_low_channel_rank_splits_into_a_kxk_and_a_1x1_conv():
    rng = np.random.default_rng(9)
    weight = _low_rank(rng, 64, 48 * 9, 16).reshape(64, 48, 3, 3)
    layer, first, second = _split_by_the_budget(rng, weight, 0.4, strides=[2, 2], pads=[1, 1, 1, 1])
    assert layer.chosen.label.startswith("rank")
    assert first[1:] == (48, 3, 3) and second[2:] == (1, 1)


def test_a_non_square_kernel_keeps_its_rows_in_the_first_conv_and_columns_in_the_second():
    rng = np.random.default_rng(10)
    weight = SpatialFactors(rng.standard_normal((16, 48, 3)),
                            rng.standard_normal((64, 16, 5)) / 30).expand((64, 48, 3, 5))
    layer, first, second = _split_by_the_budget(rng, weight, 0.7, strides=[1, 2],
                                                pads=[1, 2, 1, 2])
    assert layer.chosen.label.startswith("spatial rank")
    assert (first[2:], second[2:]) == ((3, 1), (1, 5))
