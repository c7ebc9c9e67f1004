"""Issue 11, the verdict and the files: every rewritten layer checked on its own (untaken
``If`` branches, loop bodies), no PASS without a bound or with a NaN, valid JSON, output
paths checked before any work, signals and concurrent writers leave no wrong files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from cli_helpers import one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper
from sconv_onnx.models import demo_cnn

import sconv_onnx
from sconv_onnx import modelio
from sconv_onnx.errors import InputError, Terminated, VerificationError, first_line
from sconv_onnx.passes import Family, LayerInfo, Site, register, unregister
from sconv_onnx.passes.graphs import constant_value
from sconv_onnx.plan import Candidate, Part
from sconv_onnx.report import json_text
from sconv_onnx.verify import compare_outputs

# --- a family whose rewrite is wrong, in a part of the model the inputs do not reach -------


@dataclass(kw_only=True)
class _NodeSite(Site):
    node: gs.Node
    weight: np.ndarray


class _Doubler(Family):
    """Rewrites every MatMul whose node name starts with ``broken`` into one with twice
    its weight: a wrong rewrite that claims to be exact."""

    name = "doubler"
    description = "test: a wrong rewrite"

    def find(self, view):
        sites = []
        for _, node in view.nodes():
            weight = constant_value(node.inputs[1]) if node.op == "MatMul" else None
            if weight is not None and node.name.startswith("broken"):
                info = LayerInfo(node.outputs[0].name, node.name, node.op, weight.shape,
                                 params_before=weight.size)
                sites.append(_NodeSite(family=self.name, layers=(info,), node=node, weight=weight))
        return sites

    def candidates(self, site, tol):
        part = Part("doubled", site.weight.size, (), None)
        return [Candidate(self.name, "doubled", 0.0, (part,), rounding_depth=4)]

    def emit(self, site, candidate, emitter):
        node, at = emitter.node(site.node), emitter.at(site.node, site.node.name)
        node.inputs[1] = at.constant("w", 2 * site.weight)


@pytest.fixture
def doubler():
    family = register(_Doubler())
    yield family.name
    unregister(family.name)


def _matmul_graph(name: str, source: str, weight: str) -> onnx.GraphProto:
    out = f"{name}_out"
    return helper.make_graph([helper.make_node("MatMul", [source, weight], [out], name=name)],
                             name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4])])


def _if_model() -> onnx.ModelProto:
    """``If(true)``: the then branch (healthy) runs, the else branch (``broken``) never does."""
    weights = [numpy_helper.from_array(np.eye(4, dtype=np.float32) * k, f"w{k}") for k in (1, 3)]
    cond = helper.make_node("Constant", [], ["cond"],
                            value=numpy_helper.from_array(np.array(True)))
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=_matmul_graph("fine", "x", "w1"),
                              else_branch=_matmul_graph("broken", "x", "w3"))
    graph = helper.make_graph([cond, branch], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _loop_model() -> onnx.ModelProto:
    """A ``Loop`` that runs zero times; its body holds the ``broken`` MatMul."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "w"], ["v_out"], name="broken_body")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])])
    consts = [numpy_helper.from_array(np.array(0, np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "go"),
              numpy_helper.from_array(np.eye(4, dtype=np.float32) * 3, "w")]
    loop = helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)
    graph = helper.make_graph([loop], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make", [_if_model, _loop_model], ids=["untaken If branch", "Loop body"])
def test_a_wrong_rewrite_where_the_inputs_never_reach_fails(make, doubler, tmp_path, capsys):
    model = make()
    with pytest.raises(VerificationError, match="broken.* alone: max rel error 1, bound 0.001") as raised:
        sconv_onnx.optimize(model, families=doubler, select="all")
    report = raised.value.report
    assert report.errors[0].max_rel == 0.0  # end to end, nothing differs: the layer is not run
    (check,) = report.layer_checks
    assert check.status == "FAIL" and check.error.max_rel == pytest.approx(1.0)
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    code, _, err = run_cli(capsys, "optimize", source, out, "--families", doubler, "--select", "all")
    assert code == 1 and "alone" in one_line_error(err) and not out.exists()


def test_a_layer_named_like_one_in_a_sibling_branch_is_never_passed(doubler):
    """Sibling ``If`` branches may both make a tensor ``t``: the check cannot tell the two
    layers apart, so it fails rather than compare the healthy one with itself."""
    def branch(name: str, weight: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", weight], ["t"], name=name)],
                                 name, [], [helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                          [1, 4])])
    model = _if_model()
    model.graph.node[1].attribute[0].g.CopyFrom(branch("broken", "w3"))  # else: same name t
    model.graph.node[1].attribute[1].g.CopyFrom(branch("fine", "w1"))
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(VerificationError, match="made in more than one subgraph"):
        sconv_onnx.optimize(model, families=doubler, select="all")


