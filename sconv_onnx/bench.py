"""Timing in onnxruntime, done so that A/B ratios can be trusted.

Rules (docs/DESIGN.md section 2, measured here): every session has a fixed number
of intra-op threads and *spinning disabled* (the idle threads of one
session otherwise steal the cores of the other); models are run
interleaved, in alternating order, after a warm-up; the A/B figure is the
median of per-pair ratios, not a ratio of medians.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .progress import phase
from .runtime import session

#: Runs of each model before its profile counts (allocations, first-run layout work).
PROFILE_WARMUP = 3


def default_threads() -> int:
    """Cores available to this process (the default ``--threads``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def timing_session(
    model: onnx.ModelProto | str | os.PathLike, threads: int, profile_dir: str | None = None
) -> ort.InferenceSession:
    """A CPU session for timing: ``threads`` intra-op threads, no spinning, sequential.

    ``model``: a ``ModelProto`` or a model file's path (see :func:`~sconv_onnx.verify.session`).
    """
    return session(model, threads, spinning=False, profile_dir=profile_dir)


@dataclass
class Timing:
    """Latency of one model in milliseconds."""

    name: str
    median_ms: float
    p90_ms: float
    runs: int


@dataclass
class BenchResult:
    """Timings of one or more models run side by side.

    ``ratios[i]`` is the median over rounds of ``t_i / t_0`` (model ``i``
    against the first), measured in the same round.
    """

    threads: int
    runs: int
    warmup: int
    timings: list[Timing]
    ratios: list[float]
    profile: dict[str, list[float]] | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def time_sessions(sessions: list, feeds: dict | list[dict], runs: int, warmup: int,
                  on_round=None) -> np.ndarray:
    """Seconds per run, shape ``(len(sessions), runs)``, interleaved in rotating order.

    ``feeds`` is one dict for all sessions or one per session.  Round ``r``
    starts with session ``r mod n`` so that no model always runs first (or
    right after another particular one).  ``on_round()`` is called after
    each round (progress).
    """
    feeds = feeds if isinstance(feeds, list) else [feeds] * len(sessions)
    for sess, feed in zip(sessions, feeds):
        for _ in range(warmup):
            sess.run(None, feed)
    count = len(sessions)
    seconds = np.zeros((count, runs))
    for round_index in range(runs):
        for offset in range(count):
            index = (round_index + offset) % count
            start = time.perf_counter()
            sessions[index].run(None, feeds[index])
            seconds[index, round_index] = time.perf_counter() - start
        if on_round is not None:
            on_round()
    return seconds


def bench(
    models: list[onnx.ModelProto | str | os.PathLike],
    feeds: dict,
    *,
    names: list[str] | None = None,
    threads: int | None = None,
    runs: int = 100,
    warmup: int = 10,
    profile: bool = False,
) -> BenchResult:
    """Time ``models`` side by side on ``feeds``; optionally profile each per op type.

    ``models``: ``ModelProto`` or paths; a path is read by onnxruntime in
    place (external data included), so no copy of its weights is made here.
    """
    threads = threads or default_threads()
    names = names or [f"model {i}" for i in range(len(models))]
    sessions = [timing_session(model, threads) for model in models]
    with phase("benchmark", runs, "rounds") as running:
        seconds = time_sessions(sessions, feeds, runs, warmup, running.advance)
    timings = [
        Timing(name, float(np.median(row) * 1e3), float(np.percentile(row, 90) * 1e3), runs)
        for name, row in zip(names, seconds)
    ]
    ratios = [float(np.median(row / seconds[0])) for row in seconds]
    result = BenchResult(threads, runs, warmup, timings, ratios)
    if profile:
        per_model = [profile_op_types(model, feeds, threads, max(10, runs // 4)) for model in models]
        ops = sorted(set().union(*per_model), key=lambda op: -max(p.get(op, 0) for p in per_model))
        result.profile = {op: [p.get(op, 0.0) for p in per_model] for op in ops}
    return result


def profile_op_types(
    model: onnx.ModelProto | str | os.PathLike, feeds: dict, threads: int, runs: int,
    warmup: int = PROFILE_WARMUP,
) -> dict[str, float]:
    """Milliseconds per run spent in each op type, from onnxruntime's profiler: per op
    type, the median over ``runs`` runs (after ``warmup`` runs that are not counted).

    A median, because the models are profiled one after the other, not side by
    side, and single runs on a shared machine spike (4-5x seen); a mean over
    them put a ResNet-18's Conv time at twice its whole-model median.  Op types
    are onnxruntime's after its graph optimizations (e.g. a Conv fused with
    its Relu shows as ``FusedConv``; NCHWc kernels as ``Conv`` of the
    ``com.microsoft.nchwc`` domain, with ``ReorderInput``/``ReorderOutput``).
    """
    with tempfile.TemporaryDirectory() as folder:
        sess = timing_session(model, threads, profile_dir=folder)
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path) as handle:
            events = json.load(handle)
    starts = sorted(event["ts"] for event in events if event.get("name") == "model_run")
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in starts]
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            index = bisect.bisect_right(starts, event["ts"]) - 1
            if index >= 0:
                per_run[index][event["args"].get("op_name", "?")] += event["dur"] / 1e3
    counted = per_run[warmup:]
    ops = set().union(*counted) if counted else set()
    return {op: float(np.median([run.get(op, 0.0) for run in counted])) for op in ops}


def format_result(result: BenchResult) -> str:
    """The bench table, the A/B line and, with a profile, the per-op-type table."""
    from .report import table

    rows = [[t.name, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}"] for t in result.timings]
    lines = [table(["model", "median ms", "p90 ms"], rows)]
    for timing, ratio in zip(result.timings[1:], result.ratios[1:]):
        lines.append(
            f"{timing.name} / {result.timings[0].name}: {ratio:.3f} "
            f"(median of {result.runs} per-pair ratios; {result.threads} threads, spinning off)"
        )
    if result.profile:
        header = ["op type"] + [f"{t.name} ms/run" for t in result.timings]
        rows = [[op] + [f"{v:.3f}" for v in values] for op, values in result.profile.items()]
        lines += ["", "per op type (onnxruntime profiler, after its graph optimizations):",
                  table(header, rows)]
    return "\n".join(lines)
