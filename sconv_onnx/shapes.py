"""Input shapes: ``--input-shape`` hints, ``--inputs`` files, shape inference, and the
memory cap on the inputs a run makes or reads."""

from __future__ import annotations

import math
import operator
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import InputError, first_line, param
from .modelio import weightless

#: Fraction of physical memory that the inputs of one run (generated or read) may take.
MEMORY_FRACTION = 0.5
#: The cap where physical memory is unknown (bytes).
FALLBACK_CAP = 16 * 2**30
#: Dims are stored as int64 in the model.
MAX_DIM = 2**63 - 1


def parse_shape_hint(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:D1,D2,..`` (the last ``:`` separates name and dims)."""
    name, sep, dims = text.rpartition(":")
    where = f"{param('input_shapes')} {text!r}"
    if not sep or not name:
        raise InputError(f"{where}: expected NAME:D1,D2,.. e.g. x:1,3,224,224")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise InputError(f"{where}: dims must be integers") from None
    return name, check_dims(shape, where)


def shape_pair(entry) -> tuple[str, tuple[int, ...]]:
    """A ``(name, dims)`` entry of the API's ``input_shapes`` (a dict's item), checked."""
    try:
        name, dims = entry
        shape = tuple(operator.index(d) for d in dims)
    except (TypeError, ValueError):
        raise InputError(f"{param('input_shapes')} {entry!r}: expected 'NAME:D1,D2,..' "
                         f"or (name, dims)") from None
    return str(name), check_dims(shape, f"{param('input_shapes')} {name}")


def check_dims(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """``shape``, refused unless every dim is positive and fits the model's int64."""
    if any(d <= 0 for d in shape):
        raise InputError(f"{where}: dims must be positive")
    if any(d > MAX_DIM for d in shape):
        raise InputError(f"{where}: dims must be below 2**63")
    return shape


def parse_shape_hints(texts) -> dict[str, tuple[int, ...]]:
    """Parse every ``--input-shape`` hint (or ``(name, dims)`` pair) into ``{name: shape}``."""
    hints: dict[str, tuple[int, ...]] = {}
    for text in [texts] if isinstance(texts, str) else texts or ():
        name, shape = parse_shape_hint(text) if isinstance(text, str) else shape_pair(text)
        hints[name] = shape
    return hints


