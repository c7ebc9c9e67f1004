"""``--html FILE`` (issue 15): one self-contained page with plots, for optimize, analyze
and bench; rendered in headless Chromium, whose DOM must hold the plots and whose
screenshot must show them drawn."""

import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import onnx
import pytest
from sconv_onnx.models import demo_cnn
from test_endtoend import _chain, _inputs

import sconv_onnx
from sconv_onnx import page
from sconv_onnx.cli import main
from sconv_onnx.report import json_text, schema

#: .ci/run sets it: there, a missing browser fails the browser test instead of skipping it
REQUIRE_BROWSER = "SCONV_REQUIRE_BROWSER"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "demo.onnx"
    onnx.save(demo_cnn.build(), str(path))
    return path


@pytest.fixture(scope="module")
def optimized_page(demo, tmp_path_factory):
    """optimize --bench --html on the demo CNN: (page text, page path, stdout)."""
    folder = tmp_path_factory.mktemp("optimized")
    target = folder / "page.html"
    code = main(["optimize", str(demo), str(folder / "out.onnx"), "--html", str(target),
                 "--bench", "--runs", "5", "--warmup", "1", "-q"])
    assert code == 0
    return target.read_text(), target


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", text, flags=re.DOTALL)


def _self_contained(text: str) -> None:
    """Nothing the page would fetch when viewed: no scripts, links, images or CSS imports,
    and no URL but SVG's namespace identifiers."""
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text, flags=re.IGNORECASE)
    assert "@import" not in text and not re.search(r"url\((?!#)", text)  # only in-page ids
    references = re.findall(r"\b(?:src|href)\s*=\s*[\"']([^\"']*)", text)
    assert all(reference.startswith("#") for reference in references), references
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls


def test_optimize_page_holds_every_plot_and_the_layer_table(optimized_page, demo):
    text, _ = optimized_page
    _self_contained(text)
    plan = sconv_onnx.analyze(str(demo))
    svgs = _svgs(text)
    # the benchmark, MACs, predicted time, residual and family plots (no budget here)
    assert len(svgs) == 5
    assert all(svg.count("<path") + svg.count("<use") > 10 for svg in svgs)
    macs = svgs[1]
    for layer in plan.layers:  # every layer is a row of the per-layer plots and the table
        assert f">{layer.node}<" in macs and f"<td>{layer.node}</td>" in text
    # text stays text: the verdict and the bench ratio are readable in the page
    assert '<span class="PASS">PASS</span>' in text and "rewritten / original" in text
    # the layer rows, the params/MACs/size rows and the two tables' heads
    assert text.count("<tr>") == len(plan.layers) + 3 + 2


def test_the_bars_are_the_layers_macs(demo):
    """The MACs plot draws each layer's before bar at its MACs, and its after bar at the
    rewrite's MACs (a kept layer's at its own), in its family's colour."""
    from matplotlib.colors import to_hex

    layers = sconv_onnx.analyze(str(demo)).to_dict()["layers"]
    figure = page.macs_figure(layers, ["box"])
    bars = list(figure.axes[0].patches)
    before, after = bars[:len(layers)], bars[len(layers):]
    assert [bar.get_width() for bar in before] == [layer["macs_before"] for layer in layers]
    rewritten = [layer["decision"] == "rewrite" for layer in layers]
    assert any(rewritten) and not all(rewritten)
    assert [bar.get_width() for bar in after] == [
        layer["macs_after"] if done else layer["macs_before"]
        for layer, done in zip(layers, rewritten)]
    assert [to_hex(bar.get_facecolor()) for bar in after] == [
        page.FAMILY_COLOURS["box"] if done else page.BEFORE_COLOUR for done in rewritten]


def test_pages_of_odd_reports_still_render(demo):
    """No verification, one timed model, unknown MACs, a rewrite without its candidate,
    names matplotlib would read as TeX, no layers at all."""
    _, report = sconv_onnx.optimize(str(demo), verify=False)
    data = report.to_dict()
    assert data["verification"] is None
    layers = data["plan"]["layers"]
    layers[0]["node"] = "a$\\frac$_<b>"
    layers[1]["macs_before"] = layers[1]["macs_after"] = None
    rewritten = next(layer for layer in layers if layer["decision"] == "rewrite")
    rewritten["chosen"] = None
    data["bench"] = {"threads": 1, "runs": 3, "warmup": 1, "profile": None, "ratios": [1.0],
                     "timings": [{"name": "A", "median_ms": 1.0, "p90_ms": 1.5, "runs": 3}]}
    text = page.optimize_page(data, "in.onnx", "out.onnx")
    assert "Not verified" in text and "a$\\frac$_&lt;b&gt;" in text and "<b>" not in text
    assert len(_svgs(text)) == 5
    data["plan"]["layers"] = []
    data["plan"]["totals"].update(layers=0, rewritten=0, macs_before=None, macs_after=None)
    assert _svgs(page.analyze_page(data["plan"], "in.onnx")) == []


