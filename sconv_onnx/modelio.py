"""Loading and saving models: clear errors on bad input, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError, first_line

#: Model-level fields that onnx-graphsurgeon's export does not carry over and
#: that a rewrite must keep exactly as they were (DESIGN.md section 2: never
#: bump ``ir_version`` or opsets implicitly).
_MODEL_FIELDS = (
    "ir_version",
    "producer_name",
    "producer_version",
    "domain",
    "model_version",
    "doc_string",
)


def load_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Return a checked ``ModelProto`` from a path or a ``ModelProto``.

    Raises :class:`InputError` with one line for a missing file, a file that
    is not ONNX (text, truncated protobuf) or a model the checker rejects.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
        where = "model"
    else:
        path = Path(model_or_path)
        where = str(path)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a file")
        try:
            model = onnx.load(str(path))
        except (DecodeError, RuntimeError, ValueError, OSError) as exc:
            raise InputError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{where}: not a valid ONNX model (no graph)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{where}: invalid ONNX model ({first_line(exc)})") from None
    return model


def check_output_path(in_path: str | os.PathLike | None, out_path: str | os.PathLike) -> Path:
    """Validate ``out_path`` before any work: its folder exists, it is not the input."""
    out = Path(out_path)
    if out.exists() and out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name for the output model")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: folder {folder} does not exist")
    if in_path is not None:
        source = Path(in_path)
        same = source.resolve() == out.resolve()
        if not same and out.exists() and source.exists():
            same = os.path.samefile(source, out)
        if same:
            raise InputError(f"{out}: output equals the input; refusing to overwrite it")
    return out


def write_atomic(out_path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``out_path`` through a temporary file and a rename.

    A reader never sees a half-written file and a failure leaves nothing
    behind.
    """
    out = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model_atomic(model: onnx.ModelProto, out_path: str | os.PathLike) -> None:
    """Serialize ``model`` and :func:`write_atomic` it."""
    write_atomic(out_path, model.SerializeToString())


def restore_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Copy the model-level fields, opsets and metadata of ``source`` onto ``target``."""
    for field in _MODEL_FIELDS:
        setattr(target, field, getattr(source, field))
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    target.graph.name = source.graph.name
    target.graph.doc_string = source.graph.doc_string
    if source.functions and not target.functions:
        target.functions.extend(source.functions)
