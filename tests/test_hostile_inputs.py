"""The user's input arrays (``--inputs`` / ``--calib-data``, ``inputs=`` / ``calib_data=``)
and shape hints, when hostile or careless: each is refused with one line (exit 2), never a
traceback or an exit 3, and the message names the setting as the user gave it."""

import io
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import one_line_error, run_cli
from conv_models import ConvSpec, make_model
from onnx import TensorProto, helper

import sconv_onnx
from sconv_onnx.errors import InputError
from sconv_onnx.verify import check_feeds

#: (CLI flag, API parameter) of the two settings that take arrays
SETTINGS = [("--inputs", "inputs"), ("--calib-data", "calib_data")]
SETTING_IDS = ["inputs", "calib_data"]


def conv_model(dynamic_spatial: bool = False) -> onnx.ModelProto:
    """A small Conv on ``x`` (N x 4 x 8 x 8, dynamic batch; H and W dynamic too if asked)."""
    spec = ConvSpec(in_per_group=4, out_channels=4, group=1, kernel=(3, 3), spatial=(8, 8),
                    pads=(1, 1, 1, 1), sizes=(2, 2, 2), dynamic_batch=True)
    model = make_model(spec)
    if dynamic_spatial:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


def images(samples: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((samples, 4, 8, 8)).astype(np.float32)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(path))
    return path


def cli_error(capsys, tmp_path, model_path, flag: str, source) -> str:
    """The one-line error of ``optimize MODEL OUT FLAG SOURCE``, asserted to exit 2 and
    write nothing."""
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, out, flag, source)
    line = one_line_error(err)
    assert code == 2, err
    assert not out.exists()
    return line


def api_error(parameter: str, source, **settings) -> str:
    """The message of the :class:`InputError` that ``sconv_onnx.optimize`` raises, asserted to
    name the API parameter (not a command-line flag)."""
    with pytest.raises(InputError) as caught:
        sconv_onnx.optimize(conv_model(), **{parameter: source}, **settings)
    message = str(caught.value)
    assert parameter in message and "--" not in message and "\n" not in message
    return message


def write_member(path, name: str, data: bytes) -> None:
    """An ``.npz``-like zip holding one member ``name`` with the bytes ``data``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, data)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file."""
    with io.BytesIO() as buffer:
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return buffer.getvalue()


def npy_header_only(shape: tuple[int, ...], data: bytes) -> bytes:
    """A ``.npy`` whose header declares a float32 array of ``shape`` but holds only ``data``."""
    with io.BytesIO() as buffer:
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
        return buffer.getvalue() + data


# --- 1. NaN and Inf --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag, parameter", SETTINGS, ids=SETTING_IDS)
def test_non_finite_arrays_in_a_file_are_refused(tmp_path, model_path, capsys, flag, parameter, bad):
    x = images()
    x[1, 2, 3, 4] = bad
    npz = tmp_path / "bad.npz"
    np.savez(npz, x=x)
    line = cli_error(capsys, tmp_path, model_path, flag, npz)
    assert f"{flag} 'x' holds NaN/Inf values" in line
    assert "'x' holds NaN/Inf values" in api_error(parameter, npz)


@pytest.mark.parametrize("parameter", ["inputs", "calib_data"])
def test_non_finite_arrays_in_a_dict_are_refused(parameter):
    x = images()
    x[0, 0, 0, 0] = np.nan
    assert f"{parameter} 'x' holds NaN/Inf values" in api_error(parameter, {"x": x})


# --- 2. files that are not an .npz -----------------------------------------------------------

def _npy_file(path):
    with open(path, "wb") as file:  # np.save(path) would add ".npy" to the name
        np.save(file, images())


def _empty_file(path):
    path.write_bytes(b"")


def _text_file(path):
    path.write_text("x = 1, 2, 3\n")


def _zip_of_text(path):
    write_member(path, "x.npy", b"not an array at all, just text")


NOT_NPZ = [(_npy_file, "a .npy file (one array), not an .npz"), (_empty_file, "the file is empty"),
           (_text_file, "not an .npz file"), (_zip_of_text, "array 'x': not a .npy array")]
