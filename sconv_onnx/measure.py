"""``select="measured"``: time a layer's candidate rewrites, each against the layer as is.

The families build the models (their ``measure`` hook: a small model
holding the layer, and the same model rewritten by each candidate); this
module times them side by side (:mod:`sconv_onnx.bench` rules: fixed
threads, no spinning, rotating order) and gives each candidate the median
of its per-round time ratios against the original.  Results are cached by
the signatures the family gives (and the threads), so the repeated blocks
of a network are timed once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np
import onnx

from .bench import default_threads, time_sessions, timing_session
from .progress import Phase

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64}

ModelBuilder = Callable[[], onnx.ModelProto]


class Measurer:
    """Times single-layer models side by side; caches ratios by signature."""

    def __init__(self, threads: int | None = None, runs: int = 30, warmup: int = 5):
        self.threads = threads or default_threads()
        self.runs = runs
        self.warmup = warmup
        self.cache: dict[tuple, float] = {}
        #: advanced after each timing that was not cached (:mod:`sconv_onnx.progress`)
        self.progress: Phase | None = None

    def ratios(self, original: tuple[Hashable, ModelBuilder],
               variants: list[tuple[Hashable, ModelBuilder]]) -> list[float]:
        """Time of each variant over the original's.

        ``original`` and each variant are ``(signature, build)``: ``build()``
        makes the model, called only when the signature's ratio is not cached.
        """
        key, build_original = original
        missing = [(sig, build) for sig, build in variants
                   if (key, sig, self.threads) not in self.cache]
        if missing:
            model = build_original()
            sessions = [timing_session(m, self.threads)
                        for m in [model, *(build() for _, build in missing)]]
            seconds = time_sessions(sessions, _random_feeds(sessions), self.runs, self.warmup)
            for (sig, _), row in zip(missing, seconds[1:]):
                self.cache[(key, sig, self.threads)] = float(np.median(row / seconds[0]))
            if self.progress is not None:
                self.progress.advance()
        return [self.cache[(key, sig, self.threads)] for sig, _ in variants]


def _random_feeds(sessions) -> list[dict]:
    """Per session, a seeded random array for each of its inputs."""
    rng = np.random.default_rng(0)
    return [
        {inp.name: rng.uniform(-1, 1, inp.shape).astype(_ORT_FLOATS[inp.type])
         for inp in sess.get_inputs()}
        for sess in sessions
    ]


__all__ = ["Measurer"]
