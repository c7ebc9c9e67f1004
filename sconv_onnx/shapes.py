"""Input shapes: ``--input-shape`` hints, ``--inputs`` files, shape inference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import InputError
from .modelio import weightless


def parse_shape_hint(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:D1,D2,..`` (the last ``:`` separates name and dims)."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise InputError(f"--input-shape {text!r}: expected NAME:D1,D2,.. e.g. x:1,3,224,224")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise InputError(f"--input-shape {text!r}: dims must be integers") from None
    if any(d <= 0 for d in shape):
        raise InputError(f"--input-shape {text!r}: dims must be positive")
    return name, shape


def parse_shape_hints(texts) -> dict[str, tuple[int, ...]]:
    """Parse every ``--input-shape`` hint into ``{name: shape}``."""
    hints: dict[str, tuple[int, ...]] = {}
    for text in texts or ():
        name, shape = parse_shape_hint(text) if isinstance(text, str) else text
        hints[name] = tuple(shape)
    return hints


def load_inputs_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise InputError(f"--inputs {path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"--inputs {path}: not a readable .npz file ({exc})") from None


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's real inputs (not initializers listed as inputs, IR < 4 style)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def declared_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims as declared: an int when static, the symbol or None when not."""
    if not value.type.HasField("tensor_type"):
        return []
    shape = value.type.tensor_type.shape
    dims: list[int | str | None] = []
    for dim in shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


@dataclass
class ResolvedShapes:
    """Concrete input shapes and how each was decided (for the report)."""

    shapes: dict[str, tuple[int, ...]]
    notes: list[str]


def resolve_input_shapes(
    model: onnx.ModelProto,
    hints: dict[str, tuple[int, ...]] | None = None,
    feeds: dict[str, np.ndarray] | None = None,
    strict: bool = True,
) -> ResolvedShapes:
    """Concrete shapes for every model input.

    Order of precedence: arrays in ``feeds``, then ``hints``, then the
    declared static dims.  A dynamic leading dim of a rank >= 2 input is the
    batch and defaults to 1 (noted).  Any other dynamic dim without a hint is
    an :class:`InputError` when ``strict`` (verification needs it), and is
    left out of the result otherwise.
    """
    hints = dict(hints or {})
    feeds = feeds or {}
    inputs = graph_inputs(model)
    names = {inp.name for inp in inputs}
    for name in list(hints) + list(feeds):
        if name not in names:
            raise InputError(f"model has no input named {name!r} (inputs: {', '.join(sorted(names))})")
    shapes: dict[str, tuple[int, ...]] = {}
    notes: list[str] = []
    for inp in inputs:
        dims = declared_dims(inp)
        if inp.name in feeds:
            shape = tuple(feeds[inp.name].shape)
        elif inp.name in hints:
            shape = hints[inp.name]
            if dims and len(shape) != len(dims):
                raise InputError(
                    f"--input-shape {inp.name}: rank {len(shape)} but the model declares rank {len(dims)}"
                )
            clash = [i for i, (d, h) in enumerate(zip(dims, shape)) if isinstance(d, int) and d != h]
            if clash:
                raise InputError(
                    f"--input-shape {inp.name}: dim {clash[0]} is {shape[clash[0]]} but the model "
                    f"fixes it to {dims[clash[0]]}"
                )
        else:
            resolved = []
            missing = []
            for axis, dim in enumerate(dims):
                if isinstance(dim, int):
                    resolved.append(dim)
                elif axis == 0 and len(dims) >= 2:
                    resolved.append(1)
                    notes.append(f"{inp.name}: dynamic batch dim {dim or '?'} set to 1")
                else:
                    missing.append(f"dim {axis} ({dim or '?'})")
            if missing:
                if strict:
                    example = ",".join(str(d) if isinstance(d, int) else "N" for d in dims)
                    raise InputError(
                        f"input {inp.name!r} has dynamic {', '.join(missing)}; give "
                        f"--input-shape {inp.name}:{example} with N replaced by sizes"
                    )
                continue
            shape = tuple(resolved)
        shapes[inp.name] = shape
    return ResolvedShapes(shapes, notes)


def set_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Make the inputs of ``model`` (modified in place) declare the given concrete shapes."""
    for inp in model.graph.input:
        if inp.name in shapes and inp.type.HasField("tensor_type"):
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for size in shapes[inp.name]:
                shape.dim.add().dim_value = size


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs declare the given concrete shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    set_input_shapes(fixed, shapes)
    return fixed


def infer_tensor_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, list[int | str | None]]:
    """Shapes of every tensor that onnx shape inference can tell (main graph).

    ``input_shapes`` (``{name: shape}``) replace the declared input shapes.
    Inference runs on a :func:`~sconv_onnx.modelio.weightless` copy: onnx's
    ``infer_shapes`` serializes its argument and parses the result back, so
    on the model itself it would hold the weights three more times and fail
    above 2 GiB.  Small tensors (shapes, axes) stay in the copy for the ops
    whose output shape depends on their values.
    """
    skeleton = weightless(model).model
    if input_shapes:
        set_input_shapes(skeleton, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; callers cope with unknowns
        inferred = skeleton
    graph = inferred.graph
    shapes: dict[str, list[int | str | None]] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = declared_dims(value)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes
