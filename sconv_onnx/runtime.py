"""The onnxruntime layer: sessions and runs, for verification, calibration and timing.

Every session is a CPU session with quiet logging (errors surface as
exceptions that callers report in one line).  A model is given as a
``ModelProto`` or as a path, which onnxruntime reads in place with its
external data.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from . import modelio
from .modelio import external_copy, weightless
from .widen import widen_feeds, widen_model


def session(
    model: onnx.ModelProto | str | os.PathLike, threads: int = 0, spinning: bool = True,
    profile_dir: str | None = None,
) -> ort.InferenceSession:
    """A CPU session with quiet logging (errors surface as exceptions, reported in one line).

    ``model``: a ``ModelProto`` or the path of a model file, read in place
    with its external data (see :func:`_create`).  ``threads``: intra-op
    threads (0: onnxruntime's default); ``spinning`` off for timing side by
    side (docs/DESIGN.md section 2); ``profile_dir`` turns onnxruntime's
    profiler on.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = threads
    if not spinning:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return _create(model, options)


def _create(model: onnx.ModelProto | str | os.PathLike, options) -> ort.InferenceSession:
    """The session of a path, or of a ``ModelProto`` as bytes or through a temporary file.

    A model up to :data:`~sconv_onnx.modelio.LARGE_MODEL_BYTES` goes as
    serialized bytes (no files: a few milliseconds less per session, and
    ``select="measured"`` creates many); a larger one as an
    :func:`~sconv_onnx.modelio.external_copy`, read from disk one tensor at
    a time, since bytes would hold every weight once more (twice while
    onnxruntime parses them) and cannot exceed 2 GiB.  So does a model whose
    weights are still in its input's files (:func:`~sconv_onnx.modelio.mapped_file`).
    """
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(os.fspath(model), options, providers=providers)
    limit = min(modelio.LARGE_MODEL_BYTES, modelio.PROTOBUF_LIMIT)
    split = weightless(model)
    if split.serialized_size <= limit and not split.mapped:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with external_copy(model) as path:
        return ort.InferenceSession(str(path), options, providers=providers)


def session_with_outputs(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A :func:`session` of ``model`` that can also return the tensors ``names`` (of its
    main graph): added to its outputs for the session, removed again after."""
    existing = {out.name for out in model.graph.output}
    added = [name for name in dict.fromkeys(names) if name not in existing]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
    try:
        return session(model)
    finally:
        for _ in added:
            model.graph.output.pop()


def observe(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict:
    """``{name: (elem_type, dims)}`` of main-graph tensors as onnxruntime computes them on
    ``feeds`` (for those shape inference cannot tell); empty where the model does not run."""
    if not names:
        return {}
    try:
        values = session_with_outputs(model, names).run(names, feeds)
    except Exception:  # noqa: BLE001 - onnxruntime raises several unrelated types
        return {}
    return {name: (onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
            for name, value in zip(names, values) if isinstance(value, np.ndarray)}


#: the report note when a model ran widened (see :mod:`sconv_onnx.widen`)
WIDENED_NOTE = ("bfloat16 model: onnxruntime's CPU provider cannot run it, so both models were "
                "verified with every bfloat16 tensor widened to float32 (exact for the weights; "
                "float32 arithmetic)")


def run(
    model: onnx.ModelProto | str | os.PathLike, feeds: dict, notes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """All outputs of ``model`` (a ``ModelProto`` or a path) on ``feeds``, keyed by output name
    (:func:`run_many` with one batch)."""
    return run_many(model, [feeds], notes)[0]


def run_many(
    model: onnx.ModelProto | str | os.PathLike, batches: list[dict], notes: list[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """The outputs of ``model`` on each of ``batches``, from one session.

    A model that onnxruntime refuses for its bfloat16 types (its CPU
    provider has no bfloat16 Conv, Gemm or MatMul) is run as its float32
    :func:`~sconv_onnx.widen.widen_model` copy, on widened feeds;
    :data:`WIDENED_NOTE` is then added to ``notes`` (once).
    """
    widen = False
    try:
        sess = session(model)
    except Exception as exc:  # onnxruntime raises several unrelated types
        if "bfloat16" not in str(exc):
            raise
        sess, widen = session(widen_model(modelio.load_model(
            modelio.materialized(model) if isinstance(model, onnx.ModelProto) else model))), True
        if notes is not None and WIDENED_NOTE not in notes:
            notes.append(WIDENED_NOTE)
    names = [out.name for out in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, widen_feeds(feeds) if widen else feeds)))
            for feeds in batches]


