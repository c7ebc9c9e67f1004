"""Property tests: random Conv layers, rewritten and checked in onnxruntime.

Exactly structured weights must be rewritten (the weight count drops to the
structured count plus the pool's own constants) and match the original
within the rounding bound of both computations (:mod:`rounding`); the same
layers with random weights must stay untouched.
"""

import math
import os

from conv_models import ConvSpec, make_model, make_weight, weight_elements
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from rounding import assert_within_rounding, layer_depth

import sconv_onnx
from sconv_onnx.structure import relative_residual
from sconv_onnx.verify import random_feeds

EXAMPLES = int(os.environ.get("SCONV_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def conv_specs(draw, structured: bool = True) -> ConvSpec:
    rank = draw(st.integers(1, 3))
    kernel_sizes = [1, 2, 3, 5, 7] if rank < 3 else [1, 2, 3]
    kernel = tuple(draw(st.sampled_from(kernel_sizes)) for _ in range(rank))
    depthwise = draw(st.booleans())
    group = draw(st.integers(1, 3)) if not depthwise else draw(st.integers(2, 4))
    in_per_group = 1 if depthwise else draw(st.integers(1, 6))
    out_channels = group * draw(st.integers(1 if group > 1 else 2, 3))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    spatial = tuple(e + draw(st.integers(0, 4)) for e in extent)
    pad_mode = draw(st.sampled_from(["none", "symmetric", "asymmetric", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads, auto_pad = None, None
    if pad_mode == "symmetric":
        begin = [draw(st.integers(0, e - 1)) if e > 1 else 0 for e in extent]
        pads = tuple(begin + begin)
    elif pad_mode == "asymmetric":
        pads = tuple(draw(st.integers(0, max(0, e - 1))) for e in extent + extent)
    elif pad_mode.startswith("SAME") and any(d > 1 for d in dilations):
        auto_pad = "VALID"  # onnxruntime rejects dilation with SAME padding
    elif pad_mode != "none":
        auto_pad = pad_mode
    sizes = None
    if structured:
        sizes = (draw(st.integers(1, in_per_group)),) + tuple(draw(st.integers(1, k)) for k in kernel)
    opset = draw(st.integers(11, 21))
    return ConvSpec(
        in_per_group=in_per_group, out_channels=out_channels, group=group, kernel=kernel,
        spatial=spatial, strides=strides if draw(st.booleans()) or any(s > 1 for s in strides) else None,
        dilations=dilations if any(d > 1 for d in dilations) or draw(st.booleans()) else None,
        pads=pads, auto_pad=auto_pad, bias=draw(st.booleans()),
        weight_as_constant_node=draw(st.booleans()), opset=opset,
        dynamic_batch=draw(st.booleans()), batch=draw(st.integers(1, 2)), sizes=sizes,
        seed=draw(st.integers(0, 2**16)),
    )


def _optimize(spec: ConvSpec, **kwargs):
    """``spec``'s model optimized by the box family (a box structure is often an
    interleaved product too: the igc family's own tests are ``test_igc.py``)."""
    model = make_model(spec)
    shapes = {"x": spec.input_shape} if spec.dynamic_batch else None
    return model, *sconv_onnx.optimize(model, input_shapes=shapes, families=["box"], **kwargs)


def _assert_exact(spec: ConvSpec, model, new, layer) -> None:
    """The rewrite matches the original within both computations' rounding."""
    feeds = random_feeds(model, {"x": spec.input_shape}, seed=spec.seed)
    assert_within_rounding(model, new, feeds, layer_depth(model), layer.chosen.rounding_depth)


#: Kernels the issue names explicitly, always run whatever hypothesis draws.
NAMED_KERNELS = [
    ConvSpec(in_per_group=4, out_channels=6, group=1, kernel=(1, 3), spatial=(5, 9), pads=(0, 1, 0, 1),
             sizes=(2, 1, 2)),
    ConvSpec(in_per_group=3, out_channels=4, group=2, kernel=(3, 1), spatial=(9, 5), strides=(2, 1),
             auto_pad="SAME_LOWER", sizes=(3, 1, 1), dynamic_batch=True, batch=2),
    ConvSpec(in_per_group=1, out_channels=4, group=4, kernel=(5, 5), spatial=(11, 11),
             pads=(2, 1, 2, 3), dilations=(2, 1), sizes=(1, 2, 3), opset=21),
    ConvSpec(in_per_group=3, out_channels=8, group=1, kernel=(7, 7), spatial=(20, 20), strides=(2, 2),
             pads=(3, 3, 3, 3), sizes=(3, 3, 3), weight_as_constant_node=True, opset=11),
]


@given(conv_specs(structured=True))
@SETTINGS
@example(NAMED_KERNELS[0])
@example(NAMED_KERNELS[1])
@example(NAMED_KERNELS[2])
@example(NAMED_KERNELS[3])
def test_structured_layers_are_rewritten_and_exact(spec):
    trivial = (spec.in_per_group,) + spec.kernel
    model, new, report = _optimize(spec, select="all")
    (layer,) = report.plan.layers
    if spec.sizes == trivial:
        assert not layer.rewritten
        return
    assert layer.rewritten, layer.reason
    event(f"lowering {layer.chosen.lowering}")
    # fewest MACs: the built structure, or a coarser one that contains it (no channel
    # pooling when the pool costs more MACs than it saves; a window that tiles the
    # built one); whichever, the weight has it, checked here without the search
    sizes = layer.chosen.payload.sizes
    assert sizes != trivial
    assert relative_residual(make_weight(spec), sizes) < 1e-6
    # the original weight is gone; alpha has the structured count
    counts = weight_elements(new)
    assert "W" not in counts
    (alpha,) = [name for name in counts if name.endswith("sconv_alpha")]
    assert counts[alpha] == spec.out_channels * math.prod(sizes)
    bias = spec.out_channels if spec.bias else 0
    pool_constants = sum(n for name, n in counts.items() if "sconv_" in name and name != alpha)
    assert sum(counts.values()) == counts[alpha] + bias + pool_constants == layer.params_after
    assert layer.params_after < layer.params_before + pool_constants
    # the plan's MACs (per sample) are the written model's, counted node by node (a dynamic
    # batch at 1: the MAC context)
    totals = report.plan.totals()
    batch = 1 if spec.dynamic_batch else spec.batch
    assert report.before.macs == batch * totals["macs_before"]
    assert report.after.macs == batch * totals["macs_after"]
    # onnxruntime agrees within the rounding of both computations
    _assert_exact(spec, model, new, layer)
    # model-level fields are kept
    assert new.ir_version == model.ir_version
    assert list(new.opset_import) == list(model.opset_import)
    assert [i.name for i in new.graph.input] == ["x"]
    assert [o.name for o in new.graph.output] == ["z"]
    lowering = layer.chosen.payload.lowering
    ops = [n.op_type for n in new.graph.node]
    if spec.opset >= 19 or (spec.dilations and any(d > 1 for d in spec.dilations)):
        assert "AveragePool" not in ops
    assert lowering.channel in (None, "cumsum", "matrix")
    assert not any(n.op_type == "AveragePool" and len(n.input) and _rank5(new, n) for n in new.graph.node)


def _rank5(model, node) -> bool:
    """True when an AveragePool pools over more spatial axes than the conv has (3-D pooling of channels)."""
    kernel = next(a.ints for a in node.attribute if a.name == "kernel_shape")
    conv = next(n for n in model.graph.node if n.name == "conv")
    return len(kernel) != len(next(a.ints for a in conv.attribute if a.name == "kernel_shape"))


@given(conv_specs(structured=False))
@SETTINGS
def test_random_weights_are_left_untouched(spec):
    model, new, report = _optimize(spec, select="all")
    (layer,) = report.plan.layers
    assert not layer.rewritten
    assert layer.best is None
    assert new.SerializeToString() == model.SerializeToString()


def _rewrite_with(spec: ConvSpec, lowering) -> tuple:
    """Rewrite the single layer of ``spec`` with a forced lowering; return the original, the
    rewritten model and the layer's plan."""
    from sconv_onnx import pipeline
    from sconv_onnx.options import Options

    options = Options(select="all", families=("box",))
    analysis = pipeline.analyse(make_model(spec), options, {"x": spec.input_shape})
    plan = pipeline.plan(analysis)
    ((entry,), (layer,)) = analysis.entries, plan.layers
    same = [c for c in entry.candidates if c.payload.sizes == layer.chosen.payload.sizes]
    layer.chosen = same[lowering % len(same)]
    return analysis.view.model, pipeline.rewrite(analysis, plan), layer


@given(conv_specs(structured=True), st.integers(0, 5))
@SETTINGS
def test_every_valid_lowering_is_exact(spec, choice):
    if spec.sizes == (spec.in_per_group,) + spec.kernel:
        return
    original, new, layer = _rewrite_with(spec, choice)
    event(f"lowering {layer.chosen.lowering}")
    _assert_exact(spec, original, new, layer)


def test_the_rounding_bound_catches_a_rewrite_off_by_one_part_in_a_thousand():
    """A control: the bound is tight enough to see a small error in alpha."""
    import numpy as np
    import pytest
    from onnx import numpy_helper

    spec = ConvSpec(in_per_group=16, out_channels=16, group=1, kernel=(3, 3), spatial=(12, 12),
                    pads=(1, 1, 1, 1), sizes=(8, 2, 2))
    model, new, report = _optimize(spec, select="all")
    (layer,) = report.plan.layers
    _assert_exact(spec, model, new, layer)
    alpha = next(init for init in new.graph.initializer if init.name.endswith("sconv_alpha"))
    alpha.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(alpha) * np.float32(1.001),
                                           alpha.name))
    with pytest.raises(AssertionError, match="above the rounding bound"):
        _assert_exact(spec, model, new, layer)
