"""The interleaved family (issue 13): two-factor IGC products found, factored, rewritten.

Exact products of every layout (G1, G2, R; contiguous, strided and permuted
channel orders; 1-D/2-D/3-D kernels) must be rewritten to at most the
factorization's weights and match the original within the rounding bound of
both computations; random weights must stay untouched.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
from conv_models import ConvSpec, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rounding import assert_within_rounding, layer_depth

import sconv_onnx
from sconv_onnx import chains, cost, interleave
from sconv_onnx.verify import random_feeds

EXAMPLES = int(os.environ.get("SCONV_PROPERTY_EXAMPLES", "200")) // 2
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def product(rng, out_ch: int, in_ch: int, kernel: tuple[int, ...], hyp: interleave.Hypothesis
            ) -> np.ndarray:
    """A random weight that is exactly the two-factor product ``hyp``."""
    return interleave.random_product(rng, (out_ch, in_ch, *kernel), hyp)


def _permutation(rng, size: int) -> tuple[int, ...]:
    return tuple(int(index) for index in rng.permutation(size))


@pytest.mark.parametrize("g1,g2,rank,kernel", [
    (4, 2, 1, (3, 3)), (2, 4, 2, (3, 3)), (4, 4, 1, (1, 1)), (3, 1, 2, (3,)), (1, 2, 3, (3, 3, 3)),
])
def test_search_finds_the_product_and_its_factors_are_exact(g1, g2, rank, kernel):
    rng = np.random.default_rng(0)
    hyp = interleave.Hypothesis(g1, g2, rank)
    weight = product(rng, 24, 12, kernel, hyp)
    found = interleave.search(weight, 1e-6)
    taps = math.prod(kernel)
    assert found and found[0].params(24, 12, taps) <= hyp.params(24, 12, taps)
    for candidate in found:
        factors = interleave.factor(weight, candidate)
        assert factors.residual < 1e-9
        assert np.allclose(interleave.expand(factors, weight.shape), weight, atol=1e-9)


def test_strided_outputs_are_found_in_their_order():
    rng = np.random.default_rng(1)
    hyp = interleave.Hypothesis(4, 2, 1, interleave.strided_order(32, 2), strided=True)
    weight = product(rng, 32, 24, (3, 3), hyp)
    labels = [candidate.label() for candidate in interleave.search(weight, 1e-6)]
    assert "G1=4 G2=2 R=1 strided" in labels
    assert "G1=4 G2=2 R=1" not in labels  # contiguous groups do not fit


def test_permuted_channels_are_recovered_when_the_kernel_has_several_taps():
    rng = np.random.default_rng(2)
    hyp = interleave.Hypothesis(4, 2, 1, _permutation(rng, 32), _permutation(rng, 24))
    weight = product(rng, 32, 24, (3, 3), hyp)
    recovered = interleave.recover_orders(weight, 1e-6)
    assert (recovered.in_groups, recovered.out_groups) == (4, 2)
    [found] = interleave.search(weight, 1e-6, [recovered])
    factors = interleave.factor(weight, found)
    assert found.rank == 1 and factors.residual < 1e-9
    assert np.allclose(interleave.expand(factors, weight.shape), weight, atol=1e-9)
    # a 1x1 kernel has one tap: no direction to group by
    assert interleave.recover_orders(weight[..., :1, :1], 1e-6) is None


def test_random_and_nearly_structured_weights_have_no_candidate():
    rng = np.random.default_rng(3)
    assert interleave.search(rng.standard_normal((64, 48, 3, 3)), 1e-4) == []
    assert interleave.recover_orders(rng.standard_normal((64, 48, 3, 3)), 1e-4) is None
    weight = product(rng, 32, 32, (3, 3), interleave.Hypothesis(4, 4, 1))
    noisy = weight + 1e-2 * np.linalg.norm(weight) / math.sqrt(weight.size) * rng.standard_normal(
        weight.shape)
    assert interleave.search(noisy, 1e-4) == []  # 1 % off the product: outside the tolerance
    assert interleave.search(noisy, 0.05) != []  # ... and within a looser one


@st.composite
def igc_specs(draw):
    """A Conv whose weight is an interleaved product: geometry as the box family's property
    tests draw it; the layout drawn too: two factors (G1, G2, R, order), or a chain with
    a depthwise first factor and one dense 1x1 conv, two group convs or three; the
    original conv of one group or two."""
    rank = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["pair", "depthwise + 1x1", "depthwise + pair",
                                 "depthwise + inner"]))
    low = 2 if kind != "pair" else 1  # a depthwise factor needs two taps to be seen
    kernel = tuple(draw(st.sampled_from([1, 2, 3] if rank == 3 else [1, 2, 3, 5]))
                   for _ in range(rank))
    if math.prod(kernel) < low:
        kernel = (2, *kernel[1:])
    groups = draw(st.sampled_from([1, 1, 2]))
    g1, g2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if g1 * g2 == 1:
        g2 = 2
    paths = draw(st.integers(1, 2))
    inner, inner_g1 = None, 1
    if kind == "depthwise + inner":  # the first 1x1 conv (G G1 groups of C/G1 -> G2) factored
        inner_g1, paths = draw(st.integers(1, 2)), 1
        g2 = 2 * draw(st.integers(1, 2))  # its outputs per group, G2, split in 2 groups
        inner = interleave.Hypothesis(inner_g1, 2, 1, groups=groups * g1)
    in_ch = g1 * inner_g1 * draw(st.integers(1, 4))  # per group
    out_ch = groups * g2 * draw(st.integers(2, 4))
    taps = math.prod(kernel)
    orders = ["contiguous", "strided"] + (["permuted"] if kind == "pair" and groups == 1 else [])
    order = draw(st.sampled_from(orders))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    out_order = in_order = None
    if order == "strided" and 1 < g2 < out_ch // groups and kind != "depthwise + 1x1":
        out_order = interleave.strided_order(out_ch, g2, groups)
    elif order == "permuted" and taps > 1:
        paths = 1  # recovered for R = 1 only
        out_order, in_order = _permutation(rng, out_ch), _permutation(rng, in_ch)
    hyp = interleave.Hypothesis(
        *((1, 1, 0) if kind == "depthwise + 1x1" else (g1, g2, paths)), out_order, in_order,
        strided=order == "strided" and out_order is not None, groups=groups,
        depthwise=kind != "pair", inner=inner)
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    spatial = tuple(e + draw(st.integers(0, 3)) for e in extent)
    pad_mode = draw(st.sampled_from(["none", "symmetric", "SAME_UPPER"]))
    pads = auto_pad = None
    if pad_mode == "symmetric":
        begin = [draw(st.integers(0, e - 1)) if e > 1 else 0 for e in extent]
        pads = tuple(begin + begin)
    elif pad_mode == "SAME_UPPER" and all(d == 1 for d in dilations):
        auto_pad = pad_mode
    spec = ConvSpec(in_per_group=in_ch, out_channels=out_ch, group=groups, kernel=kernel,
                    spatial=spatial, strides=strides, dilations=dilations, pads=pads,
                    auto_pad=auto_pad, bias=draw(st.booleans()), opset=draw(st.integers(11, 21)),
                    seed=seed)
    return spec, hyp, product(rng, out_ch, in_ch, kernel, hyp)


def _float_weights(model) -> int:
    """Float constants of ``model`` (Gather indices are not weights)."""
    return sum(math.prod(init.dims) for init in model.graph.initializer if init.data_type in (1, 11))


@SETTINGS
@given(igc_specs())
def test_exact_products_are_rewritten_to_at_most_their_weights_and_match(drawn):
    spec, hyp, weight = drawn
    model = make_model(spec, weight)
    new, report = sconv_onnx.optimize(model, select="all", families=["igc"])
    [layer] = report.plan.layers
    taps = math.prod(spec.kernel)
    factored = hyp.params(spec.out_channels, spec.in_per_group, taps) + spec.bias * spec.out_channels
    if factored >= weight.size + spec.bias * spec.out_channels:
        return  # the product has as many weights as the dense conv: nothing to gain
    assert layer.rewritten and layer.family == "igc", layer.reason
    assert _float_weights(new) <= factored
    feeds = random_feeds(model, {"x": spec.input_shape}, seed=spec.seed)
    assert_within_rounding(model, new, feeds, layer_depth(model), layer.chosen.rounding_depth)


@SETTINGS
@given(igc_specs())
def test_random_weights_of_the_same_layers_are_left_alone(drawn):
    spec, _, weight = drawn
    rng = np.random.default_rng(spec.seed)
    model = make_model(spec, rng.standard_normal(weight.shape))
    new, report = sconv_onnx.optimize(model, select="all", families=["igc"])
    assert not report.plan.layers[0].rewritten
    assert [node.op_type for node in new.graph.node] == ["Conv"]


def test_the_default_selection_takes_a_product_whose_groups_are_whole_blocks():
    """128 channels, G1 = 4, G2 = 2: 32 and 64 channels per group, whole NCHWc blocks on
    every machine; the cost model predicts a gain, so plain ``optimize`` rewrites it."""
    rng = np.random.default_rng(4)
    weight = product(rng, 128, 128, (3, 3), interleave.Hypothesis(4, 2, 4))
    spec = ConvSpec(in_per_group=128, out_channels=128, group=1, kernel=(3, 3), spatial=(14, 14),
                    pads=(1, 1, 1, 1))
    _, report = sconv_onnx.optimize(make_model(spec, weight))
    [layer] = report.plan.layers
    assert layer.rewritten and layer.family == "igc"
    assert report.after.macs < 0.5 * report.before.macs
    assert report.max_rel_error < 1e-5


def test_groups_outside_whole_blocks_are_priced_as_onnxruntime_runs_them(monkeypatch):
    monkeypatch.setattr(cost, "nchwc_block", lambda: 16)
    assert cost.blocked(16, 32) and not cost.blocked(8, 32)
    monkeypatch.setattr(cost, "nchwc_block", lambda: 8)
    assert cost.blocked(8, 24)
    unblocked = cost.conv_op(64, 8, 64, (3, 3), 1.0, kind="unblocked")
    dense = cost.conv_op(64, 8, 64, (3, 3), 1.0)
    assert unblocked.cost > dense.cost and unblocked.macs == dense.macs


def _conv_model(weight: np.ndarray, batchnorm: bool = False, computed_bias: bool = False):
    """``Conv(x, W)`` (3x3, pads 1) on ``1 x C x 10 x 10``: followed by a BatchNormalization
    (seeded statistics), or with a bias computed at run time (``Relu`` of a constant)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    out_ch, in_ch = weight.shape[:2]
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    nodes, conv_inputs = [], ["x", "w"]
    if computed_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out_ch).astype(np.float32), "b0"))
        nodes.append(helper.make_node("Relu", ["b0"], ["b"]))
        conv_inputs.append("b")
    nodes.append(helper.make_node("Conv", conv_inputs, ["c"], name="k", pads=[1, 1, 1, 1]))
    last = "c"
    if batchnorm:
        stats = [rng.uniform(0.5, 1.5, out_ch), 0.1 * rng.standard_normal(out_ch),
                 0.1 * rng.standard_normal(out_ch), rng.uniform(0.5, 1.5, out_ch)]
        names = [f"bn{i}" for i in range(4)]
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(stats, names)]
        nodes.append(helper.make_node("BatchNormalization", ["c", *names], ["y"], name="bn"))
        last = "y"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, 10, 10])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, out_ch, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("order", ["contiguous", "strided", "permuted"])
