"""ConvTranspose: structured layers are rewritten exactly, whatever the attributes.

Property tests over rank 1-3, kernels, strides, dilations, groups, explicit
and asymmetric pads, ``output_padding``, ``output_shape`` and ``auto_pad``;
the layer is checked against onnxruntime on the original.
"""

import math
import os

import numpy as np
import onnx
import pytest
from conv_models import IR_FOR_OPSET, ConvSpec, make_model, make_weight, weight_elements
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from rounding import assert_within_rounding, layer_depth

import sconv_onnx
from sconv_onnx.passes.box.conv_transpose import output_crops
from sconv_onnx.runtime import run
from sconv_onnx.structure import relative_residual
from sconv_onnx.verify import compare_outputs, random_feeds

EXAMPLES = int(os.environ.get("SCONV_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _full_length(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Uncropped ConvTranspose output length: ``s (x-1) + (K-1) d + 1``."""
    return stride * (size - 1) + (kernel - 1) * dilation + 1


@st.composite
def transpose_specs(draw, structured: bool = True) -> ConvSpec:
    rank = draw(st.integers(1, 3))
    kernel = tuple(draw(st.sampled_from([1, 2, 3, 4, 5] if rank < 3 else [1, 2, 3])) for _ in range(rank))
    depthwise = draw(st.booleans())
    group = draw(st.integers(2, 4)) if depthwise else draw(st.integers(1, 3))
    in_per_group = 1 if depthwise else draw(st.integers(1, 4))
    out_channels = group * (1 if depthwise else draw(st.integers(1 if group > 1 else 2, 5)))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    full = [_full_length(x, k, s, d) for x, k, s, d in zip(spatial, kernel, strides, dilations)]
    mode = draw(st.sampled_from(["none", "pads", "output_padding", "output_shape", "SAME_UPPER",
                                 "SAME_LOWER", "VALID"]))
    attrs: dict = {}
    pads, auto_pad = None, None
    if mode in ("pads", "output_padding"):
        pads = tuple(draw(st.integers(0, 3)) for _ in range(2 * rank))
        assume(all(f - pads[i] - pads[rank + i] >= 1 for i, f in enumerate(full)))
    if mode == "output_padding":
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]
    elif mode == "output_shape":
        attrs["output_shape"] = [max(1, f + draw(st.integers(-3, s - 1))) for f, s in zip(full, strides)]
    elif mode.startswith("SAME") and any(d > 1 for d in dilations):
        auto_pad = "VALID"
    elif mode not in ("none", "pads"):
        auto_pad = mode
    sizes = None
    if structured:
        sizes = (draw(st.integers(1, out_channels // group)),) + tuple(draw(st.integers(1, k)) for k in kernel)
    return ConvSpec(
        op="ConvTranspose", in_per_group=in_per_group, out_channels=out_channels, group=group,
        kernel=kernel, spatial=spatial,
        strides=strides if any(s > 1 for s in strides) or draw(st.booleans()) else None,
        dilations=dilations if any(d > 1 for d in dilations) else None,
        pads=pads, auto_pad=auto_pad, bias=draw(st.booleans()),
        weight_as_constant_node=draw(st.booleans()), opset=draw(st.integers(11, 21)),
        dynamic_batch=draw(st.booleans()), batch=draw(st.integers(1, 2)), sizes=sizes,
        seed=draw(st.integers(0, 2**16)), extra_attrs=attrs,
    )


def _optimize(spec: ConvSpec, **kwargs):
    model = make_model(spec)
    shapes = {"x": spec.input_shape} if spec.dynamic_batch else None
    return model, *sconv_onnx.optimize(model, input_shapes=shapes, **kwargs)


@given(transpose_specs(structured=True))
@SETTINGS
def test_structured_transpose_layers_are_rewritten_and_exact(spec):
    trivial = (spec.out_channels // spec.group,) + spec.kernel
    model, new, report = _optimize(spec, select="all")
    (layer,) = report.plan.layers
    assert layer.op == "ConvTranspose"
    if spec.sizes == trivial:
        assert not layer.rewritten
        return
    assert layer.rewritten, layer.reason
    event(f"lowering {layer.chosen.lowering}")
    assert layer.chosen.payload.sizes != trivial
    assert relative_residual(make_weight(spec), layer.chosen.payload.sizes) < 1e-6
    counts = weight_elements(new)
    assert "W" not in counts
    (alpha,) = [name for name in counts if name.endswith("sconv_alpha")]
    assert counts[alpha] == spec.in_per_group * spec.group * math.prod(layer.chosen.payload.sizes)
    assert sum(counts.values()) == layer.params_after
    totals = report.plan.totals()  # per sample; the report counts the written model's nodes,
    batch = 1 if spec.dynamic_batch else spec.batch  # a dynamic batch at 1 (the MAC context)
    if totals["macs_after"] is not None:  # None where onnx infers no output shape
        assert report.after.macs == batch * totals["macs_after"]
    feeds = random_feeds(model, {"x": spec.input_shape}, seed=spec.seed)
    assert_within_rounding(model, new, feeds, layer_depth(model), layer.chosen.rounding_depth)
    assert new.ir_version == model.ir_version
    assert [o.name for o in new.graph.output] == ["z"]
    ops = [n.op_type for n in new.graph.node if n.op_type != "Constant"]
    assert ops[0] == "ConvTranspose" and ops.count("ConvTranspose") == 1
    # the node keeps its name; no Pad node is ever needed
    assert new.graph.node[[n.op_type for n in new.graph.node].index("ConvTranspose")].name == "conv"
    assert "Pad" not in ops


@given(transpose_specs(structured=False))
@SETTINGS
def test_random_transpose_weights_are_left_untouched(spec):
    model, new, report = _optimize(spec, select="all")
    (layer,) = report.plan.layers
    assert not layer.rewritten and layer.best is None
    assert new.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize(
    "attrs, expected",
    [
        # onnxruntime's own crops, read off its output for x=5, K=3, d=1 (see output_crops)
        ({"strides": 1, "auto_pad": "SAME_UPPER"}, (1, 1)),
        ({"strides": 2, "auto_pad": "SAME_UPPER"}, (0, 1)),
        ({"strides": 2, "auto_pad": "SAME_LOWER"}, (1, 0)),
        ({"strides": 1, "output_shape": 6}, (1, 0)),
        ({"strides": 3, "output_shape": 16}, (0, -1)),
        ({"strides": 2, "output_shape": 8}, (2, 1)),
        ({"strides": 2, "pads": (1, 0), "output_padding": 1}, (1, -1)),
    ],
)
def test_output_crops_match_onnxruntime(attrs, expected):
    stride = attrs["strides"]
    crops = output_crops(
        attrs.get("auto_pad", "NOTSET"), attrs.get("pads", ()),
        (attrs["output_padding"],) if "output_padding" in attrs else (),
        (attrs["output_shape"],) if "output_shape" in attrs else (),
        (3,), (stride,), (1,), (5,),
    )
    assert crops == expected
    # and onnxruntime returns exactly F[b : F - e] of the uncropped output
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 5)).astype(np.float32)
    w = rng.standard_normal((1, 1, 3)).astype(np.float32)
    node_attrs = {key: ([v] if isinstance(v, int) else list(v)) if key != "auto_pad" else v
                  for key, v in attrs.items()}
    full = _run_transpose(x, w, strides=[stride])
    got = _run_transpose(x, w, **node_attrs)
    padded = np.concatenate([full, np.zeros((1, 1, max(0, -expected[1])), np.float32)], axis=2)
    np.testing.assert_allclose(got, padded[:, :, expected[0]: padded.shape[2] - max(0, expected[1])],
                               rtol=1e-6)


def _run_transpose(x, w, **attrs):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_FOR_OPSET[17])
    return run(model, {"x": x})["y"]


def _dynamic_spatial(spec: ConvSpec) -> onnx.ModelProto:
    model = make_model(spec)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for i in range(2, len(dims)):
        dims[i].dim_param = f"s{i}"
    return model


def test_dynamic_size_rewrite_holds_for_every_size():
    spec = ConvSpec(op="ConvTranspose", in_per_group=4, out_channels=6, group=1, kernel=(4, 4),
                    spatial=(6, 6), strides=(2, 2), pads=(1, 1, 1, 1), sizes=(3, 2, 2))
    model = _dynamic_spatial(spec)
    new, report = sconv_onnx.optimize(model, select="all", input_shapes={"x": (1, 4, 6, 6)})
    assert report.plan.layers[0].rewritten
    for size in (3, 7, 10):
        feeds = random_feeds(model, {"x": (1, 4, size, size + 1)}, seed=size)
        (error,) = compare_outputs(run(model, feeds), run(new, feeds))
        assert error.max_rel < 1e-5


def test_same_with_stride_on_dynamic_size_is_skipped_with_reason():
    spec = ConvSpec(op="ConvTranspose", in_per_group=4, out_channels=6, group=1, kernel=(4, 4),
                    spatial=(6, 6), strides=(2, 2), auto_pad="SAME_UPPER", sizes=(3, 2, 2))
    plan = sconv_onnx.analyze(_dynamic_spatial(spec))
    (layer,) = plan.layers
    assert not layer.rewritten
    assert layer.reason.startswith("output size depends on a dynamic input size")


def test_decoder_upsampling_layer_is_rewritten_by_the_cost_model():
    """A U-Net-style 2x upsampling layer (64 -> 32 channels, 4x4 kernel, stride 2)."""
    spec = ConvSpec(op="ConvTranspose", in_per_group=64, out_channels=32, group=1, kernel=(4, 4),
                    spatial=(32, 32), strides=(2, 2), pads=(1, 1, 1, 1), sizes=(16, 2, 2))
    _, report = sconv_onnx.optimize(make_model(spec))
    (layer,) = report.plan.layers
    assert layer.rewritten, layer.reason
    assert layer.macs_after < 0.5 * layer.macs_before
    assert report.max_rel_error < 1e-5


def test_batchnorm_after_transpose_stays():
    """BN scales the output channels, the structured axis: it is left in place, and exact."""
    spec = ConvSpec(op="ConvTranspose", in_per_group=4, out_channels=6, group=1, kernel=(3, 3),
                    spatial=(6, 6), strides=(2, 2), sizes=(3, 2, 2), bias=False)
    model = make_model(spec)
    rng = np.random.default_rng(1)
    stats = {name: rng.uniform(0.5, 1.5, 6).astype(np.float32) for name in ("s", "b", "m", "v")}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in stats.items())
    model.graph.node[-1].output[0] = "t"
    model.graph.node.append(helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["z"]))
    new, report = sconv_onnx.optimize(model, select="all")
    assert report.plan.layers[0].rewritten
    assert [n.op_type for n in new.graph.node].count("BatchNormalization") == 1
    assert report.max_rel_error < 1e-5
