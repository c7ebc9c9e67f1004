"""Training towards interleaved group convolutions (sconv_onnx.training, issue 13).

The regularizer's distance must be the least-squares distance the rewrite sees
(the blocks' truncated SVD), the projection must land on a product the
optimizer finds and rewrites exactly, and a short training run must shrink the
distance.
"""

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn
from training_loop import train_briefly

import sconv_onnx
from sconv_onnx import chains, interleave
from sconv_onnx.interleave import Hypothesis
from sconv_onnx.training import (
    InterleavedRule,
    StructuralRegularizer,
    StructureSpec,
    interleaved_residual,
    project_interleaved,
)

LAYOUTS = [
    Hypothesis(4, 2, 2),
    Hypothesis(2, 4, 1, interleave.strided_order(16, 4), strided=True),
    Hypothesis(2, 2, 1, groups=2),
]


@pytest.mark.parametrize("hyp", LAYOUTS, ids=lambda hyp: hyp.label())
def test_the_distance_is_the_rewrites_least_squares_residual(hyp):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 8 // hyp.groups, 3, 3))
    expected = interleave.factor(weight, hyp).residual
    got = float(interleaved_residual(torch.as_tensor(weight), hyp))
    assert got == pytest.approx(expected, rel=1e-9)
    projected = project_interleaved(torch.as_tensor(weight), hyp)
    distance = np.linalg.norm(projected.numpy() - weight) / np.linalg.norm(weight)
    assert distance == pytest.approx(expected, rel=1e-9)
    assert float(interleaved_residual(projected, hyp)) < 1e-7  # projected: on the layout


def test_the_distance_is_zero_on_products_and_has_finite_gradients():
    rng = np.random.default_rng(1)
    hyp = Hypothesis(4, 2, 1)
    product = torch.as_tensor(interleave.random_product(rng, (16, 8, 3, 3), hyp),
                              dtype=torch.float32).requires_grad_()
    distance = interleaved_residual(product, hyp)
    distance.backward()
    assert float(distance.detach()) < 1e-3 and torch.isfinite(product.grad).all()
    weight = torch.as_tensor(rng.standard_normal((16, 8, 3, 3))).requires_grad_()
    interleaved_residual(weight, hyp).backward()
    step = 1e-6 * torch.as_tensor(rng.standard_normal(weight.shape))
    with torch.no_grad():
        change = interleaved_residual(weight + step, hyp) - interleaved_residual(weight - step, hyp)
    assert float(change) == pytest.approx(2 * float(torch.sum(weight.grad * step)), rel=1e-4)


def test_rules_give_layouts_that_divide_the_channels():
    spec = StructureSpec([InterleavedRule(kernel=3, in_groups=4, out_groups=2, rank_ratio=1.0)])
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 64, 3, groups=2),
                          nn.Conv2d(64, 64, 1))
    assert spec.assign(model) == {"1": Hypothesis(4, 2, 4), "2": Hypothesis(4, 2, 4, groups=2)}
    strided = StructureSpec([InterleavedRule(in_groups=2, out_groups=4, strided=True)])
    assert strided.assign(nn.Conv2d(8, 16, 3))[""].out_order == interleave.strided_order(16, 4)


@pytest.mark.parametrize("make", [
    lambda: InterleavedRule(in_groups=1, out_groups=1),
    lambda: InterleavedRule(rank_ratio=0.0),
    lambda: StructureSpec(overrides={"0": Hypothesis(3, 2, 1)}).assign(
        nn.Sequential(nn.Conv2d(8, 8, 3))),  # G1 = 3 does not divide 8 channels
    lambda: StructureSpec(overrides={"0": Hypothesis(1, 1, 0, depthwise=True)}).assign(
        nn.Sequential(nn.Conv2d(8, 8, 3))),  # a chain: projected by chains.factor, not trained
])
def test_bad_interleaved_specs_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_chains_project_too():
    """Any layout the rewrite knows projects (chains included): the weight the factors
    multiply out to."""
    rng = np.random.default_rng(2)
    hyp = Hypothesis(4, 2, 1, depthwise=True)
    weight = torch.as_tensor(rng.standard_normal((16, 8, 3, 3)))
    projected = project_interleaved(weight, hyp).numpy()
    assert chains.factor(projected, hyp).residual < 1e-12


def test_training_towards_igc_then_projection_rewrites_exactly(tmp_path):
    """A small dense CNN trained with the regularizer ends near its layouts; projected and
    exported, ``optimize`` rewrites both layers as interleaved products, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    spec = StructureSpec([InterleavedRule(kernel=3, in_groups=4, out_groups=2)])
    regularizer = StructuralRegularizer(model, spec, strength=1.0)
    assert set(regularizer.sizes) == {"2", "4"}
    start = regularizer.penalty().item()
    train_briefly(model, regularizer, size=8)
    assert regularizer.penalty().item() < 0.2 * start
    before = regularizer.project()
    assert max(before.values()) < 0.1 and regularizer.penalty().item() < 1e-5
    path = tmp_path / "igc.onnx"
    model.eval()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), opset_version=17,
                          dynamo=False, input_names=["x"], output_names=["y"])
    _, report = sconv_onnx.optimize(str(path), select="all")
    rewritten = {layer.node: layer for layer in report.plan.layers if layer.rewritten}
    assert {layer.family for layer in rewritten.values()} == {"igc"} and len(rewritten) == 2
    weights = {layer.node: layer.params_after for layer in rewritten.values()}
    for name, layer in rewritten.items():  # at most the layout's weights (and the bias)
        hyp = regularizer.sizes["2" if "2" in name else "4"]
        out_ch, in_ch = layer.weight_shape[:2]
        assert weights[name] <= hyp.params(out_ch, in_ch, 9) + out_ch + hyp.channels_between
    assert report.verified and report.max_rel_error < 1e-5
    assert math.isfinite(report.max_rel_error)
