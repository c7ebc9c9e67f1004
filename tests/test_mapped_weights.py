"""A model's external data read in place: ``load_model(path, mapped=True)`` (issue 16).

``optimize`` on a path leaves the weights in the input's data file: the graph view's
constants are read-only views of its pages, released between layers, and every
writer (a session's copy, the saved model, a layer check's model) copies the bytes
from the file.  Nothing may reach onnxruntime or the output still pointing at the
input's file.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_external_data import _conv_chain, _save_external

from sconv_onnx import modelio
from sconv_onnx import view as view_module
from sconv_onnx.api import analyze, distances, optimize
from sconv_onnx.cli import main
from sconv_onnx.modelio import load_model, mapped_array, mapped_file, save_model
from sconv_onnx.runtime import run
from sconv_onnx.view import ModelView


def _output(model, feeds: dict) -> np.ndarray:
    """The model's one output on ``feeds``."""
    return next(iter(run(model, feeds).values()))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


@pytest.fixture(autouse=True)
def _map_any_size(monkeypatch):
    """Models map their external data above LARGE_MODEL_BYTES: these small ones too."""
    monkeypatch.setattr(modelio, "LARGE_MODEL_BYTES", 0)


@pytest.fixture()
def chain(tmp_path):
    """A 4-conv chain saved with external data: (path, its weights as loaded)."""
    model = _conv_chain(32, 3, "SRSR")
    weights = _weights(model)
    return _save_external(model, tmp_path / "chain.onnx"), weights


def test_mapped_tensors_point_at_the_file_and_read_in_place(chain):
    path, weights = chain
    model = load_model(path, mapped=True)
    mapped = [tensor for tensor in model.graph.initializer if mapped_file(tensor)]
    assert len(mapped) == 4  # the four conv weights (36 KiB each; external from 1 KiB)
    for tensor in mapped:
        assert os.path.isabs(mapped_file(tensor))
        assert not tensor.raw_data
    view = ModelView.of(model, {"x": (1, 32, 8, 8)})
    assert list(view.mappings) == [mapped_file(mapped[0])]  # one mapping for the one file
    constants = {tensor.name: tensor for tensor in view.graph.tensors().values()
                 if tensor.name in weights}
    for name, values in weights.items():
        read = constants[name].values
        assert np.array_equal(read, values)
        if any(tensor.name == name for tensor in mapped):
            assert not read.flags.writeable  # the file's pages, read-only
            with pytest.raises(ValueError):
                read[(0,) * read.ndim] = 1.0


def test_a_mapped_model_runs_and_saves_as_the_loaded_one(chain, tmp_path):
    """Sessions go through a copy with the bytes (never bytes pointing at the input), and
    a save, with external data or as one message, holds the weights itself."""
    path, weights = chain
    mapped, loaded = load_model(path, mapped=True), load_model(path)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32, 8, 8)).astype(np.float32)}
    expected = _output(loaded, feeds)
    assert np.array_equal(_output(mapped, feeds), expected)
    one, split = tmp_path / "one.onnx", tmp_path / "split.onnx"
    save_model(mapped, one)
    data = save_model(mapped, split, external_data=True)
    assert data is not None and data.parent == tmp_path
    for written in (one, split):
        model = onnx.load(str(written))
        assert not any(mapped_file(tensor) for tensor in modelio.iter_tensors(model))
        assert _weights(model).keys() == weights.keys()
        for name, value in _weights(model).items():
            assert np.array_equal(value, weights[name])
    os.remove(path.with_name(path.name + ".data"))  # the outputs stand alone
    for written in (one, split):
        assert np.array_equal(_output(written, feeds), expected)