def test_a_subgraph_layer_nothing_checked_fails_the_run():
    from sconv_onnx.layercheck import LayerCheck, Region
    from sconv_onnx.plan import LayerPlan
    from sconv_onnx.report import Report

    _, report = sconv_onnx.optimize(demo_cnn.build())
    layer = LayerPlan("conv", "Conv", (4, 4, 3, 3), key="y")
    unchecked = LayerCheck(layer, Region("y", problem="onnxruntime cannot run the layer alone"),
                           Region("y"), 1e-3)
    for in_subgraph, status in ((False, "PASS"), (True, "FAIL")):
        unchecked.in_subgraph = in_subgraph
        fabricated = Report(report.plan, report.before, report.after, errors=report.errors,
                            max_error=1e-3, layer_checks=[unchecked])
        assert unchecked.status == "UNCHECKED" and fabricated.status == status


def test_the_outcome_of_an_unverified_run_says_so():
    _, report = sconv_onnx.optimize(demo_cnn.build(), verify=False)
    assert report.status == "SKIPPED" and report.outcome() == "not verified (verify)"


def test_every_rewritten_layer_is_checked_alone_and_passes(tmp_path):
    _, report = sconv_onnx.optimize(demo_cnn.build())
    assert [check.layer.key for check in report.layer_checks] == [
        layer.key for layer in report.plan.rewritten]
    assert all(check.status == "PASS" for check in report.layer_checks)
    assert all(check.error.max_rel < 1e-5 for check in report.layer_checks)
    assert report.status == "PASS" and report.to_dict()["verification"]["layers"]


# --- comparisons: NaN never matches, infinities only themselves -------------------------------


def test_a_nan_anywhere_fails_the_comparison():
    good = np.arange(6, dtype=np.float32).reshape(2, 3)
    late_nan = good.copy()
    late_nan[1, 2] = np.nan  # not the first entry: max() used to drop it
    (error,) = compare_outputs({"y": good}, {"y": late_nan})
    assert error.problem and math.isinf(error.max_rel)
    all_nan = np.full((2, 3), np.nan, np.float32)
    (error,) = compare_outputs({"y": all_nan}, {"y": all_nan})
    assert error.problem.startswith("the original model's output holds NaN")
    inf = good.copy()
    inf[0, 0] = np.inf
    assert compare_outputs({"y": inf}, {"y": inf})[0].problem is None
    assert compare_outputs({"y": inf}, {"y": good})[0].problem == "infinities differ"
    complex_values = np.array([1 + 1j, 2 + 0j])
    (error,) = compare_outputs({"z": complex_values}, {"z": complex_values.real + 0j})
    assert error.max_abs == 1.0  # the imaginary parts count


def test_the_json_report_is_valid_json_with_infinite_errors(tmp_path):
    text = json_text({"max_rel": math.inf, "nested": [math.nan, -math.inf, 1.5]})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "max_rel": "inf", "nested": ["nan", "-inf", 1.5]}