NOT_NPZ_IDS = ["npy", "empty", "text", "zip-not-npz"]


@pytest.mark.parametrize("write, message", NOT_NPZ, ids=NOT_NPZ_IDS)
@pytest.mark.parametrize("flag, parameter", SETTINGS, ids=SETTING_IDS)
def test_files_that_are_not_an_npz_are_bad_input(tmp_path, model_path, capsys, flag, parameter,
                                                 write, message):
    source = tmp_path / "data.npz"
    write(source)
    line = cli_error(capsys, tmp_path, model_path, flag, source)
    assert f"{flag} {source}" in line and message in line
    assert message in api_error(parameter, source)


@pytest.mark.parametrize("flag, parameter", SETTINGS, ids=SETTING_IDS)
def test_pickled_object_arrays_stay_refused(tmp_path, model_path, capsys, flag, parameter):
    npz = tmp_path / "objects.npz"
    np.savez(npz, x=np.array([{"a": 1}, None], dtype=object))
    assert "pickled" in cli_error(capsys, tmp_path, model_path, flag, npz)
    assert "pickled" in api_error(parameter, npz)


# --- 3. a header that declares more than the member holds ------------------------------------

@pytest.mark.parametrize("flag, parameter", SETTINGS, ids=SETTING_IDS)
def test_a_member_declaring_a_huge_array_is_refused_before_allocating(
        tmp_path, model_path, capsys, flag, parameter):
    npz = tmp_path / "huge.npz"
    write_member(npz, "x.npy", npy_header_only((100000, 100000, 10), bytes(16)))  # 373 GiB
    line = cli_error(capsys, tmp_path, model_path, flag, npz)
    assert "array 'x': declares 400000000000 bytes (100000x100000x10 float32), holds 16" in line
    assert "declares 400000000000 bytes" in api_error(parameter, npz)


# --- 4. only the arrays the model takes are read ---------------------------------------------

