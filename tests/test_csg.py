"""Shared slice generators across layers (sconv_onnx.csg, issue 14): detection.

Generated weights of each layout the paper uses must be found with their
generator's size and exactly the layers it made; random weights, and
generated ones off by more than the tolerance, must not.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sconv_onnx.models import csg_resnet, resnet

import sconv_onnx
from sconv_onnx import csg

#: ResNet-18's 3x3 convs: the first of each block (the official layout generates these) ...
FIRSTS = [(64, 64, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3),
          (256, 128, 3, 3), (256, 256, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3)]
#: ... and the second.
SECONDS = [(64, 64, 3, 3), (64, 64, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3),
           (256, 256, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3)]


def _float32(weights: dict) -> dict:
    return {key: weight.astype(np.float32) for key, weight in weights.items()}


def _found_alone(rng, shapes, size: int, code_size: int, affine: bool = False) -> csg.Sharing:
    """The one sharing found among generated weights of ``shapes`` (float32), checked."""
    made = csg.generated(rng, shapes, size, code_size, affine=affine)
    weights = _float32({f"conv{i}": w for i, w in enumerate(made)})
    [sharing] = csg.find(weights, 1e-4)
    _check(sharing, weights, 1e-4)
    return sharing


def _check(sharing: csg.Sharing, weights: dict, tol: float) -> None:
    """The generator and codes give back every member's weight within ``tol``."""
    for key, codes, residual in zip(sharing.keys, sharing.codes, sharing.residuals):
        weight = weights[key].astype(np.float64)
        rebuilt = (codes @ sharing.basis.T).reshape(weight.shape)
        assert np.linalg.norm(rebuilt - weight) <= tol * np.linalg.norm(weight)
        assert residual <= tol


