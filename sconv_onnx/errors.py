"""Exceptions that map to the CLI's exit codes (0 ok, 1 verification failed, 2 bad input)."""

from __future__ import annotations


class SconvError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 2


class InputError(SconvError):
    """Bad input or usage: missing or invalid model, bad shape hint, bad path."""

    exit_code = 2


class VerificationError(SconvError):
    """The rewritten model's outputs differ from the original beyond the bound.

    ``report`` holds the full report (plan and measured errors) so callers can
    still inspect what was tried; no model is written.
    """

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (onnxruntime's and protobuf's can be long)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
