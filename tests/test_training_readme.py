"""The README's training snippet runs as written with the pinned torch (issue 15): on a
small model and random batches it trains, projects and exports, and the exported model's
structured layers are rewritten by ``sconv_onnx.optimize`` at the default tolerance."""

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import sconv_onnx

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    """The Python block that follows the README's ``tested:`` marker for this file."""
    text = README.read_text()
    marker = text.index("<!-- tested: tests/test_training_readme.py")
    return re.search(r"```python\n(.*?)```", text[marker:], re.DOTALL).group(1)


class _Net(nn.Module):
    """A stem (left alone by the override), a 3x3 conv (n=2) and a head (c=32 of 64)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_the_readme_training_snippet_runs_and_its_export_is_rewritten(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _Net()
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(5)]
    scope = {"model": model, "batches": batches, "criterion": nn.CrossEntropyLoss(),
             "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert set(scope["moved"]) == {"conv", "head"}  # the stem is overridden to None
    assert isinstance(scope["regularizer"], nn.Module)
    assert list(scope["regularizer"].parameters()) == []  # the model's layers are not its own
    _, report = sconv_onnx.optimize(str(tmp_path / "model.onnx"), select="all")
    assert report.verified
    found = {layer.node: layer for layer in report.plan.layers}
    structured = [layer for layer in found.values() if layer.rewritten and layer.family == "box"]
    assert len(structured) == 2  # the 3x3 conv at n=2 and the head at c=32
    assert np.isfinite(report.max_rel_error)