def test_a_batchnorm_after_the_product_is_folded_in_every_order(order):
    rng = np.random.default_rng(12)
    out_order = in_order = None
    if order == "strided":
        out_order = interleave.strided_order(32, 2)
    elif order == "permuted":
        out_order, in_order = _permutation(rng, 32), _permutation(rng, 16)
    hyp = interleave.Hypothesis(4, 2, 1, out_order, in_order, strided=order == "strided")
    model = _conv_model(product(rng, 32, 16, (3, 3), hyp), batchnorm=True)
    new, report = sconv_onnx.optimize(model, select="all", families=["igc"])
    [layer] = report.plan.layers
    assert layer.rewritten and layer.folded == ("bn",)
    ops = [node.op_type for node in new.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    assert (ops[-1] == "Gather") == (order != "contiguous")  # the outputs put back in order
    assert report.max_rel_error < 1e-5


def test_a_computed_bias_keeps_the_outputs_in_contiguous_groups():
    """A bias known only at run time cannot be reordered into the second conv: a strided
    product then gets a layout without the final permutation, or none."""
    rng = np.random.default_rng(13)
    hyp = interleave.Hypothesis(4, 2, 1, interleave.strided_order(32, 2), strided=True)
    model = _conv_model(product(rng, 32, 16, (3, 3), hyp), computed_bias=True)
    new, report = sconv_onnx.optimize(model, select="all", families=["igc"])
    [layer] = report.plan.layers
    if layer.rewritten:
        assert "strided" not in layer.chosen.label and "permuted" not in layer.chosen.label
        assert [node.op_type for node in new.graph.node][-1] == "Conv"
    assert report.max_rel_error < 1e-5


@SETTINGS
@given(igc_specs())
def test_the_screen_never_bounds_a_layout_above_its_least_rank(drawn):
    """:func:`interleave.rank_bound` is a lower bound of what the full check finds, for
    the drawn product's own layout and any other (the search's "never refuses" claim)."""
    spec, hyp, weight = drawn
    out_ch, in_ch = weight.shape[:2]
    taps = math.prod(spec.kernel)
    total = float(np.sum(weight**2))
    rng = np.random.default_rng(spec.seed)
    noisy = weight + 1e-5 * np.sqrt(total / weight.size) * rng.standard_normal(weight.shape)
    own = [] if hyp.depthwise else [dataclasses.replace(hyp, rank=0)]
    for layout in [*own, *interleave.layouts(out_ch, in_ch, spec.group)[:8]]:
        per_rank = dataclasses.replace(layout, rank=1).params(out_ch, in_ch, taps)
        limit = -(-weight.size // per_rank)
        if limit <= 1:
            continue
        for w in (weight, noisy):
            energy = interleave.energies(interleave.blocks(w, layout))
            full = interleave.least_rank(energy, float(np.sum(w**2)), 1e-4, limit)
            bound = interleave.rank_bound(w, layout, limit, float(np.sum(w**2)), 1e-4)
            if full is not None:
                assert bound is not None and bound <= full[0], (layout, bound, full)


def _attrs(node) -> dict:
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def test_a_chain_of_four_factors_is_found_and_rewritten_to_four_convs():
    """IGC-V2's shape: a depthwise 3x3, then three 1x1 group convs with shuffles (the first
    two the inner layout of the pair's first conv); it has the fewest weights, so
    ``select="all"`` writes it."""
    rng = np.random.default_rng(14)
    hyp = interleave.Hypothesis(4, 4, 1, depthwise=True, inner=interleave.Hypothesis(2, 2, 1, groups=4))
    weight = product(rng, 32, 32, (3, 3), hyp)
    found = chains.search(weight, 1e-6)
    assert found[0] == hyp and found[0].residual < 1e-12
    new, report = sconv_onnx.optimize(_conv_model(weight), select="all", families=["igc"])
    [layer] = report.plan.layers
    assert layer.rewritten and layer.chosen.label.startswith("depthwise + G1=4 G2=4 R=1 (first")
    convs = [node for node in new.graph.node if node.op_type == "Conv"]
    assert [_attrs(node)["group"] for node in convs] == [32, 8, 8, 4]
    assert [node.op_type for node in new.graph.node].count("Gather") == 2  # two interleaves
    assert _float_weights(new) <= hyp.params(32, 32, 9)
    assert report.max_rel_error < 1e-5


def test_a_grouped_conv_factors_group_by_group():
    rng = np.random.default_rng(15)
    hyp = interleave.Hypothesis(2, 2, 1, interleave.strided_order(32, 2, 2), strided=True, groups=2)
    weight = product(rng, 32, 8, (3, 3), hyp)
    assert hyp in interleave.search(weight, 1e-6, groups=2)
    spec = ConvSpec(in_per_group=8, out_channels=32, group=2, kernel=(3, 3), spatial=(9, 9),
                    pads=(1, 1, 1, 1))
    model = make_model(spec, weight)
    new, report = sconv_onnx.optimize(model, select="all", families=["igc"])
    [layer] = report.plan.layers
    assert layer.rewritten and "per group of 2" in layer.chosen.label
    assert _float_weights(new) <= hyp.params(32, 8, 9) + 32
    feeds = random_feeds(model, {"x": spec.input_shape}, seed=0)
    assert_within_rounding(model, new, feeds, layer_depth(model), layer.chosen.rounding_depth)


def test_the_default_selection_takes_a_depthwise_chain_whose_groups_are_whole_blocks():
    rng = np.random.default_rng(16)
    hyp = interleave.Hypothesis(2, 2, 8, depthwise=True)  # 1x1 convs of 64 -> 16, 16 -> 64
    weight = product(rng, 128, 128, (3, 3), hyp)
    spec = ConvSpec(in_per_group=128, out_channels=128, group=1, kernel=(3, 3), spatial=(14, 14),
                    pads=(1, 1, 1, 1))
    _, report = sconv_onnx.optimize(make_model(spec, weight))
    [layer] = report.plan.layers
    assert layer.rewritten and layer.family == "igc" and layer.chosen.label.startswith("depthwise")
    assert report.after.macs < 0.2 * report.before.macs
    assert report.max_rel_error < 1e-5


def test_random_weights_have_no_chain_and_separable_ones_do():
    rng = np.random.default_rng(17)
    assert chains.search(rng.standard_normal((32, 16, 3, 3)), 1e-4) == []
    separable = rng.standard_normal((32, 16))[:, :, None, None] * rng.standard_normal((16, 1, 3, 3)
                                                                                      ).transpose(1, 0, 2, 3)
    found = chains.search(separable, 1e-6)
    # a random 1x1 rest is no pair: the depthwise conv and one dense 1x1 conv, alone
    assert found == [interleave.Hypothesis(1, 1, 0, depthwise=True)]
    assert found[0].residual < 1e-12
    noisy = separable + 1e-2 * rng.standard_normal(separable.shape)
    assert chains.search(noisy, 1e-4) == []


def test_the_measure_hook_times_the_rewrite_it_would_write():
    """``select="measured"`` times candidates through the family's ``measure`` hook: it
    hands the timer the layer alone and, per candidate, that layer rewritten by the
    family's own emit (a timer that records the models stands in for onnxruntime; no
    speed is asserted)."""
    from sconv_onnx.passes.igc import InterleavedFamily
    from sconv_onnx.view import ModelView

    rng = np.random.default_rng(18)
    hyp = interleave.Hypothesis(2, 2, 1, depthwise=True)
    weight = product(rng, 64, 64, (3, 3), hyp)
    spec = ConvSpec(in_per_group=64, out_channels=64, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1))
    model = make_model(spec, weight)
    family = InterleavedFamily()
    [site] = family.find(ModelView.of(model, {"x": spec.input_shape}))
    candidates = family.candidates(site, 1e-4)
    recorded = {}

    class RecordingTimer:
        def ratios(self, original, variants):
            recorded["original"] = original[1]()
            recorded["variants"] = [build() for _, build in variants]
            recorded["keys"] = [original[0], *(key for key, _ in variants)]
            return [0.5] * len(variants)

    trials = [(candidate, ()) for candidate in candidates]
    assert family.measure(site, trials, RecordingTimer()) == [0.5] * len(candidates)
    assert len(set(recorded["keys"])) == len(candidates) + 1  # one timing each
    ops = [[node.op_type for node in built.graph.node] for built in recorded["variants"]]
    layer = [node.op_type for node in recorded["original"].graph.node]
    assert layer == ["Conv"] * 3  # the layer between two identity depthwise convs
    for candidate, written in zip(candidates, ops):
        stages = interleave.stages(candidate.payload, 64, 64)
        assert written.count("Conv") == 2 + len(stages)


def test_budget_fits_are_exact_on_products_and_the_data_aware_one_fits_the_data_better():
    from sconv_onnx.passes import igc_budget

    rng = np.random.default_rng(19)
    hyp = interleave.Hypothesis(2, 2, 4)
    exact = product(rng, 32, 32, (3, 3), hyp)
    # patches whose features are correlated within each input group (144 features) and not
    # across: there the per-group metric is the whole one, and its fit the best on the data
    mixing = np.zeros((288, 288))
    for start in (0, 144):
        mixing[start:start + 144, start:start + 144] = rng.standard_normal((144, 144))
    patches = rng.standard_normal((2000, 288)) @ mixing
    assert igc_budget.fit(exact, hyp, patches).residual < 1e-8
    weight = rng.standard_normal((32, 32, 3, 3))
    plain, fitted = igc_budget.fit(weight, hyp, None), igc_budget.fit(weight, hyp, patches)
    assert plain.residual < fitted.residual  # the weight-space fit is nearest in weights ...
    assert (igc_budget.output_error(weight, fitted, patches)
            < igc_budget.output_error(weight, plain, patches))  # ... the other on the data


def test_a_budget_can_take_an_approximate_product(tmp_path):
    """On a dense conv of random weights, a MAC budget forced to 0.5 with only the igc
    family gets there by approximate products, fitted on the calibration data, written
    as their factors (the model verifies against the plan's own error)."""
    rng = np.random.default_rng(20)
    spec = ConvSpec(in_per_group=64, out_channels=64, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1))
    model = make_model(spec, rng.standard_normal((64, 64, 3, 3)).astype(np.float32))
    calib = {"x": rng.standard_normal((8, *spec.input_shape[1:])).astype(np.float32)}
    new, report = sconv_onnx.optimize(model, families=["igc"], target_macs=0.5, calib_data=calib,
                                      min_agreement=0, max_error=10.0)  # forced: no bound
    [layer] = report.plan.layers
    assert layer.rewritten and layer.chosen.approximate and layer.family == "igc"
    assert report.after.macs <= 0.5 * report.before.macs
    assert [node.op_type for node in new.graph.node].count("Conv") == 2
    assert 0 < layer.output_error < 1
