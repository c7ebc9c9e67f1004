"""Calibrate the cost model's constants on this machine from single-layer timings.

    python benchmarks/calibrate.py            # writes benchmarks/CALIBRATION.md

Every structured layer of the benchmark models (full size, distinct shapes)
is timed against each of its candidate rewrites with sconv_onnx.measure
(layer in NCHWc context, side by side, median of per-round ratios).  A grid
search then picks the constants of sconv_onnx.cost that best predict the
measured keep/rewrite decisions and ratios (see ``loss``).  Before copying
the fitted constants into sconv_onnx/cost.py, check them on whole models with
benchmarks/run.py: single layers timed alone do not always add up (a fit
with cheap memory traffic made MobileNetV2 1.07x slower as a whole).
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from pathlib import Path

import numpy as np
from sconv_onnx.models.build import build

from sconv_onnx import cost, pipeline
from sconv_onnx.measure import Measurer
from sconv_onnx.options import Options
from sconv_onnx.passes.box.conv import ConvSite
from sconv_onnx.report import table

MODELS = ("struct_resnet18_b", "struct_resnet50_a", "struct_mobilenetv2", "struct_audio1d")
#: The constants fitted and the values each may take (log-spaced).
GRID = {
    "MEMORY": tuple(np.geomspace(0.125, 128, 21)),
    "CUMSUM_ELEMENT": tuple(np.geomspace(5, 640, 15)),
    "SMALL_KERNEL": tuple(np.linspace(1.0, 2.5, 16)),
    "POOL_ADD": tuple(np.geomspace(0.0625, 16, 17)),
    "NODE_OVERHEAD": (0.0, *np.geomspace(1e3, 1e7, 17)),
}


def collect(models, measurer: Measurer) -> list[dict]:
    """Measured samples: the layer (its cost before), a candidate and its measured ratio.

    Per distinct Conv layer, the candidates of its three most compressive
    structures (every lowering), no pool shared, timed by the family's own
    single-layer models (:mod:`sconv_onnx.passes.box.timing`).
    """
    samples, seen = [], set()
    options = Options(select="all")
    for name in models:
        analysis = pipeline.analyse(build(name), options, strict=False)
        for entry in analysis.entries:
            site = entry.site
            if not isinstance(site, ConvSite) or not entry.exact or not site.geometry.in_spatial:
                continue
            structures = list(dict.fromkeys(c.payload.structure for c in entry.exact))[:3]
            candidates = [c for c in entry.exact if c.payload.structure in structures]
            key = (site.geometry, tuple((c.payload.sizes, c.payload.lowering) for c in candidates))
            if key in seen:
                continue
            seen.add(key)
            ratios = entry.family.measure(site, [(c, ()) for c in candidates], measurer)
            for candidate, ratio in zip(candidates, ratios):
                samples.append({
                    "model": name, "layer": site.name,
                    "label": f"{candidate.label} {candidate.lowering}",
                    "before": site.layer, "after": candidate, "measured": ratio,
                })
            print(f"{name} {site.name}: " + ", ".join(f"{r:.2f}" for r in ratios), flush=True)
    return samples


def predicted(sample: dict) -> float:
    """The cost model's ratio with its current constants (the fit changes them)."""
    return sample["after"].cost() / sample["before"].cost_before


def score(samples: list[dict]) -> tuple[float, float]:
    """RMS error of log ratios, and the share of keep/rewrite decisions that agree."""
    errors, agree = [], 0
    for sample in samples:
        guess = predicted(sample)
        errors.append(math.log(guess) - math.log(sample["measured"]))
        agree += (guess <= cost.GAIN_MARGIN) == (sample["measured"] <= 0.97)
    return float(np.sqrt(np.mean(np.square(errors)))), agree / len(samples)


def loss(samples: list[dict]) -> float:
    """What the fit minimises: the log-ratio RMS error plus the share of wrong decisions.

    The decisions (rewrite or keep) are what the cost model is for; the RMS
    term breaks ties and keeps the predicted ratios meaningful.
    """
    rms, agree = score(samples)
    return rms + (1.0 - agree)


def fit(samples: list[dict], sweeps: int = 4) -> dict:
    """Coordinate descent over :data:`GRID`: each constant in turn takes its best value."""
    for _ in range(sweeps):
        for key, values in GRID.items():
            trials = []
            for value in values:
                setattr(cost, key, float(value))
                trials.append((loss(samples), float(value)))
            setattr(cost, key, min(trials)[1])
    return {key: getattr(cost, key) for key in GRID}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--save", type=Path, help="also pickle the measured samples here")
    parser.add_argument("--load", type=Path, help="fit samples pickled by --save (no timing)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("CALIBRATION.md"))
    args = parser.parse_args(argv)
    if args.load:
        with open(args.load, "rb") as handle:
            samples = pickle.load(handle)
    else:
        samples = collect(args.models, Measurer(threads=args.threads, runs=args.runs))
    if args.save:
        with open(args.save, "wb") as handle:
            pickle.dump(samples, handle)
    current = {key: getattr(cost, key) for key in GRID}
    rms_before, agree_before = score(samples)
    constants = fit(samples)
    rms_after, agree_after = score(samples)
    rows = [[s["model"], s["layer"], s["label"], f"{s['measured']:.2f}", f"{predicted(s):.2f}"]
            for s in samples]
    command = "python benchmarks/calibrate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# Cost model calibration",
        "",
        f"Made by `{command.strip()}` ({args.threads} threads, {args.runs} rounds per layer).",
        "",
        (f"{len(samples)} candidate rewrites of {len({(s['model'], s['layer']) for s in samples})} "
         "layers, each timed against its original layer (in NCHWc context, side by side)."),
        "",
        "| constant | in sconv_onnx/cost.py | fitted by this run |",
        "|---|---|---|",
        *[f"| {key} | {current[key]:g} | {constants[key]:g} |" for key in GRID],
        "",
        (f"RMS error of log(predicted/measured): {rms_before:.3f} with the constants in "
         f"sconv_onnx/cost.py, {rms_after:.3f} fitted. Keep/rewrite decisions agreeing with the "
         f"measurement: {agree_before:.0%} and {agree_after:.0%}."),
        "",
        ("The constants in sconv_onnx/cost.py are adopted only once benchmarks/run.py confirms "
         "them on whole models: single-layer timings do not always add up (the docstring of "
         "sconv_onnx/cost.py says which fit was rejected and why)."),
        "",
        "```",
        table(["model", "layer", "candidate", "measured", "predicted (fitted)"], rows),
        "```",
        "",
    ])
    args.out.write_text(text)
    print(f"fitted {constants}; rms {rms_before:.3f} -> {rms_after:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
