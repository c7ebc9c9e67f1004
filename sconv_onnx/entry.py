"""The ``sconv-onnx`` console entry point: signal handling first, then the command line.

Importing :mod:`sconv_onnx.cli` loads onnx and onnxruntime (about a second):
SIGTERM is turned into :class:`~sconv_onnx.errors.Terminated` before that, and
an interrupt during it ends with one line, like one at any later point.
"""

from __future__ import annotations

import signal
import sys

from .errors import Terminated, stopped


def _terminate(signum, _frame) -> None:
    raise Terminated(signum)


def _signal_in(exc: BaseException) -> BaseException | None:
    """The interrupt or termination among the causes of ``exc``, if any."""
    while exc is not None:
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Install the SIGTERM handler, load the command line and run it; the exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from .cli import main as command_line
    except (KeyboardInterrupt, Terminated) as exc:
        return stopped(exc)
    except ImportError as exc:  # onnxruntime re-raises an interrupt of its init as this
        signalled = _signal_in(exc)
        if signalled is None:
            raise
        return stopped(signalled)
    return command_line(argv)


if __name__ == "__main__":
    sys.exit(main())