def memory_cap() -> tuple[int, str]:
    """``(bytes, how it was set)``: what the inputs of one run may take together,
    :data:`MEMORY_FRACTION` of physical memory (:data:`FALLBACK_CAP` where unknown)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        physical = 0
    if physical <= 0:
        return FALLBACK_CAP, "fixed: physical memory unknown"
    return int(physical * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of physical memory"


def gib(size: int) -> str:
    """A byte count in GiB, for messages."""
    return f"{size / 2**30:.3g} GiB"


def over_cap(size: int) -> str | None:
    """Why ``size`` bytes of inputs are too many (``"above the cap of .."``), or None."""
    cap, how = memory_cap()
    return f"above the cap of {gib(cap)} ({how})" if size > cap else None


class NpzArrays(Mapping):
    """The arrays of an ``.npz`` file by name, each read when looked up.

    Only the arrays looked up are decompressed (an unused array costs
    nothing), and each one's ``.npy`` header is checked before its memory is
    allocated (:func:`read_npz_array`).  ``setting`` (``"inputs"`` or
    ``"calib_data"``) is named in messages.
    """

    def __init__(self, path: str | os.PathLike, setting: str = "inputs"):
        self.path, self.setting = path, setting
        self.members = npz_members(path, setting)

    def __getitem__(self, name: str) -> np.ndarray:
        return read_npz_array(self.path, self.members[name], self.setting)

    def __contains__(self, name: object) -> bool:
        return name in self.members

    def __iter__(self) -> Iterator[str]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


def load_inputs_file(path: str | os.PathLike, setting: str = "inputs") -> NpzArrays:
    """Arrays keyed by input name from an ``.npz`` file, read lazily (:class:`NpzArrays`).

    ``setting`` names the setting the file was given as (``"inputs"`` or
    ``"calib_data"``) in messages.
    """
    return NpzArrays(path, setting)


def npz_members(path: str | os.PathLike, setting: str) -> dict[str, zipfile.ZipInfo]:
    """The members of the ``.npz`` at ``path`` by array name (``x.npy`` holds ``x``)."""
    where = f"{param(setting)} {path}"
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except zipfile.BadZipFile:
        raise InputError(f"{where}: {not_a_zip(path)}; give an .npz of arrays keyed by input "
                         f"name (numpy.savez)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{where}: cannot be read ({first_line(exc)})") from None
    return {info.filename.removesuffix(".npy"): info for info in infos if not info.is_dir()}


def not_a_zip(path: str | os.PathLike) -> str:
    """What the file at ``path``, which is not a zip archive, is instead (for messages)."""
    with open(path, "rb") as file:
        start = file.read(len(np.lib.format.MAGIC_PREFIX))
    if not start:
        return "the file is empty"
    if start == np.lib.format.MAGIC_PREFIX:
        return "a .npy file (one array), not an .npz"
    return "not an .npz file"


def read_npz_array(path: str | os.PathLike, info: zipfile.ZipInfo, setting: str) -> np.ndarray:
    """The array of the member ``info`` of the ``.npz`` at ``path``.

    Its header is checked first (:func:`check_npy_header`), so that a
    member declaring more bytes than it holds (or than memory can) is refused
    before anything is allocated.  Object (pickled) arrays are refused.
    """
    where = f"{param(setting)} {path}: array {info.filename.removesuffix('.npy')!r}"
    try:
        with zipfile.ZipFile(path) as archive:
            with archive.open(info) as member:
                check_npy_header(member, info.file_size, where)
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{where}: too large for the memory left") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{where}: cannot be read ({first_line(exc)})") from None


def check_npy_header(member, member_size: int, where: str) -> None:
    """Check the ``.npy`` header at the start of ``member`` (a file object of
    ``member_size`` bytes, uncompressed): a plain array whose data (shape x
    itemsize bytes) the member holds, within :func:`memory_cap`."""
    try:
        version = np.lib.format.read_magic(member)
    except ValueError:
        raise InputError(f"{where}: not a .npy array") from None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise InputError(f"{where}: .npy format version {version[0]}.{version[1]} is not read; "
                         f"save it with numpy.savez")
    shape, _, dtype = readers[version](member)
    if dtype.hasobject:
        raise InputError(f"{where}: holds Python objects (pickled), which are not loaded")
    declared, holds = math.prod(shape) * dtype.itemsize, member_size - member.tell()
    described = f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"
    if declared > holds:
        raise InputError(f"{where}: declares {declared} bytes ({described}), holds {holds}")
    too_many = over_cap(declared)
    if too_many:
        raise InputError(f"{where}: declares {gib(declared)} ({described}), {too_many}")


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
    left out of the result otherwise.  When ``strict``, the inputs not in
    ``feeds`` are to be generated: shapes too large for memory are refused
    (:func:`check_generated_size`).
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
                    f"{param('input_shapes')} {inp.name}: rank {len(shape)} but the model declares "
                    f"rank {len(dims)}"
                )
            clash = [i for i, (d, h) in enumerate(zip(dims, shape)) if isinstance(d, int) and d != h]
            if clash:
                raise InputError(
                    f"{param('input_shapes')} {inp.name}: dim {clash[0]} is {shape[clash[0]]} but the "
                    f"model fixes it to {dims[clash[0]]}"
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
                        f"{param('input_shapes')} {inp.name}:{example} with N replaced by sizes"
                    )
                continue
            shape = tuple(resolved)
        shapes[inp.name] = shape
    if strict:
        check_generated_size(model, {name: shape for name, shape in shapes.items() if name not in feeds})
    return ResolvedShapes(shapes, notes)


def check_generated_size(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse input ``shapes`` whose arrays, made for ``model``'s inputs, would take more
    bytes together than :func:`memory_cap` allows; before any is made."""
    sizes = {inp.name: math.prod(shapes[inp.name]) * element_size(inp)
             for inp in graph_inputs(model) if inp.name in shapes}
    too_many = over_cap(sum(sizes.values()))
    if too_many:
        name = max(sizes, key=sizes.__getitem__)
        raise InputError(
            f"{param('input_shapes')} {name}:{','.join(map(str, shapes[name]))}: the inputs to "
            f"generate would take {gib(sum(sizes.values()))}, {too_many}")


def element_size(value: onnx.ValueInfoProto) -> int:
    """Bytes per element of a tensor input (1 when its type is not a known tensor type)."""
    elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 1
    except (KeyError, TypeError, ValueError):
        return 1


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
    values = typed_values(inferred_skeleton(model, input_shapes).graph)
    return {name: dims for name, (_, dims) in values.items() if dims is not None}


def typed_values(graph: onnx.GraphProto) -> dict[str, tuple[int, list | None]]:
    """``{name: (elem_type, dims)}`` of ``graph``'s tensors that carry a type: inputs,
    value infos, outputs and initializers (``dims`` None where the rank is unknown)."""
    values: dict[str, tuple[int, list | None]] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type"):
            tensor = value.type.tensor_type
            values[value.name] = (tensor.elem_type,
                                  declared_dims(value) if tensor.HasField("shape") else None)
    for init in graph.initializer:
        values[init.name] = (init.data_type, list(init.dims))
    return values


def known_dims(dims) -> bool:
    """Whether ``dims`` (None: unknown rank) are all concrete sizes."""
    return dims is not None and all(isinstance(dim, int) and dim >= 0 for dim in dims)


def inferred_skeleton(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> onnx.ModelProto:
    """The :func:`~sconv_onnx.modelio.weightless` copy of ``model`` with the value infos
    onnx's shape inference adds (subgraphs included), at ``input_shapes`` when given
    (see :func:`infer_tensor_shapes`); the copy as it is where inference fails."""
    skeleton = weightless(model).model
    if input_shapes:
        set_input_shapes(skeleton, input_shapes)
    try:
        return onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; callers cope with unknowns
        return skeleton