def test_small_and_attribute_tensors_are_read_at_load(tmp_path, capsys):
    """Only initializers of at least 1 KiB that numpy reads are mapped: a small bias (shape
    inference may read such values) and a ``Constant`` node's value are read into the
    model at load, and such a model optimizes."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    table = rng.standard_normal((1, 256)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(table, "t")),
         helper.make_node("Add", ["x", "t"], ["s"]),
         helper.make_node("Gemm", ["s", "w", "b"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "attr.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="attr.onnx.data", size_threshold=0)  # every tensor external
    loaded = load_model(path, mapped=True)
    stored = {tensor.name: tensor for tensor in modelio.iter_tensors(loaded)}
    assert mapped_file(stored["w"])
    for name in ("b", "t"):
        assert not mapped_file(stored[name])
        assert stored[name].data_location == TensorProto.DEFAULT
    assert main(["optimize", str(path), str(tmp_path / "out.onnx"), "-q"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_unmappable_external_tensors_are_read_at_load(tmp_path):
    """A bfloat16 tensor (no numpy dtype to map) is read into the model at load."""
    values = np.arange(1024, dtype=np.float32).reshape(32, 32)
    bf16 = helper.make_tensor("b", TensorProto.BFLOAT16, values.shape, bytes(2048), raw=True)
    f32 = numpy_helper.from_array(values, "f")
    graph = helper.make_graph([helper.make_node("Identity", ["f"], ["y"]),
                               helper.make_node("Identity", ["b"], ["z"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 32]),
                               helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [32, 32])],
                              [f32, bf16])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save_external(model, tmp_path / "m.onnx")
    loaded = {tensor.name: tensor for tensor in load_model(path, mapped=True).graph.initializer}
    assert mapped_file(loaded["f"])
    assert not mapped_file(loaded["b"]) and loaded["b"].data_location == TensorProto.DEFAULT
    assert loaded["b"].raw_data == bytes(2048)


def test_released_pages_leave_resident_memory(tmp_path):
    """Reading a mapped weight makes its pages resident; :meth:`ModelView.release_pages`
    drops them again (above LARGE_MODEL_BYTES of mapped weights)."""
    status = "/proc/self/status"
    if not os.path.exists(status):
        pytest.skip("needs Linux's /proc to read resident memory")

    def resident() -> int:
        with open(status) as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS"))

    values = np.random.default_rng(0).standard_normal((96, 2**18)).astype(np.float32)  # 96 MiB
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, values.shape)],
                              [numpy_helper.from_array(values, "w")])
    path = _save_external(helper.make_model(graph), tmp_path / "big.onnx")
    del values, graph
    view = ModelView.of(load_model(path, mapped=True), {})
    weight = view.graph.tensors()["w"].values
    before = resident()
    assert float(np.abs(weight).sum()) > 0  # touches every page
    touched = resident()
    view.release_pages()
    released = resident()
    size = weight.nbytes
    assert touched - before > 0.8 * size
    assert touched - released > 0.8 * size


def test_optimize_with_nothing_rewritten_writes_the_weights_itself(chain, tmp_path, capsys):
    """With no rewrite the written model is the analysed one, whose weights are still the
    input's file: the output must hold them, not point there."""
    path, weights = chain
    out = tmp_path / "same.onnx"
    assert main(["optimize", str(path), str(out), "--families", "igc", "-q"]) == 0
    written = onnx.load(str(out))
    assert not any(tensor.data_location == TensorProto.EXTERNAL
                   for tensor in modelio.iter_tensors(written))
    for name, value in _weights(written).items():
        assert np.array_equal(value, weights[name])


def test_the_api_returns_a_model_holding_its_weights(chain):
    """``optimize(path)`` hands back a model that stands alone, rewritten or not: none of
    its tensors points at the input's file."""
    path, weights = chain
    for families in ("igc", "box"):
        model, report = optimize(str(path), families=families)
        assert bool(report.plan.rewritten) == (families == "box")
        assert not any(tensor.data_location == TensorProto.EXTERNAL
                       for tensor in modelio.iter_tensors(model))
        kept = _weights(model)
        for name in kept.keys() & weights.keys():
            assert np.array_equal(kept[name], weights[name])


def test_analyze_and_distances_read_the_weights_in_place(chain, monkeypatch):
    """``analyze`` and ``distances`` plan from the file's pages as from loaded weights."""
    path, _ = chain
    read = []

    def reading(tensor, files):
        values = mapped_array(tensor, files)
        if values is not None:
            read.append(tensor.name)
        return values

    monkeypatch.setattr(view_module, "mapped_array", reading)
    mapped_plan = analyze(str(path))
    mapped_distances = [d.residual for d in distances(str(path), "c=C/2")]
    assert len(read) == 8  # the four weights, read in place by each
    monkeypatch.setattr(modelio, "LARGE_MODEL_BYTES", 2**40)  # loaded, as small models are
    loaded_plan = analyze(str(path))
    assert [(layer.key, layer.chosen and layer.chosen.label) for layer in mapped_plan.layers] == [
        (layer.key, layer.chosen and layer.chosen.label) for layer in loaded_plan.layers]
    assert mapped_distances == [d.residual for d in distances(str(path), "c=C/2")]
    assert mapped_plan.rewritten
