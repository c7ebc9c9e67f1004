"""Verification: the inputs both models run on, and how their outputs are compared.

Running them is :mod:`sconv_onnx.runtime`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .errors import InputError
from .shapes import graph_inputs


@dataclass
class OutputError:
    """Difference of one output: ``max|y0 - y1|`` and that over ``max|y0|``."""

    name: str
    max_abs: float
    max_rel: float

    def to_dict(self) -> dict:
        return asdict(self)


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Seeded inputs: floats uniform in [-1, 1), integers in [0, 4), booleans at random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in graph_inputs(model):
        elem = inp.type.tensor_type.elem_type if inp.type.HasField("tensor_type") else 0
        if elem in (0, onnx.TensorProto.STRING) or not inp.type.HasField("tensor_type"):
            raise InputError(f"input {inp.name!r} is not a numeric tensor; give real data with --inputs")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        shape = shapes[inp.name]
        if dtype == np.bool_:
            feeds[inp.name] = np.asarray(rng.random(shape) < 0.5)  # an array even for shape ()
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            feeds[inp.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    return feeds


def check_feeds(model: onnx.ModelProto, feeds: dict) -> dict:
    """Check user-given arrays against the model's inputs (names and dtypes)."""
    for inp in graph_inputs(model):
        if inp.name not in feeds:
            raise InputError(f"--inputs has no array named {inp.name!r}")
        elem = inp.type.tensor_type.elem_type
        want = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else None
        have = np.asarray(feeds[inp.name]).dtype
        if want is not None and have != want:
            raise InputError(f"--inputs {inp.name!r} has dtype {have}, the model wants {np.dtype(want)}")
    return {inp.name: np.asarray(feeds[inp.name]) for inp in graph_inputs(model)}


def compare_outputs(reference: dict, candidate: dict) -> list[OutputError]:
    """Per-output errors of ``candidate`` against ``reference`` (NaNs must match)."""
    errors = []
    for name, y0 in reference.items():
        y1 = candidate[name]
        a = np.asarray(y0, dtype=np.float64)
        b = np.asarray(y1, dtype=np.float64)
        if a.shape != b.shape:
            errors.append(OutputError(name, float("inf"), float("inf")))
            continue
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a - b))
        max_abs = float(np.nanmax(diff, initial=0.0)) if not np.isnan(diff).any() else float("inf")
        scale = float(np.max(np.abs(np.where(np.isnan(a), 0.0, a)), initial=0.0))
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        errors.append(OutputError(name, max_abs, max_rel))
    return errors

