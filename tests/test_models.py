"""The benchmark model builders: valid ONNX, runnable, deterministic, and structured as claimed."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from sconv_onnx.models import build as build_cli
from sconv_onnx.models import demo_cnn
from sconv_onnx.models.build import MODELS

from sconv_onnx import chains, interleave
from sconv_onnx.structure import relative_residual, search

WEIGHTED = ("Conv", "Gemm")


def _run(model: onnx.ModelProto, module, size: str) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1.0, 1.0, module.input_shape(size)).astype(np.float32)
    (logits,) = session.run(["logits"], {module.INPUT_NAME: x})
    return logits


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weight of every Conv / Gemm node, keyed by node name."""
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {node.name: inits[node.input[1]] for node in model.graph.node
            if node.op_type in WEIGHTED}


@pytest.fixture(scope="module", params=sorted(MODELS))
def small(request):
    """``(module, model, claims)`` for each benchmark model at size small."""
    module = MODELS[request.param]
    model, claims = module.build_with_claims(size="small")
    return module, model, claims


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_small_model_is_valid_and_runs(name, batchnorm):
    module = MODELS[name]
    model = module.build(batchnorm=batchnorm, size="small")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    dims = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
    assert (inp.name, dims) == (module.INPUT_NAME, module.input_shape("small"))
    logits = _run(model, module, "small")
    assert logits.shape == (1, module.CLASSES)
    assert np.all(np.isfinite(logits))
    assert np.abs(logits).max() > 1e-3

    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    norms = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    if batchnorm:
        assert all(len(node.input) == 2 for node in convs)
        assert [node.name for node in norms] == [f"{node.name}.bn" for node in convs]
    else:
        assert all(len(node.input) == 3 for node in convs)
        assert not norms


def test_node_names_are_unique_and_claims_cover_every_weighted_node(small):
    _, model, claims = small
    names = [node.name for node in model.graph.node]
    assert len(set(names)) == len(names)
    assert all(names)
    assert set(claims) == {node.name for node in model.graph.node if node.op_type in WEIGHTED}
    assert any(sizes is not None for sizes in claims.values())


def test_claimed_structures_hold_and_plain_axes_are_plain(small):
    _, model, claims = small
    for name, weight in _weights(model).items():
        sizes = claims[name]
        if isinstance(sizes, interleave.Hypothesis):  # an interleaved product: found as one
            taps = math.prod(weight.shape[2:])
            claimed = sizes.params(*weight.shape[:2], taps)
            found = (chains.search(weight, 1e-5) if sizes.depthwise
                     else interleave.search(weight, 1e-5))
            assert found and found[0].params(*weight.shape[:2], taps) <= claimed, name
            continue
        claimed = tuple(weight.shape[1:]) if sizes is None else sizes
        assert len(claimed) == weight.ndim - 1, name
        if sizes is not None:
            assert relative_residual(weight, sizes) < 1e-5, name
        for found in search(weight, 1e-4):
            for axis, (want, got) in enumerate(zip(claimed, found.sizes), start=1):
                if want == weight.shape[axis]:
                    assert got == want, f"{name}: {found.sizes} though {claimed} was claimed"


def test_claims_follow_each_models_rule():
    r18a = MODELS["struct_resnet18_a"].claimed_structures("small")
    assert r18a["conv1"] is None and r18a["fc"] is None
    assert r18a["layer1.0.conv1"] == (8, 2, 2)
    assert r18a["layer3.1.conv2"] == (32, 2, 2)
    assert r18a["layer2.0.downsample"] is None

    r18b = MODELS["struct_resnet18_b"].claimed_structures("small")
    assert r18b["conv1"] is None
    assert r18b["layer2.0.conv1"] == (4, 2, 2)  # input 8 channels
    assert r18b["layer2.0.conv2"] == (8, 2, 2)
    assert r18b["layer3.0.downsample"] == (8, 1, 1)

    r50 = MODELS["struct_resnet50_a"].claimed_structures("small")
    assert sum(name.endswith(".conv2") for name in r50) == 16
    assert r50["layer4.2.conv2"] == (64, 2, 2)
    assert r50["layer1.0.conv1"] is None and r50["layer1.0.downsample"] is None

    mnv2 = MODELS["struct_mobilenetv2"].claimed_structures("small")
    assert mnv2["features.0"] is None and mnv2["classifier"] is None
    assert mnv2["features.1.depthwise"] == (1, 2, 2)
    assert "features.1.expand" not in mnv2  # t = 1
    assert mnv2["features.2.expand"] == (2, 1, 1)
    assert mnv2["features.18"] == (20, 1, 1)  # 40 -> 160

    audio = MODELS["struct_audio1d"].claimed_structures("small")
    assert audio["conv1"] is None and audio["layer2.0.downsample"] is None
    assert audio["layer1.0.conv1"] == (4, 2)
    assert audio["layer4.1.conv2"] == (32, 2)

    igc = MODELS["igc_resnet18"].claimed_structures("full")
    assert igc["conv1"] is None and igc["layer2.0.downsample"] is None
    assert igc["layer1.0.conv1"] == interleave.Hypothesis(4, 2, 8)  # 64 -> 64
    assert igc["layer4.0.conv1"] == interleave.Hypothesis(4, 2, 64)  # 256 -> 512
    strided = MODELS["igc_resnet18_strided"].claimed_structures("full")["layer3.1.conv2"]
    assert strided.strided and strided.out_order == interleave.strided_order(256, 2)
    chain = MODELS["igcv2_resnet18"].claimed_structures("full")["layer2.0.conv1"]  # 64 -> 128
    assert chain == interleave.Hypothesis(2, 2, 16, depthwise=True)


