"""Calibration data: a batch of real inputs, run through a model in chunks it accepts.

The arrays (an ``.npz`` keyed by input name, like ``--inputs``) hold ``N``
samples along their leading axis.  A model whose inputs declare a fixed
leading (batch) dim ``b`` runs them ``b`` at a time (``N`` must be a
multiple of ``b``); one with a dynamic batch dim runs them up to
:data:`CHUNK` at a time, so that the activations of one chunk only are held.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import InputError, first_line, param
from .runtime import run_many, session_with_outputs
from .shapes import declared_dims, graph_inputs
from .verify import user_feeds

#: Samples per onnxruntime run when the batch dim is dynamic.
CHUNK = 8


def load_calibration(model: onnx.ModelProto, source) -> list[dict[str, np.ndarray]]:
    """The calibration arrays (a path to an ``.npz``, of which only the arrays the model
    takes are read, or a dict) checked and split into runnable chunks."""
    arrays = user_feeds(model, source, "calib_data")
    for inp in graph_inputs(model):
        dims, shape = declared_dims(inp), arrays[inp.name].shape
        clash = len(dims) != len(shape) or any(
            isinstance(want, int) and want != have for want, have in zip(dims[1:], shape[1:]))
        if dims and clash:
            wanted = "x".join(str(d) if isinstance(d, int) else "?" for d in dims)
            raise InputError(f"{param('calib_data')} {inp.name!r} has shape {'x'.join(map(str, shape))}; "
                             f"the model wants N x {wanted.partition('x')[2]} (N samples)")
    return split_batches(model, arrays)


def split_batches(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``arrays`` cut along axis 0 into chunks of the model's batch size (see the module doc)."""
    counts = {len(value) if value.ndim else 0 for value in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{param('calib_data')} arrays must all have the same leading (sample) dim")
    samples = counts.pop()
    fixed = {dims[0] for dims in (declared_dims(inp) for inp in graph_inputs(model))
             if dims and isinstance(dims[0], int)}
    if len(fixed) > 1:
        raise InputError(f"{param('calib_data')}: the model's inputs declare different batch sizes")
    size = fixed.pop() if fixed else CHUNK
    if fixed and samples % size:
        raise InputError(f"{param('calib_data')} has {samples} samples; the model takes batches of {size}")
    return [{name: value[start:start + size] for name, value in arrays.items()}
            for start in range(0, samples, size)]


def sample_tensors(model: onnx.ModelProto, batches: list[dict], requests: list) -> list[np.ndarray]:
    """For each ``(tensor name, sampler)`` of ``requests``, what the sampler keeps of
    that tensor's value on every batch, concatenated on axis 1 (the patch axis).

    ``sampler(value, chunk_count)`` is called once per batch.  ``model`` runs
    with the tensors as extra outputs, added for the session and removed
    again; only one batch's activations are held at a time.
    """
    inputs = {inp.name for inp in graph_inputs(model)}
    names = list(dict.fromkeys(name for name, _ in requests))
    extra = [name for name in names if name not in inputs]
    sess = session_with_outputs(model, extra)
    kept: list[list] = [[] for _ in requests]
    for feeds in batches:
        try:
            values = dict(zip(extra, sess.run(extra, feeds))) if extra else {}
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise InputError(
                f"onnxruntime cannot run the model on {param('calib_data')}: {first_line(exc)}") from None
        values.update({name: feeds[name] for name in names if name in inputs})
        for parts, (name, sampler) in zip(kept, requests):
            parts.append(sampler(values[name], len(batches)))
        del values
    return [np.concatenate(parts, axis=1) for parts in kept]


def run_batches(model, batches: list[dict]) -> dict[str, np.ndarray]:
    """All outputs of ``model`` (a ``ModelProto`` or a path) on every batch (one session),
    concatenated."""
    runs = run_many(model, batches)
    return {name: np.concatenate([outputs[name] for outputs in runs]) for name in runs[0]}


def accuracy_proxy(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    """How far ``candidate``'s outputs are from ``reference``'s on the calibration data.

    ``rel_error``: ``||y - y0||_F / ||y0||_F`` over all outputs together.
    For the first output, the task-level agreement its shape suggests:
    ``top1_agreement`` for class scores ``(N, K)`` with ``K > 1`` (the fraction
    of samples whose arg-max agrees); ``position_agreement`` for sequence
    scores ``(N, T, K)`` with ``K > 1`` (CTC, tokens; batch first, classes
    last, as exporters of CTC heads write them), see
    :func:`position_agreement`; None otherwise, where ``rel_error`` is the
    measure.
    """
    diff = sum(float(np.sum((np.asarray(candidate[k], np.float64) - np.asarray(v, np.float64)) ** 2))
               for k, v in reference.items())
    size = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in reference.values())
    first = next(iter(reference))
    scores = np.asarray(reference[first])
    classes = has_classes(scores)
    answers = scores.argmax(-1) if classes else None
    moved = np.asarray(candidate[first]).argmax(-1) if classes else None
    return {
        "samples": len(scores) if scores.ndim else 1,
        "output": first,
        "rel_error": float(np.sqrt(diff / size)) if size > 0 else float(diff > 0),
        "top1_agreement": float(np.mean(answers == moved)) if scores.ndim == 2 and classes else None,
        "position_agreement": (position_agreement(answers, moved) if scores.ndim == 3 and classes
                               else None),
    }


def has_classes(scores: np.ndarray) -> bool:
    """Whether an output reads as class scores: ``(N, K)`` or ``(N, T, K)`` with ``K > 1``
    (classes last)."""
    return scores.ndim in (2, 3) and scores.shape[-1] > 1


def position_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The fraction of positions whose arg-max agrees, ``(N, T)`` answers each, counting
    only positions where either answer is not the *background* class.

    The background is the class of most reference positions when that is more
    than half of them (CTC's blank, a tagger's "outside"): positions both
    models leave in the background say nothing about the task (a word of 6
    letters fills a few of the 40 positions of a text line), and counting
    them would let 1 % of disagreeing positions hide 10 % of wrong letters.
    Without such a class every position counts.
    """
    classes, counts = np.unique(reference, return_counts=True)
    background = classes[counts.argmax()] if counts.max() * 2 > reference.size else None
    counted = np.ones(reference.shape, bool) if background is None else (
        (reference != background) | (candidate != background))
    if not counted.any():
        return 1.0
    return float(np.mean((reference == candidate)[counted]))
