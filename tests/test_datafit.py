"""Data-aware alphas: patches match onnxruntime's conv, and fitting on the data lowers the output error."""

import numpy as np
import pytest
from conv_models import IR_FOR_OPSET
from onnx import TensorProto, helper, numpy_helper

from sconv_onnx.datafit import (
    LayerSample,
    basis_gram,
    conv_patches,
    sample_conv_patches,
    sample_rows,
)
from sconv_onnx.runtime import run
from sconv_onnx.structure import box_basis, expand, fit_alpha

GEOMETRIES = [
    # channels, group, kernel, strides, dilations, pads, filters
    (4, 1, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 6),
    (6, 2, (3, 2), (2, 1), (1, 2), (0, 1, 2, 0), 4),
    (3, 1, (3,), (2,), (1,), (1, 0), 5),
    (2, 1, (2, 2, 2), (1, 2, 1), (1, 1, 1), (1, 0, 0, 0, 1, 1), 3),
]


def _conv(x, weight, strides, dilations, pads, group):
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(strides), dilations=list(dilations),
                            pads=list(pads), group=group)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_FOR_OPSET[17])
    return run(model, {"x": x})["y"].astype(np.float64)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patches_times_weight_is_onnxruntimes_conv(geometry):
    channels, group, kernel, strides, dilations, pads, filters = geometry
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, channels) + (7,) * len(kernel)).astype(np.float32)
    weight = rng.standard_normal((filters, channels // group) + kernel)
    patches = conv_patches(x, kernel, strides, dilations, pads, group)  # (g, P, D)
    ours = np.einsum("gpd,god->gop", patches, weight.reshape(group, filters // group, -1))
    theirs = _conv(x, weight, strides, dilations, pads, group)
    theirs = theirs.reshape(2, group, filters // group, -1).transpose(1, 2, 0, 3).reshape(ours.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_basis_gram_is_the_dense_basis_gram():
    dense = np.kron(np.kron(box_basis(4, 2), box_basis(3, 2)), box_basis(3, 1))
    np.testing.assert_allclose(basis_gram((4, 3, 3), (2, 2, 1)), dense.T @ dense)


def test_white_inputs_give_the_weight_space_alpha():
    """Patches with identity second moments: the data and the weights agree."""
    weight = np.random.default_rng(1).standard_normal((6, 4, 3, 3))
    patches = (np.sqrt(36) * np.eye(36))[None]  # P^T P / m = I
    alpha, error = LayerSample(weight, patches).fit((2, 2, 2))
    np.testing.assert_allclose(alpha, fit_alpha(weight, (2, 2, 2)), atol=1e-6)
    assert error == pytest.approx(LayerSample(weight, patches).weight_space_error((2, 2, 2)), rel=1e-6)


def _correlated_images(rng, count=4, channels=8, size=10):
    """Inputs correlated across channels (a low-rank mix) and space (smooth, like images)."""
    mix = rng.standard_normal((channels, 2))
    smooth = np.cumsum(np.cumsum(rng.standard_normal((count, 2, size, size)), axis=2), axis=3)
    x = np.einsum("cm,nmhw->nchw", mix, smooth)
    return (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)


def test_data_aware_alpha_lowers_the_output_error_on_correlated_inputs():
    """The weight-space alpha spends accuracy on directions the data never takes."""
    rng = np.random.default_rng(2)
    x = _correlated_images(rng)
    weight = rng.standard_normal((6, 8, 3, 3))
    sizes = (4, 2, 2)
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1)
    layer = LayerSample(weight, sample_conv_patches(x, *geometry))
    alpha, error = layer.fit(sizes)
    weight_error = layer.weight_space_error(sizes)
    assert error < 0.5 * weight_error
    # the errors are those onnxruntime's outputs show
    reference = _conv(x, weight, (1, 1), (1, 1), (1, 1, 1, 1), 1)
    for approx, predicted in ((expand(fit_alpha(weight, sizes), weight.shape), weight_error),
                              (expand(alpha, weight.shape), error)):
        output = _conv(x, approx, (1, 1), (1, 1), (1, 1, 1, 1), 1)
        measured = np.linalg.norm(output - reference) / np.linalg.norm(reference)
        assert measured == pytest.approx(predicted, rel=1e-3)
    # and the gain holds on images the fit never saw
    fresh = _correlated_images(np.random.default_rng(2), count=2)  # same mix, new images
    reference = _conv(fresh, weight, (1, 1), (1, 1), (1, 1, 1, 1), 1)
    errors = [np.linalg.norm(_conv(fresh, expand(a, weight.shape), (1, 1), (1, 1), (1, 1, 1, 1), 1)
                             - reference) for a in (fit_alpha(weight, sizes), alpha)]
    assert errors[1] < 0.7 * errors[0]


def test_few_patches_shrink_toward_the_weight_space_alpha():
    """Fewer patches than unknowns: the fit cannot overfit them (it stays near alpha_w)."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((5, 16, 3, 3))
    patches = rng.standard_normal((1, 20, 144))  # 20 patches, 64 unknowns per filter
    alpha, _ = LayerSample(weight, patches).fit((16, 2, 2))
    fresh = LayerSample(weight, rng.standard_normal((1, 4000, 144)))
    assert fresh.error((16, 2, 2), alpha) < 1.1 * fresh.weight_space_error((16, 2, 2))
    unshrunk, in_sample = LayerSample(weight, patches).fit((16, 2, 2), shrink=0.0)
    assert in_sample < 1e-3 and fresh.error((16, 2, 2), unshrunk) > 1.2 * fresh.weight_space_error((16, 2, 2))


def test_rows_of_a_fully_connected_layer():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 12))
    rows = sample_rows(x)
    np.testing.assert_allclose(rows[0], x.reshape(-1, 12))
    assert sample_rows(x, max_positions=7).shape == (1, 7, 12)
    weight = rng.standard_normal((7, 12))
    alpha, error = LayerSample(weight, rows).fit((6,))
    assert alpha.shape == (7, 6)
    flat = rows[0]
    measured = np.linalg.norm(flat @ (weight - expand(alpha, weight.shape)).T) / np.linalg.norm(flat @ weight.T)
    assert error == pytest.approx(measured, rel=1e-6)