# --- the verdict: PASS only with a bound ------------------------------------------------------


def test_without_a_bound_the_verdict_is_unbounded_not_pass(tmp_path, capsys):
    source, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(demo_cnn.build(), str(source))
    code, stdout, _ = run_cli(capsys, "optimize", source, out, "--tol", "0.9", "--select", "all",
                              "--report", report)
    assert code == 0 and "PASS" not in stdout
    assert "UNBOUNDED: max rel error" in stdout.splitlines()[-1]
    verification = json.loads(report.read_text())["verification"]
    assert verification["status"] == "UNBOUNDED" and verification["passed"] is False
    _, api_report = sconv_onnx.optimize(demo_cnn.build(), tol=0.9, select="all")
    assert api_report.status == "UNBOUNDED" and not api_report.verified


# --- output paths: checked before any work ----------------------------------------------------


def test_report_path_equal_to_out_or_in_is_refused_before_any_work(tmp_path, capsys):
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(demo_cnn.build(), str(source))
    original = source.read_bytes()
    for report in (out, source, tmp_path / "." / "out.onnx"):
        code, stdout, err = run_cli(capsys, "optimize", source, out, "--report", report)
        assert code == 2 and stdout == ""
        assert "refusing to overwrite" in one_line_error(err) or "two outputs" in one_line_error(err)
    assert source.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_a_report_named_like_the_old_data_file_cannot_clobber_the_weights(tmp_path, capsys):
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(demo_cnn.build(), str(source))
    report = tmp_path / "out.onnx.data"  # where the weights used to go
    code, _, _ = run_cli(capsys, "optimize", source, out, "--external-data", "--report", report,
                         "--quiet")
    assert code == 0 and json.loads(report.read_text())["verification"]["status"] == "PASS"
    assert modelio.referenced_files(out) != [report.name]
    assert run_cli(capsys, "verify", source, out)[0] == 0  # the weights are intact


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a folder no one can write: /proc")
def test_unwritable_output_or_report_is_refused_before_any_work(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(demo_cnn.build(), str(source))
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "optimize", source, "/proc/out.onnx")
    assert code == 2 and "cannot write in /proc" in one_line_error(err)
    code, _, err = run_cli(capsys, "optimize", source, tmp_path / "out.onnx", "--report",
                           "/proc/r.json")
    assert code == 2 and "cannot write in /proc" in one_line_error(err)
    assert time.perf_counter() - started < 1.0  # refused before the model was read
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_demo_out_on_an_existing_file_is_bad_input(tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--out", existing)
    assert code == 2 and "--out takes a folder" in one_line_error(err)
    assert existing.read_text() == "mine"


# --- settings: API names, bounds that mean something -----------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"max_error": math.nan}, "max_error"), ({"max_error": -1.0}, "max_error"),
    ({"threads": -1}, "threads"), ({"tol": math.inf}, "tol"), ({"select": "fast"}, "select"),
])
def test_api_settings_are_checked_and_named_as_parameters(kwargs, name):
    with pytest.raises(InputError) as raised:
        sconv_onnx.optimize(demo_cnn.build(), **kwargs)
    assert str(raised.value).startswith(f"{name} ") and "--" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_api_refuses_a_model_that_is_neither_proto_nor_path():
    with pytest.raises(InputError, match="expected an onnx.ModelProto or a path"):
        sconv_onnx.optimize(123)


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_cli_max_error_must_be_a_finite_bound(value, tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(demo_cnn.build(), str(source))
    for command in (["optimize", source, tmp_path / "o.onnx"], ["verify", source, source]):
        code, _, err = run_cli(capsys, *command, "--max-error", value)
        assert code == 2 and "--max-error must be a finite number" in one_line_error(err)
    assert not (tmp_path / "o.onnx").exists()


def test_one_line_errors_keep_the_useful_tail():
    message = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: "
               "image for the following indices\n index: 2 Got: 32 Expected: 48\n"
               " Please fix either the inputs/outputs or the model.")
    line = first_line(RuntimeError(message))
    assert "\n" not in line and "index: 2 Got: 32 Expected: 48" in line
    long = first_line(RuntimeError("x" * 2000 + " the end"), limit=100)
    assert len(long) <= 100 and long.endswith("the end")