@pytest.mark.parametrize("name", ["struct_mobilenetv2", "struct_audio1d"])
def test_small_has_the_full_topology(name):
    module = MODELS[name]

    def layout(size):
        return [(node.op_type, node.name) for node in module.build(size=size).graph.node]

    assert layout("small") == layout("full")


def test_mobilenetv2_residuals():
    model = MODELS["struct_mobilenetv2"].build(size="small")
    adds = [node.name for node in model.graph.node if node.op_type == "Add"]
    assert len(adds) == 10  # blocks with stride 1 and equal widths
    clips = [node for node in model.graph.node if node.op_type == "Clip"]
    assert all(node.input[1:] == ["relu6.min", "relu6.max"] for node in clips)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_bytes(name):
    module = MODELS[name]
    first = module.build(seed=3, noise=0.01, batchnorm=True, size="small").SerializeToString()
    again = module.build(seed=3, noise=0.01, batchnorm=True, size="small").SerializeToString()
    other = module.build(seed=4, noise=0.01, batchnorm=True, size="small").SerializeToString()
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", sorted(MODELS))
def test_noise_makes_structure_approximate(name):
    model, claims = MODELS[name].build_with_claims(noise=0.01, size="small")
    residuals = [chains.factor(weight, claims[layer]).residual
                 if isinstance(claims[layer], interleave.Hypothesis)
                 else relative_residual(weight, claims[layer])
                 for layer, weight in _weights(model).items() if claims[layer] is not None]
    assert residuals
    assert all(1e-4 < r < 0.02 for r in residuals)


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="size"):
        MODELS["struct_resnet18_a"].build(size="tiny")


def _macs(model: onnx.ModelProto) -> int:
    """Multiply-adds of the Conv and Gemm nodes at the model's static shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*inferred.graph.value_info, *inferred.graph.output]}
    weights = _weights(model)
    total = 0
    for node in model.graph.node:
        if node.op_type in WEIGHTED:
            out = dims[node.output[0]]
            total += math.prod(out) * math.prod(weights[node.name].shape[1:])
    return total


def test_full_resnet18_runs_with_o1_activations_and_has_resnet18_macs():
    module = MODELS["struct_resnet18_a"]
    model = module.build()
    assert 1.7e9 < _macs(model) < 1.9e9  # torchvision resnet18: 1.82 GMACs
    logits = _run(model, module, "full")
    assert logits.shape == (1, 1000)
    assert np.all(np.isfinite(logits))
    assert 0.05 < logits.std() < 50


def test_build_command_writes_models(tmp_path):
    out = tmp_path / "audio.onnx"
    assert build_cli.main(["struct_audio1d", str(out), "--size", "small", "--batchnorm",
                           "--noise", "0.01", "--seed", "2"]) == 0
    expected = MODELS["struct_audio1d"].build(seed=2, noise=0.01, batchnorm=True, size="small")
    assert onnx.load(str(out)).SerializeToString() == expected.SerializeToString()

    demo = tmp_path / "demo.onnx"
    assert build_cli.main(["demo_cnn", str(demo)]) == 0
    assert onnx.load(str(demo)).SerializeToString() == demo_cnn.build().SerializeToString()

    with pytest.raises(SystemExit):
        build_cli.main(["demo_cnn", str(demo), "--batchnorm"])
