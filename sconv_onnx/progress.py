"""Progress bars and log lines on stderr, for the phases that can take more than a second.

Two channels, both on stderr (stdout stays the command's result):

* **Log lines** through :mod:`logging`, logger ``"sconv_onnx"``: each phase
  that ends normally logs ``"<phase>: <items> in <seconds> s"`` at INFO; the
  structure search logs each family's sites, candidates and seconds at
  DEBUG.  A library user sets levels and handlers as for any library; the
  command line (:func:`configure`) maps ``-q`` to ERROR, the default to
  WARNING, ``-v`` to INFO and ``-vv`` to DEBUG, with one handler of its own
  on stderr (the logger then stops propagating, so a line is not printed
  twice).
* **Bars** (tqdm): one per phase, drawn only when bars are on (the command
  line turns them on when stderr is a terminal and ``-q`` is not given) and
  only once the phase has run :data:`BAR_DELAY` seconds, so short phases
  stay silent.  A library user gets none unless they call :func:`configure`.

Phases: the structure search (sites), calibration (sites), candidate timing
for ``select="measured"`` (layers), the budget's end-to-end trials, the
whole-model check, verification (per-layer checks, then the outputs) and
benchmark rounds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

LOG = logging.getLogger("sconv_onnx")
#: Seconds a phase runs before its bar is drawn.
BAR_DELAY = 1.0
#: The command line's verbosity (``-q`` = -1, default 0, ``-v`` 1, ``-vv`` 2) -> log level.
LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}

_bars = False


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is logged (a test's
    capture, a redirected stream), not the one it was made with, above any bar being
    drawn (``tqdm.write``)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure(verbosity: int = 0, bars: bool | None = None) -> None:
    """Set the ``sconv_onnx`` logger's level from ``verbosity`` (:data:`LEVELS`; above 2 is
    DEBUG) with one stderr handler, and turn bars on or off (None: on when stderr is a
    terminal and ``verbosity >= 0``)."""
    global _bars
    LOG.setLevel(LEVELS[max(-1, min(2, verbosity))])
    if not any(isinstance(handler, _Stderr) for handler in LOG.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("sconv-onnx: %(message)s"))
        LOG.addHandler(handler)
        LOG.propagate = False
    _bars = (verbosity >= 0 and _is_terminal(sys.stderr)) if bars is None else bars


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Phase:
    """A running phase: ``advance()`` after each item; ``note(text)`` for the bar's tail."""

    def __init__(self, name: str, total: int | None, unit: str):
        self.name, self.unit, self.count = name, unit, 0
        self._bar = tqdm(total=total, desc=name, unit=f" {unit}", file=sys.stderr, leave=False,
                         delay=BAR_DELAY, disable=not _bars, dynamic_ncols=True)

    def advance(self, items: int = 1) -> None:
        self.count += items
        self._bar.update(items)

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._bar.close()


@contextmanager
def phase(name: str, total: int | None = None, unit: str = "items") -> Iterator[Phase]:
    """A phase of ``total`` ``unit`` (None: unknown): its bar while it runs, its log line
    (INFO) when it ends, with the items done (when any were counted) and the seconds."""
    started = time.perf_counter()
    running = Phase(name, total, unit)
    try:
        yield running
    finally:
        running.close()
    seconds = time.perf_counter() - started
    if running.count:
        LOG.info("%s: %d %s in %.1f s", name, running.count, unit, seconds)
    else:
        LOG.info("%s: %.1f s", name, seconds)


def track(items: Iterable, name: str, total: int | None = None, unit: str = "items"):
    """``items``, with a :func:`phase` advanced for each."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with phase(name, total, unit) as running:
        for item in items:
            yield item
            running.advance()


__all__ = ["BAR_DELAY", "LOG", "Phase", "configure", "phase", "track"]
