"""Loading and saving models: clear errors on bad input, atomic writes, external data.

Large models.  A model's weights may live in external data files next to it
(read transparently, relative to the model's folder), and a model above
protobuf's 2 GiB limit (:data:`PROTOBUF_LIMIT`) cannot be serialized as one
message at all.  Nothing here serializes a whole model when it can be
avoided: the checker, shape inference and the statistics read a *weightless
copy* (:func:`weightless`: the graph with its large tensors replaced by
references to an external file), and onnxruntime reads models from a path
(:func:`external_copy`), so the weights are never held twice for those.
"""

from __future__ import annotations

import glob
import math
import mmap
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from .errors import InputError, first_line

#: Model-level fields that onnx-graphsurgeon's export does not carry over and
#: that a rewrite must keep exactly as they were (docs/DESIGN.md section 2: never
#: bump ``ir_version`` or opsets implicitly).
_MODEL_FIELDS = (
    "ir_version",
    "producer_name",
    "producer_version",
    "domain",
    "model_version",
    "doc_string",
)

#: Largest message protobuf serializes, in bytes (2 GiB - 1).  A model above
#: it is written with external data.  A module constant so that tests can
#: lower it and run the large-model branches on small models.
PROTOBUF_LIMIT = 2**31 - 1
#: Models above this serialized size in bytes count as large: onnxruntime
#: reads them from a file rather than from bytes, and ``optimize`` frees its
#: graph view before verification.  Below it a copy of the weights costs less
#: than the milliseconds those take.
LARGE_MODEL_BYTES = 64 * 2**20
#: Tensors whose raw data has at least this many bytes go to the external
#: data file; smaller ones (shapes, axes, scalars) stay in the model, where
#: shape inference reads them (onnx's own default threshold).
EXTERNAL_MIN_BYTES = 1024
#: Tensors of at least :data:`ALIGN_MIN_BYTES` start at a multiple of
#: :data:`ALIGNMENT` bytes in the data file, so that onnxruntime can
#: memory-map them (onnx's defaults: 1 MiB and the 64 KiB allocation
#: granularity of Windows, a multiple of every page size).
ALIGN_MIN_BYTES = 1024 * 1024
ALIGNMENT = 64 * 1024
#: Bits per element of the packed sub-byte types (2 or 4 elements per byte).
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}


def data_path(out_path: str | os.PathLike, token: str | None = None) -> Path:
    """The external data file written beside ``out_path``: ``<out>.<token>.data`` (a
    token unique to the write, :func:`save_model`), or ``<out>.data``."""
    out = Path(out_path)
    return out.with_name(f"{out.name}.{token}.data" if token else f"{out.name}.data")


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of ``tensor``'s raw data as its type and dims imply.

    Computed without reading the data (reading ``raw_data`` copies it).
    """
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_BITS:
        return math.ceil(count * _PACKED_BITS[tensor.data_type] / 8)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return count * itemsize


def _is_heavy(tensor: TensorProto) -> bool:
    """Whether ``tensor`` holds raw data large enough to go to an external file, or is
    mapped (:func:`mapped_file`: its data is in the input's file)."""
    return (tensor.HasField("raw_data") and tensor_nbytes(tensor) >= EXTERNAL_MIN_BYTES) or (
        mapped_file(tensor) is not None)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (an If's branches, a Loop's body)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outer before inner (the protobuf view;
    :func:`sconv_onnx.passes.graphs.walk` is the onnx-graphsurgeon one)."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for scope in graphs(graph):
        yield from scope.initializer
        for node in scope.node:
            yield from _attribute_tensors(node)


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every dense tensor of ``model``: initializers and attribute tensors, subgraphs and
    functions included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)
            for sub in subgraphs(node):
                yield from _graph_tensors(sub)


# --- the weightless copy ------------------------------------------------------------------


def _is_repeated(field_descriptor) -> bool:
    if hasattr(field_descriptor, "is_repeated"):  # protobuf >= 5.28; ``label`` is gone in 7
        return field_descriptor.is_repeated
    return field_descriptor.label == field_descriptor.LABEL_REPEATED