def test_analyze_and_bench_pages(demo, tmp_path):
    analyzed = tmp_path / "analyze.html"
    assert main(["analyze", str(demo), "--html", str(analyzed)]) == 0
    text = analyzed.read_text()
    _self_contained(text)
    assert len(_svgs(text)) == 4 and "Benchmark" not in text
    benched = tmp_path / "bench.html"
    assert main(["bench", str(demo), str(demo), "--profile", "--runs", "5", "--warmup", "1",
                 "--html", str(benched)]) == 0
    text = benched.read_text()
    _self_contained(text)
    svgs = _svgs(text)
    assert len(svgs) == 2  # the timings, the profile per op type
    assert "Conv" in svgs[1] and "B / A" in svgs[0]


def test_a_budget_page_draws_every_scored_trial(tmp_path):
    """The budget's curve: the trials recorded are real (each one's MAC ratio and
    agreement), and the written plan is one of them."""
    rng = np.random.default_rng(0)
    model = _chain(rng, layers=6)
    mixing = rng.standard_normal((64, 64)) * np.linspace(2, 0.05, 64)[:, None]
    _, report = sconv_onnx.optimize(model, calib_data={"x": _inputs(rng, 512, mixing)},
                                    target_macs=0.5, min_agreement=0.7, families="lowrank")
    check = report.plan.budget_check
    trials = check["trials"]
    assert len(trials) >= 3
    written = [trial for trial in trials if trial["moves"] == check["moves_taken"]
               and trial["sequential_fit"] == check["sequential_fit"]]
    assert len(written) == 1 and written[0]["holds"]
    known = [layer for layer in report.plan.layers if layer.macs_before]
    ratio = (sum(layer.macs_after if layer.rewritten else layer.macs_before for layer in known)
             / sum(layer.macs_before for layer in known))
    assert written[0]["macs_ratio"] == pytest.approx(ratio)
    assert written[0]["agreement"] == check["calibration"]["top1_agreement"]
    assert any(not trial["holds"] for trial in trials)  # the bound stopped it
    data = report.to_dict()
    jsonschema.Draft202012Validator(schema()).validate(json.loads(json_text(data)))
    text = page.optimize_page(data, "chain.onnx", "out.onnx")
    svgs = _svgs(text)
    assert len(svgs) == 5 and "MAC budget" in svgs[-1] and "bound 0.7" in svgs[-1]


def test_html_refuses_the_input_path_and_needs_matplotlib(demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(demo), str(out), "--html", str(demo)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if absent
    assert main(["optimize", str(demo), str(out), "--html", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sconv-onnx[html]" in err
    assert not out.exists()  # refused before any work


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "no chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get(REQUIRE_BROWSER):
        pytest.fail(message)
    pytest.skip(message)


def _chromium(browser: str, profile, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120,
        check=True)


def test_the_page_renders_its_plots_in_headless_chromium(optimized_page, demo, tmp_path):
    from PIL import Image

    browser = _browser()
    _, path = optimized_page
    dom = _chromium(browser, tmp_path / "profile", "--dump-dom", path.as_uri()).stdout
    svgs = _svgs(dom)
    assert len(svgs) == 5  # parsed by the browser as SVG elements, each with its drawing
    layers = len(sconv_onnx.analyze(str(demo)).layers)
    # the MACs plot: two bars per layer (and the axes' own patches)
    assert len(re.findall(r'<g id="patch_', svgs[1])) >= 2 * layers
    shot = tmp_path / "page.png"
    _chromium(browser, tmp_path / "profile", "--window-size=1200,3400",
              f"--screenshot={shot}", path.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    inked = np.any(pixels < 235, axis=1).mean()
    assert inked > 0.03, f"a nearly blank page: {inked:.1%} of the pixels drawn"
    box_blue = np.all(np.abs(pixels.astype(int) - (0x1F, 0x77, 0xB4)) <= 8, axis=1).sum()
    grey = np.all(np.abs(pixels.astype(int) - (0xB0, 0xB0, 0xB0)) <= 4, axis=1).sum()
    # the bars: the box family's colour (no other part of the page uses it) and the
    # "before" grey, over whole areas
    assert box_blue > 5000 and grey > 5000, (box_blue, grey)
