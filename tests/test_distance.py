"""``analyze --distance SPEC`` (sconv_onnx.distance, issue 15): each layer's residual to one
box structure named for the whole model."""

import json
from fractions import Fraction

import numpy as np
import onnx
import pytest
from sconv_onnx.models import resnet

import sconv_onnx
from sconv_onnx.cli import main
from sconv_onnx.distance import Size, layer_distance, parse_spec
from sconv_onnx.errors import InputError
from sconv_onnx.structure import relative_residual


def test_specs_parse_into_constants_and_fractions_of_the_layer():
    spec = parse_spec("c=C/2, n=2")
    assert spec.channels == Size(fraction=Fraction(1, 2)) and spec.spatial == Size(constant=2)
    assert parse_spec("c=C*3/4").channels.at(64) == 48
    assert parse_spec("n=K").channels.at(7) == 7 and parse_spec("n=K").spatial.at(5) == 5
    assert parse_spec("c=16").channels.at(64) == 16
    assert parse_spec("c=C/3").channels.at(2) == 1  # rounds down, at least 1
    assert parse_spec("c=C/3/4").channels.fraction == Fraction(1, 12)  # left to right
    assert parse_spec("c=C*3/4/2").channels.fraction == Fraction(3, 8)
    for bad in ("", "c=0", "x=1", "c=K", "n=C/2", "c=C/0", "c=C*2/0", "c=two", "c", "c=C/1.5"):
        with pytest.raises(InputError):
            parse_spec(bad)


def test_a_layer_distance_is_the_least_squares_residual_at_its_own_sizes():
    weight = np.random.default_rng(0).standard_normal((16, 8, 3, 3))
    found = layer_distance("conv", "Conv", weight, parse_spec("c=C/2,n=4"))
    assert found.sizes == (4, 3, 3)  # n is kept at the kernel's size
    assert found.residual == pytest.approx(relative_residual(weight, (4, 3, 3)))
    outside = layer_distance("conv", "Conv", weight, parse_spec("c=9"))
    assert outside.residual is None and "outside 1..8" in outside.problem


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """ResNet-18-A at small width: every 3x3 block conv at c = C, n = 2; the rest plain."""
    model, _ = resnet.build("a", (2, 2, 2, 2), False, resnet.all_channels_n2, size="small")
    path = tmp_path_factory.mktemp("distance") / "a.onnx"
    onnx.save(model, str(path))
    return path


def test_the_structure_a_model_was_made_with_is_at_zero_distance(structured):
    found = {item.node: item for item in sconv_onnx.distances(str(structured), "c=C,n=2")}
    threes = [item for name, item in found.items() if name.startswith("layer")
              and item.weight_shape[2:] == (3, 3)]
    assert len(threes) == 16 and all(item.residual < 1e-6 for item in threes)
    assert found["conv1"].residual > 0.5  # a plain 7x7 stem
    assert found["fc"].residual == 0.0  # c = C on a fully connected layer: no structure at all
    halves = sconv_onnx.distances(str(structured), "c=C/2,n=2")
    assert all(item.residual > 0.1 for item in halves if item.node in {t.node for t in threes})
    assert next(item for item in halves if item.node == "fc").residual > 0.5


def test_the_command_prints_the_table_or_json(structured, capsys):
    assert main(["analyze", str(structured), "--distance", "c=C,n=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("distance from c=C,n=2") and out.count("within tol") == 16
    assert out.count("the whole layer") == 4  # fc and the 1x1 shortcuts: c = C, n = 1
    assert main(["analyze", str(structured), "--distance", "c=C,n=2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["distance"] == "c=C,n=2" and len(data["layers"]) == 21
    assert main(["analyze", str(structured), "--distance", "c=C/x"]) == 2
    assert "--distance" in capsys.readouterr().err