def test_the_official_resnet18_layout_is_found_among_plain_convs():
    """s = 16, d = 128, the first 3x3 of each block generated; the second ones random."""
    rng = np.random.default_rng(0)
    weights = {f"first{i}": w for i, w in enumerate(csg.generated(rng, FIRSTS, 16, 128))}
    weights |= {f"second{i}": rng.standard_normal(shape) for i, shape in enumerate(SECONDS)}
    weights = _float32(weights)
    [sharing] = csg.find(weights, 1e-4)
    assert sharing.keys == tuple(f"first{i}" for i in range(8))
    assert (sharing.slice_size, sharing.code_size) == (16, 128)
    assert sharing.params == 128 * (16 * 16 * 9 + sum(o * c // 256 for o, c, *_ in FIRSTS))
    _check(sharing, weights, 1e-4)


def test_every_block_conv_generated_and_an_affine_generator():
    rng = np.random.default_rng(1)
    shapes = [(32, 32, 3, 3)] * 4 + [(64, 32, 3, 3)] + [(64, 64, 3, 3)] * 3
    sharing = _found_alone(rng, shapes, 8, 24)
    assert len(sharing.keys) == 8 and (sharing.slice_size, sharing.code_size) == (8, 24)
    affine = _found_alone(rng, shapes, 8, 24, affine=True)
    assert affine.code_size == 25  # the offset is one more direction


def test_cifar_slices_of_twelve_where_they_divide_the_widths():
    """Every layer here has fewer chunks than twice the code size: found together."""
    rng = np.random.default_rng(2)
    shapes = [(48, 48, 3, 3)] * 3 + [(96, 48, 3, 3)] + [(96, 96, 3, 3)] * 2
    sharing = _found_alone(rng, shapes, 12, 72)
    assert (sharing.slice_size, sharing.code_size, len(sharing.keys)) == (12, 72, 6)
    # widths that 12 does not divide have no complete slice (a masked fit, not built)
    assert csg.slice_length((64, 32, 3, 3), 12) is None


def test_random_weights_and_lone_or_noisy_generated_layers_share_nothing():
    rng = np.random.default_rng(3)
    shapes = [(32, 32, 3, 3)] * 3 + [(64, 64, 3, 3)] * 2
    assert csg.find(_float32({f"r{i}": rng.standard_normal(s) for i, s in enumerate(shapes)}),
                    1e-4) == []
    lone = csg.generated(rng, [(64, 64, 3, 3)], 8, 24)[0]
    assert csg.find({"only": lone.astype(np.float32)}, 1e-4) == []  # one layer: nothing shared
    made = csg.generated(rng, shapes, 8, 24)
    noisy = {f"g{i}": w + 1e-2 * np.std(w) * rng.standard_normal(w.shape)
             for i, w in enumerate(made)}
    assert csg.find(noisy, 1e-4) == []  # 1 % off the generator: outside the tolerance
    [loose] = csg.find(noisy, 0.05)
    assert len(loose.keys) == 5


def test_chunks_are_consecutive_flat_slices_not_tiles():
    weight = np.arange(2 * 8 * 3 * 3 * 2, dtype=np.float64).reshape(4, 8, 3, 3)
    rows = csg.chunks(weight, 2)
    assert rows.shape == (8, 36)
    assert np.array_equal(rows[1], weight.ravel()[36:72])
    with pytest.raises(ValueError):
        csg.chunks(weight, 3)


@pytest.fixture(scope="module")
def official():
    """ResNet-18 with the official layout: the first 3x3 of each block generated."""
    model = csg_resnet.build("firsts")
    return model, {node.name for node in csg_resnet.generated_convs(model, "firsts")}


def _float_weights(model) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer if init.data_type == 1)


def test_the_family_stores_the_generator_and_codes_and_computes_the_same(official, tmp_path):
    """With the family alone: every generated conv rebuilt from one generator, the model
    within 5 % of the generator and codes (plus the layers left as they were), the same
    outputs, and the rebuild folded by onnxruntime (no MatMul left in its session)."""
    model, generated = official
    new, report = sconv_onnx.optimize(model, families=["csg"])
    rewritten = {layer.node for layer in report.plan.rewritten}
    assert rewritten == generated and {layer.family for layer in report.plan.rewritten} == {"csg"}
    sharing = report.plan.rewritten[0].chosen.payload
    kept = sum(layer.params_before for layer in report.plan.layers if not layer.rewritten)
    others = sum(int(np.prod(i.dims)) for i in model.graph.initializer) - sum(
        layer.params_before for layer in report.plan.layers)  # BatchNorm-free: the fc bias etc.
    biases = sum(layer.params_before - int(np.prod(layer.weight_shape))
                 for layer in report.plan.rewritten)
    assert _float_weights(new) <= 1.05 * (sharing.params + biases) + kept + others
    assert report.verified and report.max_rel_error < 1e-5
    assert report.after.macs == report.before.macs  # the rebuild is folded: no MAC
    path = tmp_path / "csg.onnx"
    onnx.save(new, str(path))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert "MatMul" not in {node.op_type for node in folded.graph.node}


def test_by_default_other_families_take_the_layers_they_speed_up(official):
    """Generated convs with ``C = 256`` or more are low rank as whole kernels: the igc family
    rewrites them for speed, and the generator stores the rest."""
    model, generated = official
    _, report = sconv_onnx.optimize(model)
    families = {layer.node: layer.family for layer in report.plan.rewritten}
    assert set(families) == generated
    assert "csg" in families.values() and "igc" in families.values()
    assert report.verified and report.max_rel_error < 1e-5


def test_random_convs_are_left_to_the_other_families():
    model, _ = resnet.build("plain", (1, 1, 1, 1), False, resnet.plain, size="small")
    _, report = sconv_onnx.optimize(model, families=["csg"])
    assert report.plan.rewritten == []


def test_two_generators_of_one_kernel_shape_are_both_found():
    rng = np.random.default_rng(4)
    first = csg.generated(rng, [(40, 40, 3, 3)] * 3, 8, 16)
    second = csg.generated(rng, [(64, 64, 3, 3)] * 4, 16, 32)
    weights = _float32({**{f"a{i}": w for i, w in enumerate(first)},
                        **{f"b{i}": w for i, w in enumerate(second)}})
    found = csg.find(weights, 1e-4)
    assert sorted(sharing.keys for sharing in found) == [
        ("a0", "a1", "a2"), ("b0", "b1", "b2", "b3")]
    for sharing in found:
        _check(sharing, weights, 1e-4)


def _generated_chain(rng) -> onnx.ModelProto:
    """Four 64 -> 64 3x3 convs (ReLU between) on 1x64x8x8, made by one generator (s = 8,
    d = 24)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = csg.generated(rng, [(64, 64, 3, 3)] * 4, 8, 24)
    inits, nodes, x = [], [], "x"
    for index, weight in enumerate(weights):
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
        nodes.append(helper.make_node("Conv", [x, f"w{index}"], [f"c{index}"], name=f"conv{index}",
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        x = f"r{index}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_mac_budget_moves_generated_layers_before_the_generator_stores_the_rest():
    """The size rewrite is decided last: a MAC budget still takes the layers it needs, and
    the generator stores the others (it never freezes a layer at its full MACs)."""
    rng = np.random.default_rng(5)
    model = _generated_chain(rng)
    _, plain = sconv_onnx.optimize(model)
    assert {layer.family for layer in plain.plan.rewritten} == {"csg"}
    assert len(plain.plan.rewritten) == 4 and plain.verified
    calib = {"x": rng.standard_normal((4, 64, 8, 8)).astype(np.float32)}
    _, budget = sconv_onnx.optimize(model, target_macs=0.5, calib_data=calib, min_agreement=0,
                                    max_error=10.0)
    moved = [layer for layer in budget.plan.rewritten if layer.decided_by == "budget"]
    assert moved and budget.after.macs <= 0.5 * budget.before.macs
    stored = [layer for layer in budget.plan.rewritten if layer.family == "csg"]
    assert len(moved) + len(stored) == 4
