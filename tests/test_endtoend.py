"""The MAC budget chosen, fitted and bounded on the whole model's output (sconv_onnx.endtoend)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sconv_onnx
from sconv_onnx import datafit
from sconv_onnx.calibration import accuracy_proxy, run_batches, split_batches
from sconv_onnx.cli import main
from sconv_onnx.endtoend import divergence, score_tensor, scoring_layer
from sconv_onnx.errors import VerificationError
from sconv_onnx.passes.box.calibrate import refit as box_refit
from sconv_onnx.passes.lowrank import factor, regression, truncations
from sconv_onnx.plan import Candidate

WIDTH = 64


def _chain(rng, layers: int = 4, classes: int = 10, softmax: bool = False) -> onnx.ModelProto:
    """``x (N, 64)`` through ``layers`` MatMul+Relu of plain random weights, then a
    classifier MatMul to ``classes`` scores (a Softmax after it when ``softmax``)."""
    nodes, inits, name = [], [], "x"
    for index in range(layers):
        weight = rng.standard_normal((WIDTH, WIDTH)) * np.sqrt(2 / WIDTH)
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
        nodes += [helper.make_node("MatMul", [name, f"w{index}"], [f"m{index}"], name=f"fc{index}"),
                  helper.make_node("Relu", [f"m{index}"], [f"r{index}"])]
        name = f"r{index}"
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((WIDTH, classes)) / np.sqrt(WIDTH)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [name, "head"], ["logits"], name="head"))
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["p"], axis=-1))
        out = "p"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(rng, count: int, mixing: np.ndarray) -> np.ndarray:
    """Correlated inputs (a few strong directions): what makes data-aware fits matter."""
    return (rng.standard_normal((count, WIDTH)) @ mixing).astype(np.float32)


@pytest.fixture(scope="module")
def chain_data():
    rng = np.random.default_rng(0)
    model = _chain(rng, layers=6)
    mixing = rng.standard_normal((WIDTH, WIDTH)) * np.linspace(2, 0.05, WIDTH)[:, None]
    return model, _inputs(rng, 512, mixing), _inputs(rng, 256, mixing)


def test_sequential_fit_beats_one_shot_fits_on_other_inputs(chain_data):
    """Six layers, each fitted alone on the original model's inputs (one-shot), against
    each fitted on what it receives once those before it are compressed: the second
    corrects the errors of the layers before it, on data the fit never saw too."""
    model, calib, other = chain_data
    held_out = split_batches(model, {"x": other})
    reference = run_batches(model, held_out)
    errors = {}
    for sequential in (False, True):
        new, report = sconv_onnx.optimize(model, calib_data={"x": calib}, target_macs=0.5,
                                          min_agreement=0, sequential_fit=sequential,
                                          families="lowrank")
        assert report.plan.budget_check["sequential_fit"] is sequential
        assert len(report.plan.rewritten) >= 3  # the chain is compressed along its length
        errors[sequential] = accuracy_proxy(reference, run_batches(new, held_out))["rel_error"]
    # measured: 0.330 against 0.373 (0.305 against 0.351 on the calibration data)
    assert errors[True] < 0.92 * errors[False]


def test_refits_on_the_original_inputs_are_the_one_shot_fits():
    """With the inputs the original layer saw, the sequential fit has nothing to correct."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((24, 40))
    patches = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    mapped, lower = regression(weight, patches, patches)
    assert np.allclose(mapped, weight, atol=1e-8)
    again, once = truncations(mapped, [8], lower)[0], factor(weight, 8, patches)
    assert np.allclose(again.up @ again.down, once.up @ once.down, atol=1e-8)

    site = SimpleNamespace(weight=rng.standard_normal((6, 4, 3, 3)))  # what the box refit reads
    conv_patches = rng.standard_normal((1, 500, 36))
    alpha, error = datafit.LayerSample(site.weight, conv_patches).fit((2, 2, 2))
    candidate = Candidate("box", "c=2 n=2x2", 0.5, (), payload=_Payload((2, 2, 2)), approximate=True)
    refitted = box_refit(site, candidate, conv_patches, conv_patches)
    assert np.allclose(refitted.payload.alpha, alpha) and refitted.output_error == pytest.approx(error)


@dataclass(frozen=True)
class _Payload:
    sizes: tuple
    alpha: object = None


def _tight(model, calib, **settings):
    return sconv_onnx.optimize(model, calib_data={"x": calib}, target_macs=0.3, **settings)