def _npz_with_a_broken_unused_array(path, x: np.ndarray) -> None:
    """``x`` and an ``unused`` member that cannot be read (its data is cut short)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_bytes(x))
        archive.writestr("unused.npy", npy_header_only((1000,), bytes(8)))


def test_inputs_file_reads_only_the_models_inputs(tmp_path, model_path, capsys):
    npz = tmp_path / "in.npz"
    _npz_with_a_broken_unused_array(npz, images(1))
    code, stdout, err = run_cli(capsys, "verify", model_path, model_path, "--inputs", npz)
    assert code == 0 and "PASS" in stdout, err
    errors, _ = sconv_onnx.verify_models(conv_model(), conv_model(), inputs=npz)
    assert errors[0].max_abs == 0


def test_calibration_file_reads_only_the_models_inputs(tmp_path, model_path, capsys):
    npz = tmp_path / "calib.npz"
    _npz_with_a_broken_unused_array(npz, images(3))
    code, _, err = run_cli(capsys, "analyze", model_path, "--calib-data", npz, "--json")
    assert code == 0, err


# --- 5. messages name the setting as given ---------------------------------------------------

@pytest.mark.parametrize("flag, parameter", SETTINGS, ids=SETTING_IDS)
def test_a_missing_array_names_the_setting(tmp_path, model_path, capsys, flag, parameter):
    npz = tmp_path / "other.npz"
    np.savez(npz, y=images())
    assert f"{flag} has no array named 'x' (it has: y)" in cli_error(capsys, tmp_path, model_path, flag, npz)
    assert f"{parameter} has no array named 'x'" in api_error(parameter, {"y": images()})


@pytest.mark.parametrize("flag, parameter", SETTINGS, ids=SETTING_IDS)
def test_a_wrong_dtype_names_the_setting(tmp_path, model_path, capsys, flag, parameter):
    npz = tmp_path / "f64.npz"
    np.savez(npz, x=images().astype(np.float64))
    line = cli_error(capsys, tmp_path, model_path, flag, npz)
    assert f"{flag} 'x' has dtype float64, the model wants float32" in line
    assert f"{parameter} 'x' has dtype float64" in api_error(parameter, npz)


def test_calibration_messages_name_calib_data_in_the_api():
    assert "calib_data 'x' has shape 2x4x8" in api_error("calib_data", {"x": images()[:, :, :, 0]})
    ragged = {"x": images(2), "y": images(3)}
    model = conv_model()
    model.graph.input.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]))
    model.graph.node.append(helper.make_node("Add", ["x", "y"], ["s"]))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 4, 8, 8]))
    with pytest.raises(InputError, match="^calib_data arrays must all have the same leading"):
        sconv_onnx.optimize(model, calib_data=ragged)


def test_shape_hint_messages_name_input_shapes_in_the_api():
    assert "input_shapes x: rank 3" in api_error("input_shapes", ["x:1,4,8"])
    assert "input_shapes 'x:1,4,0,8': dims must be positive" in api_error("input_shapes", ["x:1,4,0,8"])


@pytest.mark.parametrize("shapes, message", [({"x": (1, 4, -8, 8)}, "x: dims must be positive"),
                                            ({"x": (1, 4, 8.5, 8)}, "expected 'NAME:D1,D2,..'")])
def test_input_shapes_given_as_a_dict_are_checked(shapes, message):
    assert message in api_error("input_shapes", shapes)


# --- 6. shape hints whose inputs cannot fit in memory ----------------------------------------

HUGE_HINTS = ["x:1,4,10000000,10000000", f"x:1,4,{2**40},{2**40}", f"x:1,4,{10**20},8"]


@pytest.mark.parametrize("hint", HUGE_HINTS, ids=["petabytes", "int64-overflow", "dim-above-int64"])
def test_a_huge_input_shape_is_refused_before_allocating(tmp_path, capsys, hint):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_model(dynamic_spatial=True), str(path))
    code, _, err = run_cli(capsys, "verify", path, path, "--input-shape", hint)
    line = one_line_error(err)
    assert code == 2 and (f"--input-shape {hint}:" in line or f"--input-shape {hint!r}:" in line)
    assert "above the cap of" in line or "below 2**63" in line
    with pytest.raises(InputError, match="^input_shapes x:1,4,10000000,10000000: .* above the cap of"):
        sconv_onnx.verify_models(conv_model(True), conv_model(True), input_shapes=[HUGE_HINTS[0]])


# --- 7. string inputs ------------------------------------------------------------------------

def string_model() -> onnx.ModelProto:
    """``e = Equal(s, ["a", "x"])``: a STRING input whose values decide the output."""
    known = helper.make_tensor("k", TensorProto.STRING, [2], [b"a", b"x"])
    graph = helper.make_graph(
        [helper.make_node("Equal", ["s", "k"], ["e"])], "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("e", TensorProto.BOOL, [2])], [known])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


@pytest.mark.parametrize("texts", [np.array(["a", "b"]), np.array([b"a", b"b"]),
                                   np.array([b"a", "b"], dtype=object)],
                         ids=["unicode", "bytes", "objects"])
def test_string_inputs_take_unicode_and_bytes_arrays(tmp_path, capsys, texts):
    model = string_model()
    feeds = check_feeds(model, {"s": texts})
    assert feeds["s"].dtype == object and list(feeds["s"]) == ["a", "b"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, feeds)[0].tolist() == [True, False]
    errors, _ = sconv_onnx.verify_models(model, model, inputs={"s": texts})
    assert errors[0].max_abs == 0
    if texts.dtype != object:
        path, npz = tmp_path / "s.onnx", tmp_path / "s.npz"
        onnx.save(model, str(path))
        np.savez(npz, s=texts)
        code, stdout, err = run_cli(capsys, "verify", path, path, "--inputs", npz)
        assert code == 0 and "PASS" in stdout, err


def test_string_inputs_refuse_bytes_that_are_not_utf8():
    with pytest.raises(InputError, match="^inputs 's' holds bytes that are not UTF-8 text$"):
        sconv_onnx.verify_models(string_model(), string_model(), inputs={"s": np.array([b"a", b"\xff"])})
