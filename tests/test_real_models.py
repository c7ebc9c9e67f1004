"""Real pretrained models that nobody here wrote, installed from PyPI wheels.

``rapidocr==3.10.0`` is installed with ``pip install --no-deps`` by the
README's test command and by ``.ci/run``.  Outside CI the test skips when it
is missing; in CI (``CI`` set) a missing package is a failure.
"""

import importlib.metadata
import os

import numpy as np
import onnx
import pytest

from sconv_onnx.cli import main
from sconv_onnx.verify import compare_outputs, run


def _rapidocr_model(name: str):
    try:
        dist = importlib.metadata.distribution("rapidocr")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("rapidocr is not installed: pip install --no-deps rapidocr==3.10.0")
        pytest.skip("rapidocr not installed (pip install --no-deps rapidocr==3.10.0)")
    assert dist.version == "3.10.0"
    path = dist.locate_file(f"rapidocr/models/{name}")
    assert path.exists(), path
    return str(path)


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
