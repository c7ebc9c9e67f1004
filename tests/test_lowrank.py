"""The low-rank family (issue 12): two thin layers for a MAC budget, fitted on the data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sconv_onnx
from sconv_onnx.passes.lowrank import RANK_STEP, factor, output_error, ranks


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
