"""The JSON outputs follow the schema shipped with the package (sconv_onnx/report.schema.json,
issue 15): optimize --report (with and without --bench, verified or not), analyze --json
and bench --json; each carries the schema version and the tool's and libraries' versions."""

import json

import jsonschema
import onnx
import pytest
from sconv_onnx.models import demo_cnn

from sconv_onnx.cli import main
from sconv_onnx.report import SCHEMA_VERSION, schema


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "demo.onnx"
    onnx.save(demo_cnn.build(), str(path))
    return path


def _validator(definition: str | None = None):
    full = schema()
    jsonschema.Draft202012Validator.check_schema(full)
    target = full if definition is None else {**full["$defs"][definition], "$defs": full["$defs"]}
    return jsonschema.Draft202012Validator(target)


def _report(demo, tmp_path, *extra) -> dict:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["optimize", str(demo), str(out), "--report", str(report), "-q", *extra]) == 0
    return json.loads(report.read_text())


def test_an_optimize_report_with_its_benchmark_follows_the_schema(demo, tmp_path):
    data = _report(demo, tmp_path, "--bench", "--runs", "5", "--warmup", "1")
    _validator().validate(data)
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data["tool"]["dependencies"]) >= {"onnx", "onnxruntime", "numpy", "python"}
    assert [timing["name"] for timing in data["bench"]["timings"]] == ["original", "rewritten"]
    kept = [layer for layer in data["plan"]["layers"] if layer["decision"] == "keep"]
    assert kept and all(layer["params_after"] is None and layer["macs_after"] is None
                        for layer in kept)
    assert data["verification"]["status"] == "PASS"


def test_unverified_and_unbounded_reports_follow_the_schema(demo, tmp_path):
    unverified = _report(demo, tmp_path, "--no-verify")
    _validator().validate(unverified)
    assert unverified["verification"] is None and unverified["bench"] is None
    unbounded = _report(demo, tmp_path, "--tol", "0.01")
    _validator().validate(unbounded)
    assert unbounded["verification"]["status"] == "UNBOUNDED"


def test_analyze_and_bench_json_follow_their_parts_of_the_schema(demo, capsys):
    assert main(["analyze", str(demo), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    _validator("plan").validate(plan)
    assert plan["schema_version"] == SCHEMA_VERSION
    assert main(["bench", str(demo), "--runs", "3", "--warmup", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    _validator("bench").validate(bench)
    assert bench["tool"]["name"] == "sconv-onnx"


def test_the_schema_rejects_a_report_that_breaks_it(demo, tmp_path):
    data = _report(demo, tmp_path)
    broken = json.loads(json.dumps(data))
    del broken["plan"]["layers"][0]["decision"]
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(broken)
    kept = next(layer for layer in data["plan"]["layers"] if layer["decision"] == "keep")
    kept["params_after"] = 1  # a kept layer has no rewrite to count
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(data)