def _copy_fields(source, target, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of ``source`` onto ``target`` except those named in ``skip``.

    Skipped fields are never read (reading ``raw_data`` would copy it).
    """
    for descriptor in source.DESCRIPTOR.fields:
        name = descriptor.name
        if name in skip:
            continue
        if _is_repeated(descriptor):
            values = getattr(source, name)
            if values:
                getattr(target, name).extend(values)
        elif source.HasField(name):
            if descriptor.message_type is not None:
                getattr(target, name).CopyFrom(getattr(source, name))
            else:
                setattr(target, name, getattr(source, name))


def _copy_tensor(source: TensorProto, target: TensorProto, heavy: list) -> None:
    """``source`` into the empty ``target``: a stub without data when it is heavy."""
    if not _is_heavy(source):
        target.CopyFrom(source)
        return
    _copy_fields(source, target, skip=("raw_data",))
    target.data_location = TensorProto.EXTERNAL  # where: set by Weightless.write
    heavy.append((target, source))


def _copy_node(source: onnx.NodeProto, target: onnx.NodeProto, heavy: list) -> None:
    _copy_fields(source, target, skip=("attribute",))
    for attr in source.attribute:
        copy = target.attribute.add()
        _copy_fields(attr, copy, skip=("t", "tensors", "g", "graphs"))
        if attr.HasField("t"):
            _copy_tensor(attr.t, copy.t, heavy)
        for tensor in attr.tensors:
            _copy_tensor(tensor, copy.tensors.add(), heavy)
        if attr.HasField("g"):
            _copy_graph(attr.g, copy.g, heavy)
        for graph in attr.graphs:
            _copy_graph(graph, copy.graphs.add(), heavy)


def _holds_tensors(node: onnx.NodeProto) -> bool:
    return any(attr.HasField("t") or attr.tensors or attr.HasField("g") or attr.graphs
               for attr in node.attribute)


def _copy_graph(source: onnx.GraphProto, target: onnx.GraphProto, heavy: list) -> None:
    _copy_fields(source, target, skip=("initializer", "node"))
    for tensor in source.initializer:
        _copy_tensor(tensor, target.initializer.add(), heavy)
    for node in source.node:
        if _holds_tensors(node):
            _copy_node(node, target.node.add(), heavy)
        else:
            target.node.append(node)


def _set_external_data(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


@dataclass
class Weightless:
    """A copy of a model whose heavy tensors are stubs that hold no data.

    ``model`` is the copy: nodes, small tensors, value infos and metadata as
    in the original; each tensor with at least :data:`EXTERNAL_MIN_BYTES` of
    raw data is replaced by a stub (name, type, dims, external data entries).
    ``tensors`` pairs each stub with the original tensor it stands for.
    Shape inference, the checker and the statistics read the copy, so they
    never copy or serialize the weights; :meth:`write` turns it into a model
    with external data.
    """

    model: onnx.ModelProto
    tensors: list[tuple[TensorProto, TensorProto]] = field(default_factory=list)

    @property
    def serialized_size(self) -> int:
        """An upper bound of the original model's serialized size in bytes.

        The copy's size plus each heavy tensor's data and 16 bytes for its
        field tags and length prefixes; exact to a few bytes per tensor.
        """
        return self.model.ByteSize() + sum(tensor_nbytes(t) + 16 for _, t in self.tensors)

    def write(self, model_file: Path, data_file: Path, location: str, sync: bool = True) -> None:
        """Write the weights to ``data_file`` and the model, pointing at ``location``, to ``model_file``.

        One tensor's data is copied at a time.  Both files are created
        (``"xb"``: never over an existing file) and, with ``sync``, flushed
        to the disk (not for throwaway copies: an fsync costs milliseconds).
        """
        with open(data_file, "xb") as handle:
            for stub, tensor in self.tensors:
                mapped = mapped_file(tensor)
                raw = None if mapped else tensor.raw_data
                size = tensor_nbytes(tensor) if mapped else len(raw)
                if size >= ALIGN_MIN_BYTES:
                    handle.write(b"\0" * (-handle.tell() % ALIGNMENT))
                _set_external_data(stub, location, handle.tell(), size)
                if mapped:
                    _copy_range(mapped, _external_offset(tensor), size, handle)
                else:
                    handle.write(raw)
            if sync:
                _sync(handle)
        _write_new(model_file, self.model.SerializeToString(), sync)

    @property
    def mapped(self) -> bool:
        """Whether a tensor's data is still in the input's file (:func:`mapped_file`): the
        model cannot go as one serialized message without :func:`materialized`."""
        return any(mapped_file(tensor) is not None for _, tensor in self.tensors)


def weightless(model: onnx.ModelProto) -> Weightless:
    """The :class:`Weightless` copy of ``model`` (the original is not modified)."""
    copy = Weightless(onnx.ModelProto())
    _copy_fields(model, copy.model, skip=("graph",))
    _copy_graph(model.graph, copy.model.graph, copy.tensors)
    return copy


@contextmanager
def external_copy(model: onnx.ModelProto) -> Iterator[Path]:
    """``model`` saved with external data in a temporary folder; the folder goes on exit.

    For readers that take a path (onnxruntime, the checker): unlike
    ``SerializeToString`` this works above 2 GiB and holds one tensor's
    data at a time.  Uses the folder for temporary files (``TMPDIR``).
    """
    with tempfile.TemporaryDirectory(prefix="sconv-onnx-", ignore_cleanup_errors=True) as folder:
        path = Path(folder) / "model.onnx"
        weightless(model).write(path, data_path(path), data_path(path).name, sync=False)
        yield path


# --- mapped external data ------------------------------------------------------------------


def mapped_file(tensor: TensorProto) -> str | None:
    """The file a *mapped* tensor's data stays in (``load_model(..., mapped=True)``): its
    external data location, an absolute path; None for any other tensor.  onnxruntime
    (1.32) refuses absolute locations ("Absolute path not allowed"), so a mapped tensor
    that reached it by mistake would fail loudly; :meth:`Weightless.write`,
    :func:`read_mapped` and :func:`mapped_array` read its bytes."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    location = _location(tensor)
    return location if os.path.isabs(location) else None


def _external_offset(tensor: TensorProto) -> int:
    return int(next((entry.value for entry in tensor.external_data if entry.key == "offset"), 0))


def _mappable_dtype(tensor: TensorProto) -> np.dtype | None:
    """The little-endian numpy dtype ``tensor``'s bytes are, when numpy reads them in place
    (not the packed 4- and 2-bit types, strings, bfloat16 or float8)."""
    if tensor.data_type in _PACKED_BITS or tensor.data_type in (TensorProto.UNDEFINED,
                                                                 TensorProto.STRING):
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype.newbyteorder("<") if dtype.kind in "fiub" else None


def mapped_array(tensor: TensorProto, files: dict[str, mmap.mmap]) -> np.ndarray | None:
    """A mapped tensor's values, read-only, in place in its file (no copy: pages are read
    when touched); None for any other tensor.  ``files`` holds one mapping per file, made
    here when first needed (one per tensor would hold a file descriptor each: a model
    exported one file per weight would run out of them)."""
    file = mapped_file(tensor)
    dtype = _mappable_dtype(tensor)
    if file is None or dtype is None:
        return None
    if file not in files:
        with open(file, "rb") as handle:
            files[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    values = np.frombuffer(files[file], dtype=dtype, count=math.prod(tensor.dims),
                           offset=_external_offset(tensor))
    return values.reshape(tuple(tensor.dims))


def release_pages(mapping: mmap.mmap) -> None:
    """Drop the pages of ``mapping`` from the process's resident memory (they are the file's,
    unchanged: read again when touched).  A model's weights would otherwise stay resident
    once read, as if loaded.  Where ``madvise`` has no ``MADV_DONTNEED`` (Windows), the
    kernel alone decides."""
    if hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _read_into(tensor: TensorProto, file: Path | str, offset: int, length: int | None) -> None:
    """``tensor``'s external bytes into its ``raw_data`` (an ordinary tensor again)."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(-1 if length is None else length)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for scope in graphs(graph):
        yield from scope.initializer


def _map_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Leave ``model``'s external data in its files (checked by :func:`_check_external_files`)
    when above :data:`LARGE_MODEL_BYTES` in all: each initializer of at least
    :data:`EXTERNAL_MIN_BYTES` that numpy reads in place is mapped (:func:`mapped_file`).
    Every other external tensor is read now: small ones (shape inference reads their
    values), those numpy cannot read (packed, bfloat16, strings), attribute tensors (a
    ``Constant`` node's value) and those of a smaller model, for which bytes in memory
    cost less than a temporary file per onnxruntime session."""
    external = [tensor for tensor in iter_tensors(model)
                if tensor.data_location == TensorProto.EXTERNAL]
    if sum(tensor_nbytes(tensor) for tensor in external) > LARGE_MODEL_BYTES:
        for tensor in _initializers(model.graph):
            if (tensor.data_location == TensorProto.EXTERNAL and _mappable_dtype(tensor) is not None
                    and tensor_nbytes(tensor) >= EXTERNAL_MIN_BYTES):
                file, offset, _ = _external_file(model_path, tensor)
                _set_external_data(tensor, str(file.resolve()), offset, tensor_nbytes(tensor))
    for tensor in external:
        if mapped_file(tensor) is None:
            _read_into(tensor, *_external_file(model_path, tensor))


def read_mapped(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read the data of ``model``'s mapped tensors into them (in place; returns ``model``):
    the model then holds its weights itself."""
    for tensor in iter_tensors(model):
        file = mapped_file(tensor)
        if file is not None:
            _read_into(tensor, file, _external_offset(tensor), tensor_nbytes(tensor))
    return model


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy of it with the data of its mapped tensors read in (for a whole
    serialized message; ``model`` itself is not changed)."""
    if not any(mapped_file(tensor) for tensor in iter_tensors(model)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return read_mapped(copy)


#: Bytes :func:`_copy_range` reads at once.
COPY_BYTES = 64 * 2**20


def _copy_range(file: str, offset: int, size: int, handle) -> None:
    """Copy ``size`` bytes of ``file`` from ``offset`` to the open ``handle``, a piece at a time."""
    with open(file, "rb") as source:
        source.seek(offset)
        while size > 0:
            piece = source.read(min(size, COPY_BYTES))
            if not piece:
                raise OSError(f"{file} ended {size} bytes early")
            handle.write(piece)
            size -= len(piece)


# --- loading ---------------------------------------------------------------------------------


def _location(tensor: TensorProto) -> str:
    """The external data file name of ``tensor``, relative to the model's folder."""
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def _external_file(model_path: Path, tensor: TensorProto) -> tuple[Path, int, int | None]:
    """``(file, offset, length)`` of an external tensor; InputError if its location is unsafe."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = _location(tensor)
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise InputError(f"{model_path}: tensor {tensor.name!r} has external data location "
                         f"{location!r}, not a file name inside the model's folder")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{model_path}: tensor {tensor.name!r} has a non-integer external "
                         f"data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"{model_path}: tensor {tensor.name!r} has a negative external data "
                         f"offset or length")
    # onnx reads to the end of the file when the length is missing or 0
    return model_path.parent / location, offset, length or None


def _expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes ``tensor``'s dims and type take (:func:`tensor_nbytes`), or None when the
    type has no fixed size (strings, undefined)."""
    if tensor.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    return tensor_nbytes(tensor)


def _external_size_problem(tensor: TensorProto, file: Path, offset: int, length: int | None,
                           file_size: int) -> str | None:
    """Why the bytes onnx would read for ``tensor`` (``length`` from ``offset``, or the rest of
    the file without a length) are not the tensor's dims x item size, or None."""
    needed = _expected_nbytes(tensor)
    dims = "x".join(map(str, tensor.dims)) or "scalar"
    if length is not None and needed is not None and length != needed:
        return (f"tensor {tensor.name!r} has external data of {length} bytes, its dims "
                f"{dims} need {needed}")
    end = offset + (length if length is not None else needed if needed is not None else 0)
    if end > file_size:
        return (f"external data file {file} is truncated: tensor {tensor.name!r} needs bytes "
                f"{offset}..{end}, the file has {file_size}")
    if length is None and needed is not None and file_size - offset != needed:
        return (f"tensor {tensor.name!r} has external data with no length, read to the end of "
                f"{file}: {file_size - offset} bytes, its dims {dims} need {needed}")
    return None


def _check_external_files(model: onnx.ModelProto, model_path: Path) -> None:
    """Every external data file exists and holds each tensor's bytes, as many as its dims and
    type take: one-line InputError if not."""
    sizes: dict[Path, int] = {}
    for tensor in iter_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        file, offset, length = _external_file(model_path, tensor)
        if file not in sizes:
            if not file.is_file():
                raise InputError(f"{model_path}: external data file {file} is missing "
                                 f"(it holds tensor {tensor.name!r})")
            sizes[file] = file.stat().st_size
        problem = _external_size_problem(tensor, file, offset, length, sizes[file])
        if problem:
            raise InputError(f"{model_path}: {problem}")


def _parse(path: Path) -> onnx.ModelProto:
    """The model file's message, external data not read."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None


def _check(model: onnx.ModelProto, path: Path | None, where: str) -> None:
    """onnx's checker, on the file when there is one, else on the message.

    The checker takes a serialized message: a model from a file is checked
    there (no copy; external data checked in place), a ``ModelProto`` above
    :data:`PROTOBUF_LIMIT` through an :func:`external_copy`.
    """
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{where}: not a valid ONNX model (no graph)")
    try:
        if path is not None:
            onnx.checker.check_model(str(path))
        elif weightless(model).serialized_size > PROTOBUF_LIMIT:
            with external_copy(model) as copy:
                onnx.checker.check_model(str(copy))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{where}: invalid ONNX model ({first_line(exc)})") from None


def load_model(
    model_or_path: onnx.ModelProto | str | os.PathLike, *, weights: bool = True,
    mapped: bool = False,
) -> onnx.ModelProto:
    """Return a checked ``ModelProto`` from a path or a ``ModelProto``.

    External data files are read from the model's folder (``weights=False``
    leaves them where they are, for callers that only need the graph; they
    are still checked; ``mapped=True`` leaves the weights of a large model there
    too, each pointing at its file: :func:`_map_external_data`).  Raises
    :class:`InputError` with one line for a missing file, a file that is not
    ONNX (text, truncated protobuf), a missing or truncated external data file,
    or a model the checker rejects.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        _check(model_or_path, None, "model")
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise InputError(f"expected an onnx.ModelProto or a path to an .onnx file, "
                         f"got {type(model_or_path).__name__}")
    path = Path(model_or_path)
    model = _parse(path)
    _check_external_files(model, path)
    _check(model, path, str(path))
    if weights:
        try:
            if mapped:
                _map_external_data(model, path)
            else:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read external data ({first_line(exc)})") from None
    return model


def referenced_files(path: str | os.PathLike) -> list[str]:
    """The external data locations the model file at ``path`` names (relative to its
    folder); empty when it cannot be read (:func:`load_model` says why)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return []
    return sorted({_location(tensor) for tensor in iter_tensors(model)
                   if tensor.data_location == TensorProto.EXTERNAL and _location(tensor)})


def model_files(path: str | os.PathLike) -> set[Path]:
    """The model file and the external data files it references (resolved), if readable."""
    source = Path(path)
    return {source.resolve()} | {(source.parent / name).resolve()
                                 for name in referenced_files(source)}


# --- saving ----------------------------------------------------------------------------------
#
# Temporary files are named ``.<file name>.sconv-<host>-<pid>-<random>.tmp`` beside the output:
# a run removes its own on any exit it survives (errors, SIGINT, SIGTERM: the CLI turns signals
# into exceptions), and the next run writing the same output removes those of processes of this
# host that no longer exist (a SIGKILL), the data file's too.  External data goes to ``<out name>.<token>.data``, a name unique to the run and
# referenced by the model: two runs writing the same OUT at once can only leave one model with
# its own data, never one run's model with the other's data.

_TMP_MARK = ".sconv-"


def check_output_paths(in_path: str | os.PathLike | None, out_path: str | os.PathLike,
                       *others: str | os.PathLike | None,
                       input_files: set[Path] | None = None) -> Path:
    """Validate ``out_path`` and the further output files ``others`` (e.g. a report)
    before any work; :class:`InputError` if one is not writable, names a folder, equals
    another or is a file of the input model (which is never overwritten).
    ``input_files``: the input's :func:`model_files`, when the caller has them."""
    paths = [Path(out_path)] + [Path(other) for other in others if other is not None]
    protected = set()
    if in_path is not None:
        exists = Path(in_path).is_file()
        protected = set(input_files if input_files is not None else
                        model_files(in_path) if exists else ())
        protected.add(Path(in_path).resolve())
    seen: dict[Path, Path] = {}
    for path in paths:
        check_writable(path)
        resolved = path.resolve()
        if resolved in protected or (path.exists() and any(
                file.exists() and os.path.samefile(path, file) for file in protected)):
            what = ("equals the input" if resolved == Path(in_path).resolve()
                    else f"is a file of the input model {in_path}")
            raise InputError(f"{path}: {what}; refusing to overwrite it")
        if resolved in seen:
            raise InputError(f"{path}: given for two outputs ({seen[resolved]} and {path}); "
                             f"each output needs its own file")
        seen[resolved] = path
    return paths[0]


def check_writable(path: str | os.PathLike) -> Path:
    """:class:`InputError` unless a file can be created at ``path``: its folder exists and
    takes new files (tried with an anonymous temporary file), and it is not a folder."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"{out}: cannot write in {folder} ({exc.strerror or exc})") from None
    return out


def _sync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_new(path: Path, data: bytes, sync: bool = True) -> None:
    """Create ``path`` (it must not exist), write ``data`` and, with ``sync``, flush it to disk."""
    with open(path, "xb") as handle:
        handle.write(data)
        if sync:
            _sync(handle)


def _owner() -> str:
    """This host and process, as temporary names spell them: ``<host>-<pid>``."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _process_gone(owner: str) -> bool:
    """Whether ``owner`` (:func:`_owner`) names a process of this host that no longer
    exists (a process of another host, or an odd name, is never judged gone)."""
    host, _, pid = owner.rpartition("-")
    if host != _owner().rpartition("-")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # someone else's, or not a pid
        return False
    return False


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``out`` (the model's and its data
    file's) whose process is gone (killed mid-write); returns them."""
    folder = out.parent if str(out.parent) else Path(".")
    removed = []
    for candidate in folder.glob(f".{glob.escape(out.name)}*{_TMP_MARK}*.tmp"):
        owner = candidate.name.rpartition(_TMP_MARK)[2].rpartition("-")[0]
        if _process_gone(owner):
            try:
                candidate.unlink()
            except OSError:  # gone already, or not ours to remove
                continue
            removed.append(candidate)
    return removed


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh temporary name beside ``out`` (hidden), removed on exit unless renamed.

    The caller creates the file (with the usual permissions, unlike
    ``mkstemp``'s 0600) and renames it over ``out`` when complete, so that
    a reader never sees a half-written file and a failure leaves nothing.
    """
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}{_TMP_MARK}{_owner()}-{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(out_path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``out_path`` through a temporary file and a rename."""
    out = Path(out_path)
    with _staged(out) as tmp:
        _write_new(tmp, data)
        os.replace(tmp, out)


def _own_data_files(out: Path) -> set[Path]:
    """The external data files of an earlier write of ``out`` (``<out>.<token>.data``, as
    :func:`save_model` names them) that the model now at ``out`` references.  A model
    above :data:`LARGE_MODEL_BYTES` holds its weights itself: not read."""
    if not out.is_file() or out.stat().st_size > LARGE_MODEL_BYTES:
        return set()
    pattern = re.compile(rf"{re.escape(out.name)}\.[0-9a-f]+\.data")
    return {out.parent / name for name in referenced_files(out) if pattern.fullmatch(name)}


def save_model(
    model: onnx.ModelProto, out_path: str | os.PathLike, external_data: bool | None = None,
    keep: set[Path] | frozenset[Path] = frozenset(),
) -> Path | None:
    """Write ``model`` to ``out_path`` atomically; return the external data file if one was written.

    ``external_data``: True puts every tensor of at least
    :data:`EXTERNAL_MIN_BYTES` in one file ``<out>.<token>.data`` beside the
    model (``token``: random, one per write); None (default) does so only
    when the model is above :data:`PROTOBUF_LIMIT` (it cannot be one
    message); False refuses such a model with an :class:`InputError`.  Both
    files are written to temporary names first, then renamed (the data, then
    the model): a failure leaves neither (nor a half-written one).  The data
    file of the model replaced at ``out_path``, if an earlier write made it,
    is removed afterwards, unless it is in ``keep`` (resolved paths).
    """
    out = Path(out_path)
    split = weightless(model)
    too_big = split.serialized_size > PROTOBUF_LIMIT
    if too_big and external_data is False:
        raise InputError(
            f"{out}: the model needs about {split.serialized_size / 2**30:.2f} GiB, above "
            f"protobuf's 2 GiB limit for one file; save it with external data (--external-data)"
        )
    replaced = _own_data_files(out)
    if not (external_data or too_big):
        write_atomic(out, materialized(model).SerializeToString())
        data = None
    else:
        data = data_path(out, secrets.token_hex(4))
        with _staged(data) as data_tmp, _staged(out) as model_tmp:
            split.write(model_tmp, data_tmp, data.name)
            os.replace(data_tmp, data)
            try:
                os.replace(model_tmp, out)
            except BaseException:
                data.unlink(missing_ok=True)
                raise
    for old in replaced:
        if old != data and old.resolve() not in keep:
            old.unlink(missing_ok=True)
    return data


def restore_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Copy the model-level fields, opsets and metadata of ``source`` onto ``target``."""
    for name in _MODEL_FIELDS:
        setattr(target, name, getattr(source, name))
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    target.graph.name = source.graph.name
    target.graph.doc_string = source.graph.doc_string
    if source.functions and not target.functions:
        target.functions.extend(source.functions)
