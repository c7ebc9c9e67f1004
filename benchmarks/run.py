"""Benchmark harness: build the models, optimize them with each --select mode, time them.

    python benchmarks/run.py                      # all models, writes benchmarks/RESULTS.md
    python benchmarks/run.py --models struct_resnet18_a --runs 50 --out /tmp/r.md

For each model, the original and its rewrites (one per select mode) run
side by side in one process (sconv_onnx.bench rules: fixed threads, spinning
off, rotating order, median of per-pair ratios).  The report also gives the
structure search time alone, the optimize wall time, and a per-op-type
profile of the original and its cost-mode rewrite.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
from sconv_onnx.models.build import MODELS
from sconv_onnx.models.build import build as build_model

import sconv_onnx
from sconv_onnx.bench import bench
from sconv_onnx.report import table
from sconv_onnx.structure import search
from sconv_onnx.verify import random_feeds

MODES = ("cost", "measured", "all")
DEFAULT_MODELS = ("struct_resnet18_a", "struct_resnet18_b", "struct_resnet50_a",
                  "struct_mobilenetv2", "struct_audio1d", "igc_resnet18", "igc_resnet18_strided",
                  "igcv2_resnet18")


def search_seconds(model: onnx.ModelProto, tol: float = sconv_onnx.DEFAULT_TOL) -> float:
    """Wall time of the structure search alone over every Conv weight."""
    weights = {init.name: init for init in model.graph.initializer}
    conv_weights = [numpy_helper.to_array(weights[n.input[1]]) for n in model.graph.node
                    if n.op_type == "Conv" and n.input[1] in weights]
    start = time.perf_counter()
    for weight in conv_weights:
        search(weight, tol)
    return time.perf_counter() - start


def run_model(name: str, threads: int, runs: int, warmup: int) -> dict:
    """Optimize ``name`` with every mode and time all versions side by side."""
    model = build_model(name)
    shapes = {inp.name: tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
              for inp in model.graph.input}
    feeds = random_feeds(model, shapes, seed=0)
    rows = {"name": name, "search_s": search_seconds(model), "modes": {}}
    rewritten = []
    for mode in MODES:
        start = time.perf_counter()
        new, report = sconv_onnx.optimize(model, select=mode, threads=threads)
        elapsed = time.perf_counter() - start
        rewritten.append(new)
        rows["modes"][mode] = {"report": report, "optimize_s": elapsed}
    result = bench([model, *rewritten], feeds, names=["original", *MODES], threads=threads,
                   runs=runs, warmup=warmup)
    rows["timings"] = result.timings
    rows["ratios"] = dict(zip(MODES, result.ratios[1:]))
    profiled = bench([model, rewritten[0]], feeds, names=["original", "cost"], threads=threads,
                     runs=max(10, runs // 4), warmup=warmup, profile=True)
    rows["profile"] = profiled.profile
    return rows


def _row(rows: dict, mode: str) -> list[str]:
    report = rows["modes"][mode]["report"]
    before, after = report.before, report.after
    mac_ratio = after.macs / before.macs
    latency = rows["ratios"][mode]
    medians = {t.name: t.median_ms for t in rows["timings"]}
    plan = report.plan
    return [
        rows["name"], mode, f"{len(plan.rewritten)}/{len(plan.layers)}",
        f"{before.macs / 1e9:.3f}", f"{after.macs / 1e9:.3f}", f"{mac_ratio:.3f}",
        f"{after.params / before.params:.3f}",
        f"{medians['original']:.2f}", f"{medians[mode]:.2f}", f"{latency:.3f}",
        f"{latency / mac_ratio:.2f}", f"{report.max_rel_error:.1e}",
        f"{rows['modes'][mode]['optimize_s']:.1f}",
    ]


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def write_results(all_rows: list[dict], args, path: Path) -> None:
    header = ["model", "select", "rewritten", "GMACs before", "GMACs after", "MAC ratio",
              "params ratio", "orig ms", "new ms", "latency ratio", "latency/MAC",
              "max rel err", "optimize s"]
    body = [_row(rows, mode) for rows in all_rows for mode in MODES]
    search_rows = [[rows["name"], f"{rows['search_s']:.2f}"] for rows in all_rows]
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    lines = [
        "# Benchmark results",
        "",
        f"Made by `{command.strip()}` on {datetime.date.today().isoformat()}.",
        "",
        (f"Machine: {_machine()}, {args.threads} intra-op threads, batch 1, fp32. "
         f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), onnx {onnx.__version__}, "
         f"numpy {np.__version__}, Python {platform.python_version()}, sconv-onnx "
         f"{sconv_onnx.__version__}."),
        "",
        (f"Each model: the original and its three rewrites run side by side in one process, "
         f"{args.runs} rounds after {args.warmup} warm-up runs, rotating order, spinning off. "
         "`latency ratio` is the median of per-round ratios new/original; `latency/MAC` "
         "divides it by the MAC ratio (1.00 = the speed-up the MACs promise). MACs count "
         "Conv/Gemm/MatMul multiply-adds plus the pools' additions."),
        "",
        "```",
        table(header, body),
        "```",
        "",
        "Structure search alone (every Conv weight, default tolerance):",
        "",
        "```",
        table(["model", "search s"], search_rows),
        "```",
        "",
        ("Per op type, original vs the cost-mode rewrite (ms per run, onnxruntime profiler, "
         "after its own fusions; `FusedConv` is a Conv with its activation):"),
        "",
    ]
    for rows in all_rows:
        profile = rows["profile"] or {}
        prof_rows = [[op, f"{a:.3f}", f"{b:.3f}"] for op, (a, b) in profile.items() if max(a, b) >= 0.005]
        lines += [f"{rows['name']}:", "", "```", table(["op type", "original", "cost"], prof_rows),
                  "```", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    all_rows = []
    for name in args.models:
        print(f"{name} ...", flush=True)
        rows = run_model(name, args.threads, args.runs, args.warmup)
        for mode in MODES:
            print("  " + "  ".join(_row(rows, mode)[1:]), flush=True)
        all_rows.append(rows)
    write_results(all_rows, args, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
