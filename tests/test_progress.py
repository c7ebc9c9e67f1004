"""Progress and logging on stderr (sconv_onnx.progress, issue 15 item 1): log lines per
phase at -v, nothing at the default when stderr is not a terminal, bars on a terminal
for phases longer than the delay, -q silences both; usage, versions and the demo's
clean-up."""

import argparse
import logging
import tempfile

import onnx
import pytest
from sconv_onnx.models import demo_cnn

from sconv_onnx import progress
from sconv_onnx.cli import _build_parser, main


@pytest.fixture
def demo_path(tmp_path):
    path = tmp_path / "demo.onnx"
    onnx.save(demo_cnn.build(), str(path))
    return path


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    progress.configure(0, bars=False)


def test_verbose_logs_each_phase_with_its_time(demo_path, tmp_path, capsys):
    assert main(["optimize", str(demo_path), str(tmp_path / "out.onnx"), "-v"]) == 0
    err = capsys.readouterr().err
    for phase in ("structure search", "layer checks", "verification"):
        assert f"sconv-onnx: {phase}:" in err
    assert "sites in" in err and err.rstrip().endswith(" s")


def test_very_verbose_adds_each_familys_search(demo_path, capsys):
    assert main(["analyze", str(demo_path), "-vv"]) == 0
    err = capsys.readouterr().err
    for family in ("box", "igc", "csg", "lowrank"):
        assert f"sconv-onnx:   {family}: " in err and " candidates in " in err


def test_default_and_quiet_print_nothing_on_a_pipe(demo_path, tmp_path, capsys):
    assert main(["analyze", str(demo_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "conv" in captured.out
    assert main(["optimize", str(demo_path), str(tmp_path / "out.onnx"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and len(captured.out.splitlines()) == 1  # the summary line
    assert progress.LOG.level == logging.ERROR


def test_bars_are_drawn_on_a_terminal_once_a_phase_runs_past_the_delay(monkeypatch, capsys):
    progress.configure(0, bars=True)
    monkeypatch.setattr(progress, "BAR_DELAY", 0.0)
    with progress.phase("structure search", 3, "sites") as running:
        for _ in range(3):
            running.advance()
    err = capsys.readouterr().err
    assert "structure search" in err and "/3 " in err and "sites" in err
    monkeypatch.setattr(progress, "BAR_DELAY", 60.0)  # a short phase: no bar at all
    with progress.phase("verification") as running:
        running.advance()
    assert capsys.readouterr().err == ""


def test_verbose_and_quiet_together_is_a_usage_error(demo_path, capsys):
    assert main(["analyze", str(demo_path), "-v", "-q"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_bare_command_prints_usage_and_version_prints_dependencies(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sconv-onnx") and "optimize" in err and "demo" in err
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    for name in ("sconv-onnx", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "python"):
        assert any(line.split()[0] == name for line in out.splitlines()), name


def test_every_argument_has_help():
    """Every option and positional argument of every command says what it is for."""
    parser = _build_parser()
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest}: no help"


def test_demo_removes_its_temporary_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "-q"]) == 0
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    assert main(["demo", "-q", "--out", str(kept)]) == 0
    assert sorted(p.name for p in kept.iterdir()) == ["demo_cnn.onnx", "demo_cnn.sconv.onnx"]
