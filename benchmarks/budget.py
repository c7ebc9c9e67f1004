"""MAC budget on a ResNet-18 with plain (unstructured) weights: error and measured speed.

    python benchmarks/budget.py                   # writes benchmarks/BUDGET_RESNET18.md
    python benchmarks/budget.py --targets 0.5 --runs 30 --out /tmp/b.md

For each target MAC fraction and each alpha fit (data-aware, weight-space),
``sconv_onnx.optimize(target_macs=R, calib_data=..., min_agreement=0)``
compresses the model on 16 calibration images, forced to the target (no
bound: random logits have no answers worth keeping); the relative output error is then measured on 16
other images, and the compressed model is timed side by side with the
original (sconv_onnx.bench rules).  The weights are random (He init), so
the images are smooth random fields rather than photographs, and "error"
is the logits' relative error, not an accuracy: the digits demo
(``benchmarks/DIGITS.md``) has accuracies on real data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from pages import write_page
from sconv_onnx.models import resnet

import sconv_onnx
from sconv_onnx.bench import bench
from sconv_onnx.calibration import accuracy_proxy, run_batches, split_batches
from sconv_onnx.report import human

IMAGES = 16


def smooth_images(count: int, seed: int) -> np.ndarray:
    """``(count, 3, 224, 224)`` float32 random fields with neighbouring pixels correlated."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(np.cumsum(rng.standard_normal((count, 3, 224, 224)), axis=2), axis=3)
    return (x / x.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=None,
                        help="the families the budget may use (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("BUDGET_RESNET18.md"))
    args = parser.parse_args(argv)

    model, _ = resnet.build("plain_resnet18", (2, 2, 2, 2), False, resnet.plain, seed=0)
    calib = {"image": smooth_images(IMAGES, seed=0)}
    held_out = split_batches(model, {"image": smooth_images(IMAGES, seed=1)})
    reference = run_batches(model, held_out)
    rows = []
    for target in args.targets:
        for fit in ("data", "weights"):
            started = time.perf_counter()
            new, report = sconv_onnx.optimize(model, calib_data=calib, target_macs=target,
                                              alpha_fit=fit, min_agreement=0,
                                              families=args.families)
            seconds = time.perf_counter() - started
            held = accuracy_proxy(reference, run_batches(new, held_out))
            timing = bench([model, new], held_out[0], names=["original", "budget"],
                           threads=args.threads, runs=args.runs, warmup=5)
            rows.append([
                f"{target:g}", fit, f"{len(report.plan.rewritten)}/{len(report.plan.layers)}",
                ", ".join(f"{name} {count}" for name, count in sorted(
                    Counter(layer.family for layer in report.plan.rewritten).items())),
                (f"{human(report.before.macs)} -> {human(report.after.macs)} "
                f"({report.after.macs / report.before.macs:.3f})"),
                f"{report.calibration['rel_error']:.3f}", f"{held['rel_error']:.3f}",
                f"{timing.timings[0].median_ms:.1f} -> {timing.timings[1].median_ms:.1f}",
                f"{timing.ratios[1]:.3f}", f"{seconds:.0f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    header = ["target", "alpha fit", "layers rewritten", "families", "MACs", "rel. error, calibration images",
              "rel. error, other images", "latency ms", "ratio", "optimize s"]
    write_page(
        args.out,
        "MAC budget on a plain-weight ResNet-18",
        " ".join(["python benchmarks/budget.py", *(argv or sys.argv[1:])]),
        f"{args.threads} threads, {args.runs} runs per model",
        ("ResNet-18 (torchvision layout, 1x3x224x224, He-initialised weights: no structure), "
         f"`optimize(target_macs=R, calib_data=<{IMAGES} smooth random images>, alpha_fit=..., "
         "min_agreement=0)` (forced to the target). "
         "Relative error: `||y - y0|| / ||y0||` of the logits; latency: onnxruntime medians "
         "side by side, ratio the median of per-round ratios."), header, rows)


if __name__ == "__main__":
    main()
