"""Exceptions that map to the CLI's exit codes (0 ok, 1 verification failed, 2 bad input),
and how their messages name settings and quote other libraries' errors."""

from __future__ import annotations

import contextvars
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: The command's name, in its messages.
PROG = "sconv-onnx"


class SconvError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 2


class InputError(SconvError, ValueError):
    """Bad input or usage: missing or invalid model, bad shape hint, bad path, bad setting.

    A ``ValueError`` too, so that code catching that keeps working.
    """

    exit_code = 2


class VerificationError(SconvError):
    """Verification failed: the rewritten model's outputs differ from the original's
    beyond the bound (or hold a NaN), or a rewritten layer does beyond its own.

    ``report`` holds the full report (plan and measured errors) so callers can
    still inspect what was tried; no model is written.
    """

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class Terminated(BaseException):
    """A termination signal (SIGTERM) turned into an exception, so that ``finally``
    blocks remove temporary files; like ``KeyboardInterrupt``, not an ``Exception``."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def stopped(exc: BaseException) -> int:
    """Say in one line that the run was interrupted (``KeyboardInterrupt``: SIGINT) or
    terminated (:class:`Terminated`); the exit code, 128 + the signal's number."""
    if isinstance(exc, Terminated):
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + exc.signum
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130


# --- naming settings: API parameter or CLI flag ---------------------------------------------

_ON_COMMAND_LINE = contextvars.ContextVar("sconv_onnx_on_command_line", default=False)
#: API parameters whose command-line flag is not the parameter's name with dashes
_FLAGS = {"input_shapes": "--input-shape", "verify": "--no-verify"}


def param(name: str) -> str:
    """How an error message names the setting ``name`` (an API parameter name).

    ``calib_data`` in the Python API; ``--calib-data`` while the command
    line runs (:func:`command_line_names`).
    """
    if not _ON_COMMAND_LINE.get():
        return name
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


@contextmanager
def command_line_names() -> Iterator[None]:
    """Within this block, :func:`param` names settings by their command-line flags."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def first_line(exc: BaseException, limit: int = 600) -> str:
    """An exception's message as one line (onnxruntime's and protobuf's span several).

    Lines are joined with " | " and runs of spaces collapsed, so that the
    useful tail (onnxruntime's "index: 2 Got: 32 Expected: 48") is kept;
    above ``limit`` characters the middle is cut, never the end.
    """
    text = str(exc).strip() or type(exc).__name__
    text = " | ".join(part for part in (re.sub(r"\s+", " ", line).strip()
                                        for line in text.splitlines()) if part)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