def test_the_bound_stops_the_budget_and_says_what_it_reached(chain_data):
    model, calib, _ = chain_data
    _, forced = _tight(model, calib, min_agreement=0)
    assert forced.after.macs <= 0.3 * forced.before.macs
    forced_agreement = forced.plan.budget_check["calibration"]["top1_agreement"]
    bound = (1 + forced_agreement) / 2  # between the forced plan's and perfect
    _, report = _tight(model, calib, min_agreement=bound)
    check = report.plan.budget_check
    assert check["calibration"]["top1_agreement"] >= bound and check["holds"]
    assert check["moves_taken"] < check["moves_to_target"]
    assert report.after.macs > 0.3 * report.before.macs  # not met, and not claimed
    assert any("stopped at its bound" in note for note in report.notes)
    assert any("MAC budget 0.3 NOT met" in note for note in report.notes)
    with pytest.raises(VerificationError, match="not met"):
        _tight(model, calib, min_agreement=bound, strict_target=True)


def test_cli_strict_target_exits_1_and_writes_nothing(chain_data, tmp_path, capsys):
    model, calib, _ = chain_data
    onnx.save(model, tmp_path / "chain.onnx")
    np.savez(tmp_path / "calib.npz", x=calib)
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(tmp_path / "chain.onnx"), str(out), "--calib-data",
            str(tmp_path / "calib.npz"), "--target-macs", "0.3", "--min-agreement", "0.999"]
    assert main(argv + ["--strict-target"]) == 1 and not out.exists()
    assert "not met (strict target)" in capsys.readouterr().err
    assert main(argv) == 0 and out.exists()
    assert "stopped at its bound" in capsys.readouterr().out


def _branches(rng, gains: tuple[float, float]) -> onnx.ModelProto:
    """Two MatMul branches of the input, scaled by ``gains`` and summed into the scores."""
    nodes, inits = [], []
    for index, gain in enumerate(gains):
        weight = rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"w{index}"),
                  numpy_helper.from_array(np.float32(gain), f"g{index}")]
        nodes += [helper.make_node("MatMul", ["x", f"w{index}"], [f"b{index}"], name=f"branch{index}"),
                  helper.make_node("Mul", [f"b{index}", f"g{index}"], [f"s{index}"])]
    nodes.append(helper.make_node("Add", ["s0", "s1"], ["y"]))
    graph = helper.make_graph(
        nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_selection_follows_each_layers_effect_at_the_output():
    """Two layers alike but for what reaches the output (x10 against x0.1): per-layer
    errors cannot tell them apart, the measured sensitivities can."""
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((64, WIDTH)).astype(np.float32)}
    _, report = sconv_onnx.optimize(_branches(rng, (10.0, 0.1)), calib_data=calib,
                                    target_macs=0.8, min_agreement=0, families="lowrank")
    sensitivity = report.plan.budget_check["sensitivities"]
    assert sensitivity["b1"] < 1e-3 * sensitivity["b0"]
    assert [layer.node for layer in report.plan.rewritten] == ["branch1"]


@pytest.mark.parametrize("softmax", [True, False])
def test_a_classifier_whose_classes_the_data_does_not_show_is_left_alone(softmax):
    """Behind a Softmax, or giving raw logits (as most exported classifiers do)."""
    rng = np.random.default_rng(3)
    model = _chain(rng, layers=1, classes=200, softmax=softmax)
    calib = {"x": rng.standard_normal((16, WIDTH)).astype(np.float32)}  # <= 16 of 200 answers
    _, report = sconv_onnx.optimize(model, calib_data=calib, target_macs=0.5, min_agreement=0,
                                    families="lowrank")
    head = next(layer for layer in report.plan.layers if layer.node == "head")
    assert not head.rewritten and "200 classes" in head.reason
    assert any(layer.rewritten for layer in report.plan.layers)  # the budget went elsewhere


def test_scores_are_the_logits_before_a_softmax_and_compared_by_divergence():
    rng = np.random.default_rng(4)
    model = _chain(rng, layers=1, softmax=True)
    assert score_tensor(model) == ("logits", -1)
    assert scoring_layer(model, "logits") == "logits"
    assert score_tensor(_chain(rng, layers=1)) == ("logits", None)
    logits = rng.standard_normal((5, 10))
    assert divergence(logits, logits + 3.0, -1) == pytest.approx(0, abs=1e-12)  # same answers
    moved = logits.copy()
    moved[:, 0] += 2
    assert divergence(logits, moved, -1) > 0.01
