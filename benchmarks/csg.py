"""Shared slice generators (CSG): file size, session creation and latency, side by side.

    python benchmarks/csg.py                    # writes benchmarks/CSG.md
    python benchmarks/csg.py --runs 20 --out /tmp/c.md

For each generated ResNet (:mod:`sconv_onnx.models.csg_resnet`: ResNet-18 with
the first 3x3 of each block generated, as the official ImageNet code makes
them, or every block conv, slice 16, code 128; ResNet-20 at CIFAR widths with
every block conv generated, slice 12, code 72) and each selection (the family
alone, ``families=["csg"]``; every family, the default), ``sconv_onnx.optimize``
rewrites the model at ``tol=1e-4``.  The table gives the float weights and
the file size before and after; what the generated layers store after (the
float weights less those of the layers left as they were) against the
generator and codes as the paper counts them (:func:`sconv_onnx.csg.paper_params`);
the median time to create an onnxruntime session (which folds the rebuild);
and the latency ratio of the rewrite to the original, side by side
(sconv_onnx.bench rules), at onnxruntime's default graph optimizations and
with them disabled (``ORT_DISABLE_ALL``: the rebuild then runs on every
inference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pages import write_page
from sconv_onnx.models import csg_resnet, resnet

import sconv_onnx
from sconv_onnx import csg
from sconv_onnx.bench import time_sessions
from sconv_onnx.report import human

SESSIONS = 5


def _session(path: Path, threads: int, level) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def creation_ms(path: Path, threads: int) -> float:
    """Median milliseconds to create a session (default optimizations) over :data:`SESSIONS`."""
    times = []
    for _ in range(SESSIONS):
        started = time.perf_counter()
        _session(path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        times.append(1e3 * (time.perf_counter() - started))
    return float(np.median(times))


def latency_ratio(original: Path, rewritten: Path, feeds: dict, threads: int, runs: int,
                  level) -> float:
    """Median per-round time ratio rewritten/original, side by side, at ``level``."""
    sessions = [_session(path, threads, level) for path in (original, rewritten)]
    seconds = time_sessions(sessions, feeds, runs, warmup=5)
    return float(np.median(seconds[1] / seconds[0]))


def float_weights(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer if init.data_type == 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("CSG.md"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for layout, (size, code_size) in csg_resnet.LAYOUTS.items():
            model = csg_resnet.build(layout)
            feeds = {resnet.INPUT_NAME: np.random.default_rng(0).standard_normal(
                csg_resnet.input_shape(layout)).astype(np.float32)}
            shapes = csg_resnet.generated_shapes(model, layout)
            dense = sum(int(np.prod(shape)) for shape in shapes)
            paper = csg.paper_params(shapes, size, code_size)
            original = Path(folder) / f"{layout}.onnx"
            onnx.save(model, str(original))
            for families, name in ((["csg"], "csg alone"), (None, "every family")):
                new, report = sconv_onnx.optimize(model, families=families, tol=1e-4)
                rewritten = Path(folder) / f"{layout}_{name.split()[0]}.onnx"
                onnx.save(new, str(rewritten))
                stored = float_weights(new) - (float_weights(model) - dense)
                ratios = [latency_ratio(original, rewritten, feeds, args.threads, args.runs, level)
                          for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        ort.GraphOptimizationLevel.ORT_DISABLE_ALL)]
                created = [creation_ms(path, args.threads) for path in (original, rewritten)]
                rows.append([
                    f"{layout} (s={size}, d={code_size})", name, _forms(report),
                    f"{human(float_weights(model))} -> {human(float_weights(new))}",
                    f"{human(dense)} -> {human(stored)}", f"{human(paper)}",
                    f"{stored / paper:.3f}",
                    f"{original.stat().st_size / 1e6:.2f} -> {rewritten.stat().st_size / 1e6:.2f}",
                    f"{created[0]:.0f} -> {created[1]:.0f}",
                    f"{ratios[0]:.2f}", f"{ratios[1]:.2f}", f"{report.max_rel_error:.1e}",
                ])
                print(" | ".join(rows[-1]), flush=True)
    header = ["model", "families", "layers rewritten", "float weights",
              "generated layers' weights", "generator + codes (paper)", "ratio",
              "file MB", "session creation ms", "latency ratio", "latency ratio, ORT_DISABLE_ALL",
              "max rel err"]
    write_page(
        args.out,
        "Shared slice generators: size and time",
        " ".join(["python benchmarks/csg.py", *(argv or sys.argv[1:])]),
        f"{args.threads} threads, {args.runs} rounds side by side",
        ("ResNet-18 (1x3x224x224) with the first 3x3 conv of each block (`firsts`, the official "
         "layout) or every block conv (`blocks`) made by one random generator (slice 16, code "
         "128), and ResNet-20 (1x3x32x32, widths 16/32/64) with every block conv made by one "
         "(`cifar`, slice 12, code 72: every slice padded); the other layers random. "
         "`sconv_onnx.optimize` at tol 1e-4 with the `csg` family alone or every family (the "
         "default). Generated layers' weights: their float weights before, and what they store "
         "after (the model's float weights less those of the layers left as they were); "
         "generator + codes (paper): `d (L + sum n_pad)`, a code for every padded slice; ratio: "
         "the two. Latency ratio: rewritten over original, the median of per-round ratios."),
        header, rows)


def _forms(report) -> str:
    """The rewritten layers per family, and how many took the csg basis form."""
    layers = report.plan.rewritten
    counts = {family: sum(layer.family == family for layer in layers)
              for family in sorted({layer.family for layer in layers})}
    basis = sum(layer.chosen.label.startswith("basis") for layer in layers
                if layer.family == "csg")
    return ", ".join(f"{family} {count}" + (f" ({basis} basis form)" if family == "csg" and basis
                                            else "") for family, count in counts.items())

if __name__ == "__main__":
    main()