# --- signals, pipes, killed and concurrent writers ---------------------------------------------


def _cli(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sconv_onnx", *map(str, args)],
                            stderr=subprocess.PIPE, text=True, **popen)


def test_a_closed_stdout_ends_quietly(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(demo_cnn.build(), str(source))
    process = _cli("analyze", source, stdout=subprocess.PIPE)
    process.stdout.close()  # like `| head -1` once it has its line
    _, err = process.communicate(timeout=120)
    assert err == "" and process.returncode == 141


_START_THEN_RUN = """
import sys
from sconv_onnx.entry import main
sys.stderr.write("ready\\n")
sys.stderr.flush()
sys.exit(main(["families"]))
"""


@pytest.mark.parametrize("delay", [0.02, 0.2])
def test_an_interrupt_during_start_up_is_one_line(delay):
    """While onnx and onnxruntime load (the command line's start-up; the interpreter's own,
    before any of the program runs, is Python's)."""
    process = subprocess.Popen([sys.executable, "-c", _START_THEN_RUN], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline() == "ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err
    assert (process.returncode, err) in ((0, ""), (130, "sconv-onnx: interrupted\n"))


def test_sigterm_ends_with_143_and_one_line(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(demo_cnn.build(), str(source))
    process = _cli("optimize", source, tmp_path / "out.onnx", "--bench", "--runs", "100000",
                   stdout=subprocess.DEVNULL)
    time.sleep(4)  # well into the run (the benchmark runs long)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err.strip() == "sconv-onnx: terminated"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_signal_during_the_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def killed(self, model_file, data_file, location, sync=True):
        data_file.write_bytes(b"partial")
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(modelio.Weightless, "write", killed)
    with pytest.raises(Terminated):
        modelio.save_model(demo_cnn.build(), tmp_path / "out.onnx", external_data=True)
    assert os.listdir(tmp_path) == []


def test_temporaries_of_killed_runs_are_recognised_and_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = modelio._owner().rpartition("-")[0]
    stale = [tmp_path / f".out.onnx.sconv-{host}-{dead}-0123456789ab.tmp",  # the model's
             tmp_path / f".out.onnx.1a2b3c4d.data.sconv-{host}-{dead}-0123456789ab.tmp"]
    kept = [tmp_path / f".out.onnx.sconv-{modelio._owner()}-0123456789ab.tmp",  # still writing
            tmp_path / f".out.onnx.sconv-otherhost-{dead}-0123456789ab.tmp",  # can't tell
            tmp_path / f".out.onnx.sconv-{host}-{'9' * 30}-0123456789ab.tmp"]  # not a pid
    for path in stale + kept:
        path.write_bytes(b"left by a SIGKILL")
    modelio.save_model(demo_cnn.build(), tmp_path / "out.onnx", external_data=True)
    data = modelio.referenced_files(tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in kept] + ["out.onnx", *data])


def test_concurrent_writers_never_pair_one_model_with_the_others_data(tmp_path):
    models = []
    for scale in (1.0, 2.0):
        model = demo_cnn.build()
        for init in model.graph.initializer:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, init.name))
        models.append(model)
    out = tmp_path / "out.onnx"
    for _ in range(5):
        threads = [threading.Thread(target=modelio.save_model, args=(m, out, True)) for m in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        written = modelio.load_model(out)
        values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
        assert any(all(np.array_equal(values[t.name], numpy_helper.to_array(t))
                       for t in model.graph.initializer) for model in models)
