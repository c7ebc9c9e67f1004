"""Helpers for tests that drive the command line."""

from sconv_onnx.cli import main


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``sconv-onnx ARGV``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The single ``sconv-onnx: error: ...`` line of ``err`` (asserted: one line, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("sconv-onnx: error: ")
    return lines[0]
