"""The structure search on wide layers: time and peak memory per weight shape.

    python benchmarks/scale.py                  # writes benchmarks/SCALE.md
    python benchmarks/scale.py --out /tmp/s.md

Issue 16 asks for ``structure.search`` on an exactly structured 8192 x 8192 weight
in at most 2 s and 0.5 GB, on VGG's 25088 x 4096 classifier shape in at most 5 s,
and for a 9-layer model of 8192-wide structured MatMuls (2.4 GB of weights in
external data) to optimize in at most 5 minutes at no more than 2x its weights
above the process's baseline; the tables say what was measured.

The end-to-end run is ``sconv-onnx optimize big.onnx out.onnx`` in a child
process that times each phase and reads its own peak resident memory as
Linux reports it (``VmHWM``, reset when the phase starts); the baseline is
the child's peak before the run (the libraries loaded, no model).
Each shape is searched as a float32 weight structured along its input
features at ``c = C/2`` (the box family's fully connected form: ``(out, in)``,
or a 1x1 conv's ``(O, C, 1, 1)``), and as plain random weights of the same
shape (which the channel screen rejects).  Peak memory is what numpy
allocated during the search (``tracemalloc``; numpy reports its buffers
there), beyond the weight itself.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
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


#: The end-to-end model: layers of WIDTH x WIDTH structured MatMuls, each with a Relu.
LAYERS = 9
WIDTH = 8192
#: A ``-v`` log line of a phase: ``sconv-onnx: <phase>: [...] <seconds> s``.
PHASE_LINE = re.compile(r"^sconv-onnx: ([^:]+): (?:.* in )?([0-9.]+) s$")


def big_model(folder: Path, rng: np.random.Generator) -> Path:
    """:data:`LAYERS` MatMul + Relu layers of :data:`WIDTH` features, each weight
    structured on its input features (:func:`structured`), saved with external data."""
    nodes, inits, tensor = [], [], "x"
    for index in range(LAYERS):
        weight = structured((WIDTH, WIDTH), rng).T / np.float32(WIDTH)  # (in, out)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight), f"w{index}"))
        nodes += [helper.make_node("MatMul", [tensor, f"w{index}"], [f"m{index}"],
                                   name=f"fc{index}"),
                  helper.make_node("Relu", [f"m{index}"], [f"r{index}"], name=f"relu{index}")]
        tensor = f"r{index}"
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [1, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.data")
    return path


#: Runs the command line in a child and reports, for each phase of ``optimize``, its time
#: and its own peak resident memory: Linux's ``VmHWM`` of the process, reset before the
#: phase (writing 5 to ``/proc/self/clear_refs``), and the whole run's peak, read before
#: each reset.  ``getrusage`` of children would count the parent's pages at fork.
_MEASURED_CLI = """
import functools, sys, time
from sconv_onnx import cli, layercheck, pipeline

PHASES = [(pipeline, "load_model", "load (the graph; external data mapped)"),
          (pipeline, "analyse", "structure search"), (pipeline, "plan", "plan"),
          (pipeline, "rewrite", "rewrite"), (layercheck, "check_layers", "layer checks"),
          (pipeline, "verify_outputs", "verification"), (cli, "save_model", "save")]
overall = [0]  # the peak of the whole run, gaps between phases included

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(key))

def reset():
    overall[0] = max(overall[0], status("VmHWM"))
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

def measured(module, name, label):
    function = getattr(module, name)
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        reset()
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            print("phase", label, time.perf_counter() - start, status("VmHWM"), file=sys.stderr)
    setattr(module, name, wrapper)

for module, name, label in PHASES:
    measured(module, name, label)
baseline = status("VmHWM")
try:
    code = cli.main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
reset()
print("baseline kB", baseline, file=sys.stderr)
print("overall kB", overall[0], file=sys.stderr)
sys.exit(code)
"""
#: ``phase <label> <seconds> <peak kB>`` on the child's stderr
PHASE_LINE = re.compile(r"^phase (.+) ([0-9.e+-]+) (\d+)$")


def _measured(*args: str) -> subprocess.CompletedProcess:
    """``sconv-onnx *args`` in a child process, each phase measured (:data:`_MEASURED_CLI`)."""
    return subprocess.run([sys.executable, "-c", _MEASURED_CLI, *args], check=False,
                          capture_output=True, text=True)


def end_to_end(folder: Path, rng: np.random.Generator) -> list[list[str]]:
    """Rows of the end-to-end table: each phase's time and peak, the whole run."""
    source = big_model(folder, rng)
    weights = (folder / "big.data").stat().st_size / 2**30
    start = time.perf_counter()
    done = _measured("optimize", str(source), str(folder / "out.onnx"))
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"optimize failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    baseline, worst = (int(re.search(rf"^{name} kB (\d+)$", done.stderr, flags=re.MULTILINE)[1])
                       / 2**20 for name in ("baseline", "overall"))
    rows = []
    for match in filter(None, map(PHASE_LINE.match, done.stderr.splitlines())):
        peak = int(match[3]) / 2**20
        rows.append([match[1], f"{float(match[2]):.1f}", f"{peak:.2f}",
                     f"{(peak - baseline) / weights:.2f}x"])
    rows.append(["whole run (the child process, from its start)", f"{seconds:.1f}", f"{worst:.2f}",
                 f"{(worst - baseline) / weights:.2f}x"])
    note = (f"baseline (the libraries loaded, before the run): {baseline:.2f} GiB; "
            f"weights: {weights:.2f} GiB")
    rows.append([note, "", "", ""])
    rows.append([done.stdout.strip().splitlines()[-1].replace("|", "/"), "", "", ""])
    return rows


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
    with tempfile.TemporaryDirectory() as folder:
        whole = end_to_end(Path(folder), rng)
    lines = ["| phase | s | peak resident GiB | peak above the baseline, x the weights |",
             "|---|---|---|---|", *("| " + " | ".join(row) + " |" for row in whole)]
    text = write_page(
        args.out, "The structure search on wide layers",
        " ".join(["python benchmarks/scale.py", *(argv or sys.argv[1:])]),
        f"{time.perf_counter() - started:.0f} s",
        f"`structure.search(W, {TOL:g})` on float32 weights, one after the other in "
        "one process. Peak memory: numpy's allocations during the search "
        "(tracemalloc), beyond the weight.", header, rows)
    end = (f"\n## End to end: {LAYERS} structured MatMuls of {WIDTH} features\n\n"
           f"`sconv-onnx optimize big.onnx out.onnx` in a child process, the weights in "
           f"external data; each phase's time and its own peak resident memory (Linux's "
           f"`VmHWM`, reset when the phase starts).\n\n" + "\n".join(lines) + "\n")
    args.out.write_text(text + end)
    print(end)


if __name__ == "__main__":
    main()
