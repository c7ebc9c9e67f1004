"""The command line: contract, exit codes, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import one_line_error, run_cli
from conv_models import ConvSpec, make_model
from onnx import TensorProto, helper
from sconv_onnx.models import demo_cnn


@pytest.fixture
def demo_path(tmp_path):
    path = tmp_path / "demo.onnx"
    onnx.save(demo_cnn.build(), str(path))
    return path


def test_optimize_writes_a_smaller_verified_model_and_a_json_report(tmp_path, demo_path, capsys):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "optimize", demo_path, out, "--report", report_path)
    assert code == 0
    assert "PASS" in stdout and "rewrite" in stdout
    new = onnx.load(str(out))
    onnx.checker.check_model(new)
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is True
    assert report["verification"]["max_rel_error"] < 1e-5
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["macs"] < report["before"]["macs"]
    layers = report["plan"]["layers"]
    assert {layer["decision"] for layer in layers} == {"rewrite", "keep"}
    assert all(layer["reason"] for layer in layers)
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_analyze_prints_table_and_json(demo_path, capsys):
    code, stdout, _ = run_cli(capsys, "analyze", demo_path)
    assert code == 0
    header = stdout.splitlines()[0].split()
    assert header[:6] == ["node", "op", "family", "weight", "structure", "residual"]
    assert stdout.splitlines()[2].split()[:3] == ["conv3", "Conv", "box"]
    assert "TOTAL" in stdout
    code, stdout, _ = run_cli(capsys, "analyze", demo_path, "--json", "--tol", "1e-3")
    plan = json.loads(stdout)
    assert plan["tol"] == 1e-3
    assert plan["layers"][1]["best"]["label"] == "c=16 n=2x2"
    assert plan["layers"][1]["best"]["family"] == "box" and plan["families"] == ["box", "igc", "csg", "lowrank"]
    assert plan["totals"]["rewritten"] == sum(layer["decision"] == "rewrite" for layer in plan["layers"])


def test_verify_command_passes_and_fails(tmp_path, demo_path, capsys):
    out = tmp_path / "out.onnx"
    assert run_cli(capsys, "optimize", demo_path, out, "--quiet")[0] == 0
    code, stdout, _ = run_cli(capsys, "verify", demo_path, out)
    assert code == 0 and "PASS" in stdout
    other = tmp_path / "other.onnx"
    onnx.save(demo_cnn.build(seed=1), str(other))
    code, _, err = run_cli(capsys, "verify", demo_path, other)
    assert code == 1
    assert "outputs differ" in one_line_error(err)


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, demo_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = run_cli(capsys, "optimize", demo_path, out, "--tol", "0.9", "--select", "all",
                        "--max-error", "1e-6", "--report", report)
    assert code == 1
    assert "verification failed" in one_line_error(err)
    assert sorted(os.listdir(tmp_path)) == ["demo.onnx"]


def test_loose_tolerance_reports_error_without_bound(tmp_path, demo_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, _ = run_cli(capsys, "optimize", demo_path, out, "--tol", "0.9", "--select", "all")
    assert code == 0 and out.exists()
    assert "UNBOUNDED: max rel error" in stdout and "checked against NO bound" in stdout
    assert "PASS" not in stdout


def test_no_verify_skips_onnxruntime(tmp_path, demo_path, capsys):
    code, stdout, _ = run_cli(capsys, "optimize", demo_path, tmp_path / "o.onnx", "--no-verify")
    assert code == 0 and "verification: skipped" in stdout


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: _write(d / "notes.txt", b"this is not a model\n"), "not a valid ONNX model"),
        (lambda d: _truncated(d), "not a valid ONNX model"),
        (lambda d: d, "not a file"),
    ],
    ids=["missing", "text", "truncated", "folder"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_input, message):
    source = make_input(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "optimize", source, tmp_path / "out.onnx")
    assert code == 2
    assert message in one_line_error(err)
    assert sorted(os.listdir(tmp_path)) == before


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncated(folder):
    data = demo_cnn.build().SerializeToString()
    return _write(folder / "truncated.onnx", data[: len(data) // 2])


def test_output_in_missing_folder_or_equal_to_input_is_refused(tmp_path, demo_path, capsys):
    code, _, err = run_cli(capsys, "optimize", demo_path, tmp_path / "nope" / "out.onnx")
    assert code == 2 and "does not exist" in one_line_error(err)
    original = demo_path.read_bytes()
    for same in (demo_path, tmp_path / "." / "demo.onnx"):
        code, _, err = run_cli(capsys, "optimize", demo_path, same)
        assert code == 2 and "equals the input" in one_line_error(err)
    assert demo_path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["demo.onnx"]


def test_dynamic_dims_need_a_hint(tmp_path, capsys):
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2))
    model = make_model(spec)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param = "N", "H"
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "o.onnx")
    assert code == 2 and "--input-shape x:" in one_line_error(err)
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "o.onnx", "--input-shape", "x:2,4,x,8")
    assert code == 2 and "integers" in one_line_error(err)
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "o.onnx", "--input-shape", "y:2,4,8,8")
    assert code == 2 and "no input named 'y'" in one_line_error(err)
    code, stdout, _ = run_cli(capsys, "optimize", path, tmp_path / "o.onnx", "--select", "all",
                           "--input-shape", "x:2,4,11,8")
    assert code == 0 and "x:2,4,11,8" in stdout


def test_inputs_file_with_an_int64_scalar(tmp_path, capsys):
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2))
    model = make_model(spec)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("scale", TensorProto.INT64, []))
    graph.node.extend([
        helper.make_node("Cast", ["scale"], ["scale_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["z", "scale_f"], ["scaled"]),
    ])
    graph.output[0].CopyFrom(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [1, 4, 8, 8]))
    path, npz = tmp_path / "m.onnx", tmp_path / "in.npz"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.savez(npz, x=x, scale=np.array(3, dtype=np.int64))
    code, stdout, _ = run_cli(capsys, "optimize", path, tmp_path / "o.onnx", "--select", "all",
                           "--inputs", npz)
    assert code == 0 and "PASS" in stdout
    np.savez(npz, x=x)
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "o2.onnx", "--inputs", npz)
    assert code == 2 and "no array named 'scale'" in one_line_error(err)
    assert not (tmp_path / "o2.onnx").exists()


def test_demo_runs_and_shows_the_tables(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "demo", "--out", tmp_path)
    assert code == 0
    assert "PASS" in stdout and "MACs" in stdout
    assert (tmp_path / "demo_cnn.sconv.onnx").exists()


def test_console_script_and_module_entry_points(tmp_path):
    script = Path(sys.executable).with_name("sconv-onnx")  # installed beside this Python
    for command in ([str(script)], [sys.executable, "-m", "sconv_onnx"]):
        done = subprocess.run(command + ["optimize", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 2
        assert done.stderr.strip() == f"sconv-onnx: error: {tmp_path / 'missing.onnx'}: no such file"
        assert done.stdout == ""


def _conv_model_with(extra_nodes, opsets=(("", 17),)):
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2))
    model = make_model(spec)
    model.graph.node.extend(extra_nodes)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets)
    return model


@pytest.mark.parametrize(
    "model, message",
    [
        (_conv_model_with([helper.make_node("Relu", ["nowhere"], ["dangling"])]), "invalid ONNX model"),
        (_conv_model_with([helper.make_node("Foo", ["z"], ["w"], domain="com.example")]),
         "invalid ONNX model"),
        (_conv_model_with([helper.make_node("Foo", ["z"], ["w"], domain="com.example")],
                          opsets=(("", 17), ("com.example", 1))),
         "onnxruntime cannot run the input model"),
    ],
    ids=["checker-invalid", "custom-domain-without-opset", "custom-op-unknown-to-onnxruntime"],
)
def test_invalid_or_unrunnable_models_are_bad_input(tmp_path, capsys, model, message):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "out.onnx", "--select", "all")
    assert code == 2
    assert message in one_line_error(err)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize(
    "hint, message",
    [("x:1,4,8", "rank 3 but the model declares rank 4"), ("x:1,5,8,8", "dim 1 is 5"),
     ("x:1,4,0,8", "positive"), ("x", "expected NAME:D1,D2")],
)
def test_wrong_input_shape_hints_are_bad_input(tmp_path, demo_path, capsys, hint, message):
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2))
    path = tmp_path / "m.onnx"
    onnx.save(make_model(spec), str(path))
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "o.onnx", "--input-shape", hint)
    assert code == 2 and message in one_line_error(err)
