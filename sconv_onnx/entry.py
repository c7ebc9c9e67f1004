"""The ``sconv-onnx`` console entry point: signal handling first, then the command line.

Importing :mod:`sconv_onnx.cli` loads onnx and onnxruntime (about a second).
A SIGINT or SIGTERM during that import is held until it ends, then ends the
run with one line, like one at any later point: raised at once, an interrupt
can land in a callback of the import machinery, where Python prints it as an
ignored exception with a traceback and carries on.  After the import, SIGTERM
raises :class:`~sconv_onnx.errors.Terminated`.
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
    """Load the command line with signals held, install the SIGTERM handler, run it; the
    exit code."""
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: held.append(signum))
    try:
        from .cli import main as command_line
    except (KeyboardInterrupt, Terminated) as exc:
        return stopped(exc)
    except ImportError as exc:  # onnxruntime re-raises an interrupt of its init as this
        signalled = _signal_in(exc)
        if signalled is None:
            raise
        return stopped(signalled)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        signal.signal(signal.SIGTERM, _terminate)
    if held:
        return stopped(KeyboardInterrupt() if held[0] == signal.SIGINT else Terminated(held[0]))
    return command_line(argv)


if __name__ == "__main__":
    sys.exit(main())
