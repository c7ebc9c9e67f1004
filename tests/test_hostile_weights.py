"""Hostile and careless weights: what the model holds never yields a wrong model or a crash.

Each case is a layer the pass must leave alone with a reason (NaN or Inf,
a graph input's default, no elements, statistics per activation, a search
too large), an external data entry that does not match its tensor (bad
input, exit 2), or a few bytes asking for minutes of work.  Healthy layers
beside them are still rewritten.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

import sconv_onnx
from sconv_onnx import structure
from sconv_onnx.errors import InputError
from sconv_onnx.modelio import load_model

X_SHAPE = (1, 4, 8, 8)
#: A conv weight exactly structured at ``(2, 2, 2)``: ``select="all"`` rewrites it.
SIZES = (2, 2, 2)


def _structured(seed: int = 0, shape=(4, 4, 3, 3), sizes=SIZES) -> np.ndarray:
    alpha = np.random.default_rng(seed).standard_normal(shape[:1] + sizes)
    return structure.expand(alpha, shape).astype(np.float32)


def _model(nodes, initializers, outputs: dict, inputs=(), opset: int = 17, ir: int = 8,
           x_shape=X_SHAPE) -> onnx.ModelProto:
    """``x`` of ``x_shape`` and ``inputs`` in, ``outputs`` (name: rank) out, checked."""
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)
         for name, rank in outputs.items()],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model)
    return model


def _conv(name: str, weight_name: str, bias_name: str | None = None, x: str = "x") -> onnx.NodeProto:
    inputs = [x, weight_name] + ([bias_name] if bias_name else [])
    return helper.make_node("Conv", inputs, [name], name=name)


def _layers(plan) -> dict:
    return {layer.node: layer for layer in plan.layers}


# --- 1. NaN and Inf ----------------------------------------------------------------------------


@pytest.mark.parametrize("where, value", [("weight", np.inf), ("weight", np.nan), ("bias", np.nan)])
def test_non_finite_layer_is_left_alone_and_the_healthy_one_rewritten(where, value):
    weight, bias = _structured(1), np.zeros(4, np.float32)
    (weight if where == "weight" else bias)[(0, 0, 0, 0) if where == "weight" else 1] = value
    # an infinite weight gives equal infinities in both models; a NaN output never verifies,
    # so that layer's output is read by nothing
    outputs = {"good": 4, "bad": 4} if np.isinf(value) else {"good": 4}
    model = _model([_conv("good", "w_good"), _conv("bad", "w_bad", "b_bad")],
                   [numpy_helper.from_array(_structured(0), "w_good"),
                    numpy_helper.from_array(weight, "w_bad"), numpy_helper.from_array(bias, "b_bad")],
                   outputs)
    new, report = sconv_onnx.optimize(model, select="all")
    assert report.verified
    layers = _layers(report.plan)
    assert layers["good"].rewritten
    bad = layers["bad"]
    assert not bad.rewritten and bad.best is None and bad.decided_by == "skipped"
    assert bad.reason == f"{where} holds NaN or Inf"
    assert "w_bad" in {init.name for init in new.graph.initializer}


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_search_and_residual_refuse_non_finite_weights(value):
    weight = _structured().astype(np.float64)
    weight[1, 2, 0, 1] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        structure.search(weight, 1e-4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        structure.relative_residual(weight, SIZES)
    # huge and tiny finite weights: their squares would overflow or vanish, the residual not
    for scale in (1e300, 1e-300):
        extreme = _structured().astype(np.float64) * scale
        assert structure.search(extreme, 1e-6)[0].sizes == SIZES
        assert structure.relative_residual(extreme, (1, 1, 1)) > 0.01


@pytest.mark.parametrize("stat, value", [("scale", np.inf), ("mean", np.nan), ("var", -1.0)])
def test_batchnorm_whose_fold_is_not_finite_stays(stat, value):
    stats = {"scale": np.ones(4), "bias": np.zeros(4), "mean": np.zeros(4), "var": np.ones(4)}
    stats[stat] = stats[stat].copy()
    stats[stat][2] = value  # var -1: sqrt(var + epsilon) is NaN
    bn = helper.make_node("BatchNormalization", ["z", *(f"bn_{k}" for k in stats)], ["y"], name="bn")
    model = _model([_conv("z", "w"), bn],
                   [numpy_helper.from_array(_structured(), "w")]
                   + [numpy_helper.from_array(v.astype(np.float32), f"bn_{k}") for k, v in stats.items()],
                   {"y": 4})
    (layer,) = sconv_onnx.analyze(model, select="all").layers
    assert layer.rewritten and layer.folded == ()  # the conv alone, on its own weight


# --- 2. initializers a graph input may override ------------------------------------------------


def test_overridable_initializer_is_no_constant_and_stays_an_input(tmp_path, capsys):
    """``w_over`` and the BN scale are graph inputs with defaults: the first conv is kept,
    the BN is not folded into the second, both inputs survive the rewrite."""
    stats = {"bn_scale": np.full(4, 2.0), "bn_bias": np.zeros(4), "bn_mean": np.zeros(4),
             "bn_var": np.ones(4)}
    nodes = [_conv("over", "w_over"), _conv("z", "w_good"),
             helper.make_node("BatchNormalization", ["z", *stats], ["good"], name="bn")]
    inits = [numpy_helper.from_array(_structured(1), "w_over"),
             numpy_helper.from_array(_structured(0), "w_good")]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()]
    overridable = [helper.make_tensor_value_info("w_over", TensorProto.FLOAT, [4, 4, 3, 3]),
                   helper.make_tensor_value_info("bn_scale", TensorProto.FLOAT, [4])]
    model = _model(nodes, inits, {"over": 4, "good": 4}, inputs=overridable)
    layers = _layers(sconv_onnx.analyze(model, select="all"))
    assert not layers["over"].rewritten
    assert layers["over"].reason == "weight is a graph input (overridable initializer)"
    assert layers["z"].rewritten and layers["z"].folded == ()

    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    code, _, err = run_cli(capsys, "optimize", source, out, "--select", "all")
    assert code == 0, err
    written = onnx.load(str(out))
    assert [inp.name for inp in written.graph.input] == ["x", "w_over", "bn_scale"]
    assert {"w_over", "bn_scale"} <= {init.name for init in written.graph.initializer}
    # and they still override: both models agree on other values
    rng = np.random.default_rng(2)
    feeds = {"x": rng.uniform(-1, 1, X_SHAPE).astype(np.float32),
             "w_over": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
             "bn_scale": rng.uniform(0.5, 2, 4).astype(np.float32)}
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
            for m in (model, written)]
    for y0, y1 in zip(*runs):
        np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * float(np.abs(y0).max()))


# --- 3. weights without elements ---------------------------------------------------------------


@pytest.mark.parametrize("op, shape", [("Conv", (0, 4, 3, 3)), ("Conv", (4, 4, 0, 3)),
                                       ("ConvTranspose", (4, 0, 3, 3))])
def test_weight_without_elements_is_skipped_and_never_an_internal_error(tmp_path, capsys, op, shape):
    node = helper.make_node(op, ["x", "w"], ["y"], name="empty")
    model = _model([node], [numpy_helper.from_array(np.zeros(shape, np.float32), "w")], {"y": 4})
    (layer,) = sconv_onnx.analyze(model).layers
    assert layer.reason == f"weight of shape {'x'.join(map(str, shape))} has no elements"
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))
    code, _, err = run_cli(capsys, "optimize", source, tmp_path / "out.onnx")
    assert code in (0, 2), err
    if code == 2:  # onnxruntime refuses a zero kernel dim
        assert "onnxruntime cannot run the input model" in one_line_error(err)


# --- 4. BatchNormalization per activation (opsets 7-8, spatial=0) -------------------------------


@pytest.mark.parametrize("opset", [7, 8])
def test_batchnorm_with_statistics_per_activation_is_not_folded(tmp_path, capsys, opset):
    rng = np.random.default_rng(3)
    per_activation = (4, 6, 6)  # the conv's output (C, H, W)
    stats = {"s": rng.uniform(0.5, 2, per_activation), "b": rng.standard_normal(per_activation),
             "m": rng.standard_normal(per_activation), "v": rng.uniform(0.5, 2, per_activation)}
    bn = helper.make_node("BatchNormalization", ["z", *stats], ["y"], name="bn", spatial=0)
    model = _model([_conv("z", "w"), bn],
                   [numpy_helper.from_array(_structured(), "w")]
                   + [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()],
                   {"y": 4}, opset=opset, ir=4)
    (layer,) = sconv_onnx.analyze(model, select="all").layers
    assert layer.rewritten and layer.folded == ()
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))
    code, _, err = run_cli(capsys, "optimize", source, tmp_path / "out.onnx", "--select", "all")
    assert code == 0, err


# --- 5. external data that does not match its tensor -------------------------------------------


def _external_model(tmp_path, length: int | None, stored: int):
    """A conv model whose weight ``w`` lies in ``w.bin``: the entry's length is the
    tensor's bytes plus ``length`` (None: no length), the file's size its bytes plus
    ``stored``."""
    model = _model([_conv("y", "w")], [numpy_helper.from_array(_structured(), "w")], {"y": 4})
    tensor = model.graph.initializer[0]
    raw = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": "w.bin", "offset": "0"}
    if length is not None:
        entries["length"] = str(len(raw) + length)
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "w.bin").write_bytes(raw + b"\0" * stored if stored >= 0 else raw[:stored])
    source = tmp_path / "m.onnx"
    source.write_bytes(model.SerializeToString())
    return source


def _assert_bad_external_data(capsys, source, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_model(source)
    code, _, err = run_cli(capsys, "analyze", source)
    assert code == 2 and message in one_line_error(err) and "'w'" in err


@pytest.mark.parametrize("length, message", [
    (-8, "has external data of 568 bytes, its dims 4x4x3x3 need 576"),
    (4, "has external data of 580 bytes, its dims 4x4x3x3 need 576"),
])
def test_external_data_length_must_be_the_tensors(tmp_path, capsys, length, message):
    _assert_bad_external_data(capsys, _external_model(tmp_path, length, max(length, 0)), message)


def test_external_data_without_length_must_end_with_the_tensor(tmp_path, capsys):
    """onnx then reads to the end of the file: a longer file is as bad as a shorter one."""
    _assert_bad_external_data(capsys, _external_model(tmp_path, None, 4),
                              "has external data with no length, read to the end of")
    _assert_bad_external_data(capsys, _external_model(tmp_path, None, -4), "is truncated")


# --- 6. a few bytes asking for minutes of work -------------------------------------------------


def _fill_conv(name: str, shape, value: float | None) -> list[onnx.NodeProto]:
    """A Conv whose weight is ``ConstantOfShape(shape)`` (zeros, or ``value``)."""
    attrs = {} if value is None else {"value": numpy_helper.from_array(np.array([value], np.float32))}
    shape_const = helper.make_node("Constant", [], [f"{name}_shape"],
                                   value=numpy_helper.from_array(np.array(shape, np.int64)))
    fill = helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_w"], **attrs)
    return [shape_const, fill, _conv(name, f"{name}_w")]


def _cli(*argv, timeout: float) -> subprocess.CompletedProcess:
    """``sconv-onnx ARGV`` in a fresh process that cannot outlive ``timeout`` seconds."""
    return subprocess.run([sys.executable, "-m", "sconv_onnx", *map(str, argv)],
                          check=False, capture_output=True, text=True, timeout=timeout)


def test_a_tiny_model_asking_for_a_huge_search_is_answered_in_seconds(tmp_path):
    """A zero 128x128 kernel from ConstantOfShape (under 200 bytes) ran for minutes."""
    model = _model(_fill_conv("y", [1, 1, 128, 128], None), [], {"y": 4}, x_shape=(1, 1, 128, 128))
    source = tmp_path / "tiny.onnx"
    onnx.save(model, str(source))
    assert source.stat().st_size < 250
    done = _cli("optimize", source, tmp_path / "out.onnx", timeout=30)
    assert done.returncode in (0, 2), done.stderr
    start = time.perf_counter()
    (layer,) = sconv_onnx.analyze(model).layers
    assert time.perf_counter() - start < 2.0
    assert layer.reason.startswith("kernel too large: 128x128 = 16384 elements")


def test_caps_name_why_a_search_is_not_run(tmp_path):
    """Each layer is one cap: the reasons come back in seconds, not minutes."""
    rng = np.random.default_rng(4)
    nodes = (_fill_conv("ones_128", [1, 4, 128, 128], 1.0)
             + [_conv("random_64", "w64"), _conv("zero_3", "w0"), _conv("good", "w_good"),
                helper.make_node("Flatten", ["x"], ["flat"]),
                helper.make_node("Gemm", ["flat", "w_wide"], ["wide"], name="wide", transB=1)])
    # 131072 input features: the channel screen alone is about 2e11 flops
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4, 64, 64)).astype(np.float32), "w64"),
             numpy_helper.from_array(np.zeros((4, 4, 3, 3), np.float32), "w0"),
             numpy_helper.from_array(_structured(), "w_good"),
             numpy_helper.from_array(rng.standard_normal((2, 4 * 256 * 128)).astype(np.float32),
                                     "w_wide")]
    model = _model(nodes, inits, {"ones_128": 4, "random_64": 4, "zero_3": 4, "good": 4, "wide": 2},
                   x_shape=(1, 4, 256, 128))
    source = tmp_path / "caps.onnx"
    onnx.save(model, str(source))
    done = _cli("analyze", source, "--json", "--select", "all", timeout=60)
    assert done.returncode == 0, done.stderr
    reasons = {layer["node"]: layer["reason"] for layer in json.loads(done.stdout)["layers"]}
    assert reasons["ones_128"].startswith("kernel too large: 128x128 = 16384 elements")
    assert reasons["random_64"].startswith("kernel too large: 64x64 = 4096 elements")
    assert reasons["zero_3"].startswith("all-zero weight")
    assert reasons["wide"].startswith("search too large: about ")
    assert reasons["good"].startswith("select=all")


@pytest.mark.parametrize("shape, sizes", [((8, 8, 11, 11), (4, 5, 5)), ((8, 8, 7, 7, 7), (4, 3, 3, 3)),
                                          ((64, 512, 3, 3), (256, 2, 2))])
def test_kernels_in_use_stay_below_the_caps(shape, sizes):
    assert structure.search_problem(shape) is None
    assert structure.search_flops(shape) < structure.MAX_SEARCH_FLOPS
    start = time.perf_counter()
    best = structure.search(_structured(5, shape, sizes), 1e-4)[0]
    assert best.sizes == sizes and time.perf_counter() - start < 2.0


def test_constant_nodes_are_read_as_they_are():
    """A ``Constant`` in any number form is a constant; a ``ConstantOfShape`` asking for
    more than the fold cap (a few bytes of shape) is not made."""
    weight = structure.expand(np.random.default_rng(6).standard_normal((3, 4)), (3, 8))
    side = 4097  # 4097^2 elements: just above 2^24
    nodes = [helper.make_node("Constant", [], ["flat"], value_floats=weight.T.ravel().tolist()),
             helper.make_node("Constant", [], ["shape"], value_ints=[8, 3]),
             helper.make_node("Reshape", ["flat", "shape"], ["w"]),
             helper.make_node("MatMul", ["v", "w"], ["mm"], name="mm"),
             *_fill_conv("huge", [1, 1, side, side], 1.0)]
    vector = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 8])
    model = _model(nodes, [], {"mm": 2, "huge": 4}, inputs=[vector], x_shape=(1, 1, side, side))
    layers = _layers(sconv_onnx.analyze(model, select="all"))
    assert layers["mm"].rewritten
    assert layers["huge"].reason == (f"weight is a ConstantOfShape of {side * side} elements "
                                     f"(at most {2**24} are folded)")
