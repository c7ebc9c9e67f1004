"""Verification: the inputs both models run on (the user's, checked, or random ones),
and how their outputs are compared.

Running them is :mod:`sconv_onnx.runtime`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .errors import InputError, first_line, param
from .shapes import check_generated_size, graph_inputs, load_inputs_file
from .structure import is_finite


@dataclass
class OutputError:
    """Difference of one output: ``max|y0 - y1|`` and that over ``max|y0|`` (finite entries).

    ``problem`` says why the output cannot count as matching whatever the
    bound (shapes differ, a NaN, an infinity in one model only); both
    errors are then infinite.
    """

    name: str
    max_abs: float
    max_rel: float
    problem: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Seeded inputs: floats uniform in [-1, 1), integers in [0, 4), booleans at random.

    Shapes whose arrays would not fit in memory are refused before any is made
    (:func:`~sconv_onnx.shapes.check_generated_size`).
    """
    rng = np.random.default_rng(seed)
    inputs = graph_inputs(model)
    for inp in inputs:
        elem = inp.type.tensor_type.elem_type if inp.type.HasField("tensor_type") else 0
        if elem in (0, onnx.TensorProto.STRING):
            raise InputError(f"input {inp.name!r} is not a numeric tensor; give real data with "
                             f"{param('inputs')}")
        if inp.name not in shapes:
            raise InputError(f"input {inp.name!r} has dynamic dims; give {param('input_shapes')} "
                             f"or {param('inputs')}")
    check_generated_size(model, shapes)
    feeds = {}
    for inp in inputs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        shape = shapes[inp.name]
        if dtype == np.bool_:
            feeds[inp.name] = np.asarray(rng.random(shape) < 0.5)  # an array even for shape ()
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            feeds[inp.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    return feeds


def user_feeds(model: onnx.ModelProto, source, setting: str = "inputs") -> dict[str, np.ndarray]:
    """The user's arrays for ``model``'s inputs from ``source``, a path to an ``.npz`` (only
    the arrays the model takes are read) or a mapping, checked (:func:`check_feeds`)."""
    if isinstance(source, (str, os.PathLike)):
        source = load_inputs_file(source, setting)
    return check_feeds(model, source, setting)


def check_feeds(model: onnx.ModelProto, feeds, setting: str = "inputs") -> dict[str, np.ndarray]:
    """The arrays of ``feeds`` (a mapping by name) for ``model``'s inputs, checked.

    Each is looked up once (an :class:`~sconv_onnx.shapes.NpzArrays` reads
    only those); arrays of other names are ignored.  ``setting``
    (``"inputs"`` or ``"calib_data"``) is the setting named in messages.
    """
    if not isinstance(feeds, Mapping):
        raise InputError(f"{param(setting)} must be a path to an .npz or a dict of arrays, "
                         f"not {type(feeds).__name__}")
    checked = {}
    for inp in graph_inputs(model):
        if inp.name not in feeds:
            raise InputError(f"{param(setting)} has no array named {inp.name!r} "
                             f"(it has: {', '.join(sorted(map(str, feeds))) or 'none'})")
        checked[inp.name] = feed_array(inp, feeds[inp.name], f"{param(setting)} {inp.name!r}")
    return checked


def feed_array(inp: onnx.ValueInfoProto, value, where: str) -> np.ndarray:
    """``value`` as the array the input ``inp`` takes: of its dtype, finite when floating,
    text as the object array of ``str`` onnxruntime wants.  ``where`` starts messages."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where} is not an array ({first_line(exc)})") from None
    elem = inp.type.tensor_type.elem_type if inp.type.HasField("tensor_type") else 0
    if elem == onnx.TensorProto.STRING:
        return string_array(array, where)
    want = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else None
    if want is not None and array.dtype != want:
        raise InputError(f"{where} has dtype {array.dtype}, the model wants {np.dtype(want)}")
    if not is_finite(array):
        raise InputError(f"{where} holds NaN/Inf values; give finite numbers")
    return array


def string_array(array: np.ndarray, where: str) -> np.ndarray:
    """``array`` of text (unicode, bytes, or objects that are either) as an object array of
    ``str``, what onnxruntime takes for a STRING input; bytes are decoded as UTF-8."""
    if array.dtype.kind == "U":
        return array.astype(object)
    if array.dtype.kind not in "SO":
        raise InputError(f"{where} has dtype {array.dtype}, the model wants strings")
    try:
        values = [value.decode("utf-8") if isinstance(value, bytes) else value for value in array.flat]
    except UnicodeDecodeError:
        raise InputError(f"{where} holds bytes that are not UTF-8 text") from None
    if not all(isinstance(value, str) for value in values):
        raise InputError(f"{where} holds values that are not strings")
    texts = np.empty(len(values), dtype=object)
    texts[:] = values
    return texts.reshape(array.shape)


def compare_outputs(reference: dict, candidate: dict) -> list[OutputError]:
    """Per-output errors of ``candidate`` against ``reference``.

    Nothing non-finite passes unnoticed: a NaN in either output, or an
    infinity where the other model has a different value, is a ``problem``
    (NaN compares unequal to everything, so a NaN never "matches").  Equal
    infinities count as equal; the scale ``max|y0|`` is over the finite
    entries.
    """
    return [_compare(name, y0, candidate[name]) for name, y0 in reference.items()]


def _compare(name: str, y0, y1) -> OutputError:
    a = np.asarray(y0)
    b = np.asarray(y1)
    if a.shape != b.shape:
        return _failed(name, f"shapes differ: {a.shape} against {b.shape}")
    if a.dtype.kind not in "biufc" or b.dtype.kind not in "biufc":
        same = bool(np.array_equal(a, b))
        return OutputError(name, 0.0 if same else math.inf, 0.0 if same else math.inf,
                           None if same else "non-numeric values differ")
    if np.iscomplexobj(a) or np.iscomplexobj(b):  # both parts count
        a, b = (np.stack([np.real(v), np.imag(v)]) for v in (a, b))
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if np.isnan(a).any():
        return _failed(name, "the original model's output holds NaN: nothing to compare it "
                             "with (verify on inputs where it is finite)")
    if np.isnan(b).any():
        return _failed(name, "the rewritten model's output holds NaN")
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite], b[~finite]):
        return _failed(name, "infinities differ")
    diff = np.abs(a[finite] - b[finite])
    max_abs = float(diff.max(initial=0.0))
    scale = float(np.abs(a[finite]).max(initial=0.0))
    if scale > 0:
        return OutputError(name, max_abs, max_abs / scale)
    return OutputError(name, max_abs, 0.0 if max_abs == 0 else math.inf)


def _failed(name: str, problem: str) -> OutputError:
    return OutputError(name, math.inf, math.inf, problem)
