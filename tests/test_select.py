"""The selector and the whole-model check: exclusions hold for every family and for the
budget, so ``select="measured"`` always ends; the analysis is done once per run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sconv_onnx.models import resnet

import sconv_onnx
from sconv_onnx import pipeline, revert
from sconv_onnx.cost import OpCost
from sconv_onnx.options import Options
from sconv_onnx.passes import Family, LayerInfo, Site
from sconv_onnx.passes.box import BoxFamily
from sconv_onnx.plan import Candidate, Part
from sconv_onnx.select import Settings, SiteEntry, select
from sconv_onnx.structure import expand


def _every_kind() -> onnx.ModelProto:
    """A structured Conv, ConvTranspose, Gemm and MatMul, each rewritten by the cost model."""
    rng = np.random.default_rng(0)
    weights = {
        "cw": expand(rng.standard_normal((64, 64, 2, 2)), (64, 64, 3, 3)),
        "tw": expand(rng.standard_normal((64, 32, 2, 2)), (64, 64, 4, 4)),
        "gw": expand(rng.standard_normal((256, 256)), (256, 512)),  # OUT x IN (transB)
        "mw": expand(rng.standard_normal((256, 256)), (256, 512)).T,  # IN x OUT
    }
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "tw"], ["t"], name="deconv", strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Gemm", ["f", "gw"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["f", "mw"], ["m"], name="matmul"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "every_kind",
        [value("x", TensorProto.FLOAT, [1, 64, 32, 32]), value("f", TensorProto.FLOAT, [1, 512])],
        [value("t", TensorProto.FLOAT, [1, 64, 64, 64]), value("g", TensorProto.FLOAT, [1, 256]),
         value("m", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), name)
         for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def slow_whole_model(monkeypatch):
    """Every whole-model check says 1.2x (the rewrite is slower); the calls, counted.

    More than 25 calls means the loop does not end: fail instead of hanging.
    """
    calls = []

    def verdict(*args):
        calls.append(args)
        assert len(calls) <= 25, "the measured loop does not end"
        return 1.2

    monkeypatch.setattr(revert, "whole_model_ratio", verdict)
    return calls


def test_cost_model_rewrites_every_kind_and_shares_the_feature_pool():
    plan = sconv_onnx.analyze(_every_kind())
    assert [(layer.op, layer.decision, layer.decided_by) for layer in plan.layers] == [
        ("Conv", "rewrite", "cost"), ("ConvTranspose", "rewrite", "cost"),
        ("Gemm", "rewrite", "cost"), ("MatMul", "rewrite", "cost")]
    assert plan.layers[3].shared == ("feature pool",)


def test_measured_selection_reverts_gemm_matmul_and_conv_transpose_and_ends(slow_whole_model):
    model = _every_kind()
    new, report = sconv_onnx.optimize(model, select="measured", threads=1)
    layers = report.plan.layers
    # four layers: 2 reverted, then 1, then 1; nothing left to check
    assert len(slow_whole_model) == 3
    assert all(layer.decided_by == "excluded" and not layer.rewritten for layer in layers)
    assert all(layer.excluded.startswith("reverted: the whole model ran 1.20x") for layer in layers)
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in model.graph.node]
    # layers the family cannot time alone were decided, and reverted, by the cost model
    assert {layer.op for layer in layers if layer.measured_ratio is None} == {
        "ConvTranspose", "Gemm", "MatMul"}


def test_the_analysis_is_done_once_whatever_the_rounds(slow_whole_model, monkeypatch):
    searched = []
    original = BoxFamily.candidates
    monkeypatch.setattr(BoxFamily, "candidates",
                        lambda self, site, tol: searched.append(site) or original(self, site, tol))
    sconv_onnx.optimize(_every_kind(), select="measured", threads=1)
    assert len(slow_whole_model) == 3 and len(searched) == 4


def test_excluded_layers_are_kept_whatever_their_family():
    options = Options()
    analysis = pipeline.analyse(_every_kind(), options)
    excluded = {"g": "kept for this test", "t": "kept too"}
    plan = pipeline.plan(analysis, excluded)
    decisions = {layer.op: (layer.decision, layer.excluded) for layer in plan.layers}
    assert decisions == {"Conv": ("rewrite", None), "ConvTranspose": ("keep", "kept too"),
                         "Gemm": ("keep", "kept for this test"), "MatMul": ("rewrite", None)}
    # the MatMul now pays for its own feature pool: the Gemm no longer emits one
    assert plan.layers[3].shared == ()
    rewritten = pipeline.rewrite(analysis, plan)
    assert sorted(n.op_type for n in rewritten.graph.node).count("CumSum") == 1


def _images(count: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.cumsum(np.cumsum(rng.standard_normal((count, 3, size, size)), axis=2), axis=3)
    return (x / x.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)


def test_budget_with_exclusions_ends_and_never_picks_an_excluded_layer(slow_whole_model):
    model, _ = resnet.build("plain_resnet18", (2, 2, 2, 2), False, resnet.plain, seed=0,
                            size="small")
    _, report = sconv_onnx.optimize(model, select="measured", threads=1,
                                    calib_data={"image": _images(2, 32)}, target_macs=0.5,
                                    min_agreement=0)
    layers = report.plan.layers
    assert 1 <= len(slow_whole_model) <= len(layers)
    assert not report.plan.rewritten
    assert any(layer.decided_by == "excluded" for layer in layers)
    assert all(layer.decided_by != "budget" for layer in layers if layer.excluded)
    assert report.plan.notes and "not reachable" in report.plan.notes[0]


class _Named(Family):
    def __init__(self, name: str):
        self.name = name


def _info(key: str) -> LayerInfo:
    """A layer whose cost model says 100 (per output position: no shapes)."""
    return LayerInfo(key, key, "MatMul", params_before=10, ops=(OpCost("MatMul", 100.0, 0.0),))


def _candidate(family: str, cost_per_layer: dict) -> Candidate:
    """Costs 100 * factor for each member (key -> factor), one part each."""
    parts = tuple(Part("layer", 1, (OpCost("MatMul", 100.0 * factor, 0.0),), None, member=key)
                  for key, factor in cost_per_layer.items())
    return Candidate(family, family, 0.0, parts)


@pytest.mark.parametrize("group_cost, taken", [(0.72, True), (0.76, False)])
def test_a_group_is_weighed_against_its_layers_as_they_would_be_decided(group_cost, taken):
    # alone, a would be rewritten at 0.5x and b kept (its only candidate predicts 1.5x),
    # so the pair costs 0.5 + 1.0 = 1.5 of 2: a group must beat 0.75x, not 1.0x
    a, b = _info("a"), _info("b")
    entries = [
        SiteEntry(_Named("single"), Site(family="single", layers=(a,)),
                  [_candidate("single", {"a": 0.5})]),
        SiteEntry(_Named("single"), Site(family="single", layers=(b,)),
                  [_candidate("single", {"b": 1.5})]),
        SiteEntry(_Named("pair"), Site(family="pair", layers=(a, b)),
                  [_candidate("pair", {"a": group_cost, "b": group_cost})]),
    ]
    plan = select(entries, Settings(1e-4, "cost"))
    assert [layer.family for layer in plan.layers] == (["pair", "pair"] if taken else
                                                       ["single", "single"])
    assert [layer.rewritten for layer in plan.layers] == ([True, True] if taken else [True, False])
