"""Time this checkout's rewrites against another revision's, side by side.

    python benchmarks/compare_revisions.py BASE            # writes benchmarks/REVISIONS.md

For a refactor: is any model slower than before?  Every benchmark model is
built once (by this checkout's builders) and optimized by both versions of
sconv-onnx; the original, BASE's rewrite and this checkout's rewrite then
run side by side in one process (``sconv_onnx.bench`` rules: fixed threads,
no spinning, rotating order).  The table gives each rewrite's median
per-round ratio to the original and the median per-round ratio of this
checkout's rewrite to BASE's, and says when the two rewritten graphs are
identical (same nodes, same weights: then only noise can differ).

BASE is any git revision; it is exported with ``git archive`` to a
temporary folder and run from there in a subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnx
from sconv_onnx.models.build import MODELS
from sconv_onnx.models.build import build as build_model

import sconv_onnx
from sconv_onnx.bench import time_sessions, timing_session
from sconv_onnx.report import table
from sconv_onnx.verify import random_feeds

ROOT = Path(__file__).resolve().parents[1]
MODES = ("cost", "all", "measured")
#: Run by BASE's sconv-onnx: optimize argv[1] with select=argv[3], save to argv[2].
_OPTIMIZE = ("import sys, onnx, sconv_onnx; "
             "model, _ = sconv_onnx.optimize(sys.argv[1], select=sys.argv[3]); "
             "onnx.save(model, sys.argv[2])")


def export_revision(revision: str, folder: Path) -> Path:
    """``revision``'s tree in ``folder``, importable as ``sconv_onnx`` (models included)."""
    archive = folder / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive),
                    revision], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "base", filter="data")
    package = folder / "base" / "sconv_onnx"
    (package / "models").symlink_to(folder / "base" / "models", target_is_directory=True)
    return folder / "base"


def optimize_with(base: Path, source: Path, target: Path, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(base)}
    subprocess.run([sys.executable, "-c", _OPTIMIZE, str(source), str(target), mode],
                   check=True, env=env, cwd=base)


def fingerprint(model: onnx.ModelProto) -> str:
    """The graph's nodes and weights, names included: equal for identical rewrites."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString())
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(init.SerializeToString())
    return digest.hexdigest()


def compare(name: str, base: Path, folder: Path, threads: int, runs: int, warmup: int,
            modes: list[str]) -> list:
    model = build_model(name)
    source = folder / f"{name}.onnx"
    onnx.save(model, str(source))
    shapes = {inp.name: tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
              for inp in model.graph.input}
    feeds = random_feeds(model, shapes, seed=0)
    rows = []
    for mode in modes:
        before = folder / f"{name}.{mode}.base.onnx"
        optimize_with(base, source, before, mode)
        old = onnx.load(str(before))
        new, _ = sconv_onnx.optimize(model, select=mode, threads=threads)
        sessions = [timing_session(m, threads) for m in (model, old, new)]
        seconds = time_sessions(sessions, feeds, runs, warmup)
        rows.append([
            name, mode,
            f"{np.median(seconds[1] / seconds[0]):.3f}",
            f"{np.median(seconds[2] / seconds[0]):.3f}",
            f"{np.median(seconds[2] / seconds[1]):.3f}",
            "yes" if fingerprint(old) == fingerprint(new) else "no",
        ])
        print("  ".join(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the git revision to compare with (e.g. a commit or main~1)")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["cost", "all"],
                        help="selection modes (measured: each version times its own layers, so "
                             "its decisions vary from run to run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("REVISIONS.md"))
    args = parser.parse_args(argv)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    this = f"{head}{' with uncommitted changes' if dirty else ''}"
    with tempfile.TemporaryDirectory(prefix="sconv-revisions-") as tmp:
        base = export_revision(args.base, Path(tmp))
        rows = [row for name in args.models
                for row in compare(name, base, Path(tmp), args.threads, args.runs, args.warmup,
                                   args.modes)]
    command = "python benchmarks/compare_revisions.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    header = ["model", "select", "base / original", "this / original", "this / base",
              "identical graphs"]
    text = "\n".join([
        "# This checkout's rewrites against another revision's",
        "",
        (f"Made by `{command.strip()}` on {datetime.date.today()}: base `{args.base}`, this "
        f"checkout `{this}`; {args.threads} threads, {args.runs} rounds after {args.warmup} "
        "warm-up runs, the three models side by side in rotating order. Ratios are medians of "
        "per-round ratios; `identical graphs`: the two rewrites have the same nodes and weights "
         "(with `measured`, each version times its own layers, so even one version's graphs "
         "differ from run to run)."),
        "",
        "```",
        table(header, rows),
        "```",
        "",
    ])
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
