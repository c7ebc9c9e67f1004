"""The structure search on wide layers: time and peak memory per weight shape.

    python benchmarks/scale.py                  # writes benchmarks/SCALE.md
    python benchmarks/scale.py --out /tmp/s.md

Issue 16 asks for ``structure.search`` on an exactly structured 8192 x 8192 weight
in at most 2 s and 0.5 GB, on VGG's 25088 x 4096 classifier shape in at most 5 s;
the table says how far it is (the issue is open).
Each shape is searched as a float32 weight structured along its input
features at ``c = C/2`` (the box family's fully connected form: ``(out, in)``,
or a 1x1 conv's ``(O, C, 1, 1)``), and as plain random weights of the same
shape (which the channel screen rejects).  Peak memory is what numpy
allocated during the search (``tracemalloc``; numpy reports its buffers
there), beyond the weight itself.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from pages import write_page

from sconv_onnx import structure

#: (label, weight shape): out x in (x kernel).
SHAPES = (
    ("square FC 4096", (4096, 4096)),
    ("square FC 8192", (8192, 8192)),
    ("VGG classifier 25088 -> 4096", (4096, 25088)),
    ("1x1 conv 2048 -> 2048", (2048, 2048, 1, 1)),
)
TOL = 1e-4


def structured(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 weight of ``shape`` whose input axis is a sum of windows: ``c = C/2``."""
    out, channels = shape[:2]
    under = channels // 2
    period = channels - under + 1
    alpha = rng.standard_normal((out, under))
    running = np.zeros((out, channels + 1))
    running[:, 1:under + 1] = np.cumsum(alpha, axis=1)
    running[:, under + 1:] = running[:, under:under + 1]
    rows = np.arange(channels)
    weight = running[:, rows + 1] - running[:, np.maximum(rows + 1 - period, 0)]
    return weight.astype(np.float32).reshape(shape)


def measured(weight: np.ndarray) -> tuple[float, float, list]:
    """Seconds, peak GiB allocated and the structures :func:`structure.search` found."""
    tracemalloc.start()
    start = time.perf_counter()
    found = structure.search(weight, TOL)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    return seconds, peak, found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("SCALE.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    rows = []
    for label, shape in SHAPES:
        for kind, weight in (("structured c = C/2", structured(shape, rng)),
                             ("random", rng.standard_normal(shape).astype(np.float32))):
            seconds, peak, found = measured(weight)
            sizes = ", ".join(f"c={s.sizes[0]}" for s in found[:3])
            rows.append([label, "x".join(map(str, shape)), kind, f"{weight.nbytes / 2**30:.3f}",
                         f"{seconds:.2f}", f"{peak:.3f}", sizes])
            print(" | ".join(rows[-1]), flush=True)
    header = ["layer", "weight", "weights", "weight GiB", "search s", "peak GiB (numpy)",
              "structures found (first 3)"]
    write_page(args.out, "The structure search on wide layers",
               " ".join(["python benchmarks/scale.py", *(argv or sys.argv[1:])]),
               f"{time.perf_counter() - started:.0f} s",
               f"`structure.search(W, {TOL:g})` on float32 weights, one after the other in "
               "one process. Peak memory: numpy's allocations during the search "
               "(tracemalloc), beyond the weight.", header, rows)


if __name__ == "__main__":
    main()
