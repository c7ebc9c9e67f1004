"""Unfused ``BatchNormalization`` after a layer: fold it in when that is exact.

For ``y = BN(conv(x, W) + b)`` with constant statistics,

    s = scale / sqrt(var + epsilon)
    y = conv(x, s * W) + s * (b - mean) + B

(``s`` scales each output channel).  Scaling filters keeps their structure,
so a structured conv followed by BN is still found, and its rewrite absorbs
the BN node.  Folding happens only when it is exact and changes nothing
else: the BN is the layer output's sole reader, the layer output is no
graph output, BN's statistics are constant (no graph input's default) and
per channel (``(C,)``; opsets 7-8 also allow ``spatial=0``, statistics per
activation, which stay), only its first output is used (inference mode),
and the folded weight and bias are finite.

:func:`fold_remaining` then folds, the same way, every BN left after a kept
Conv (whatever its structure): what onnxsim/onnxslim do first, and what
onnxruntime does when it loads the model.  It needs the conv's weight (and
bias) to be initializers that conv alone reads: their values change in
place, under their names, and a weight other nodes read too would have to
be stored twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..structure import is_finite
from .base import Emitter, NodeEmitter
from .graphs import constant_value, default_domain, drop_if_unused, walk


@dataclass
class BatchNormFold:
    """A foldable BN node and the layer's weight and bias with the BN folded in."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray


def find_fold(graph: gs.Graph, layer: gs.Node, weight: np.ndarray,
              bias: np.ndarray | None) -> BatchNormFold | None:
    """The fold of the BN that reads ``layer``'s output, or None when it is not exact."""
    out = layer.outputs[0]
    if len(out.outputs) != 1 or out in graph.outputs:
        return None
    bn = out.outputs[0]
    if (bn.op != "BatchNormalization" or not default_domain(bn) or bn.inputs[0] is not out
            or bn.attrs.get("training_mode", 0)):
        return None
    if not any(node is bn for node in graph.nodes):  # in a subgraph reading the outer scope
        return None
    if any(extra.outputs or extra in graph.outputs for extra in bn.outputs[1:]):
        return None
    stats = per_channel_stats(bn, weight.shape[0])
    if stats is None:
        return None
    scale, shift, mean, var = stats
    with np.errstate(all="ignore"):  # a non-finite result is refused below
        factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        shape = (-1,) + (1,) * (weight.ndim - 1)
        base = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
        folded = (np.asarray(weight, dtype=np.float64) * factor.reshape(shape)).astype(weight.dtype)
        folded_bias = (factor * (base - mean) + shift).astype(weight.dtype)
    if not (is_finite(folded) and is_finite(folded_bias)):
        return None
    return BatchNormFold(bn, folded, folded_bias)


def per_channel_stats(bn: gs.Node, channels: int) -> list[np.ndarray] | None:
    """``[scale, B, mean, var]`` of ``bn`` in float64 when they are constants of shape
    ``(channels,)`` and finite, else None (statistics per activation, ``spatial=0`` at
    opsets 7-8, are of shape ``(C, D1, ..)``; a ``(1,)`` or scalar one broadcasts in
    numpy but not in onnxruntime's BatchNormalization)."""
    if int(bn.attrs.get("spatial", 1)) != 1 or len(bn.inputs) < 5:
        return None
    stats = [constant_value(tensor) for tensor in bn.inputs[1:5]]
    if any(value is None or value.shape != (channels,) or not is_finite(value) for value in stats):
        return None
    return [np.asarray(value, dtype=np.float64) for value in stats]


def apply_fold(graph: gs.Graph, layer: gs.Node, bn: gs.Node, bias: gs.Constant) -> None:
    """Give ``layer`` the folded ``bias`` and the output of ``bn`` (the BatchNormalization
    that :func:`find_fold` found after it); remove ``bn`` from ``graph``."""
    set_bias(graph, layer, bias)
    take_output(graph, layer, bn)


def set_bias(graph: gs.Graph, layer: gs.Node, bias: gs.Constant) -> None:
    """Make ``bias`` the bias input of ``layer`` (a Conv); drop the old one if unread."""
    old_bias = layer.inputs[2] if len(layer.inputs) > 2 else None
    if old_bias is None:
        layer.inputs.append(bias)
    else:
        layer.inputs[2] = bias
        drop_if_unused(graph, old_bias)


def take_output(graph: gs.Graph, last: gs.Node, bn: gs.Node) -> None:
    """Give ``last`` (the final node of a rewritten layer, whose bias already holds the
    fold) the output of ``bn``; remove ``bn`` and its statistics from ``graph``."""
    bn_inputs = list(bn.inputs[1:])
    bn_out = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    graph.nodes.remove(bn)
    last.outputs[0] = bn_out
    for tensor in bn_inputs:
        drop_if_unused(graph, tensor)


def fold_remaining(emitter: Emitter, rewritten: set[str]) -> list[str]:
    """Fold every BN that :func:`find_fold` finds after a Conv of ``emitter``'s graph
    (subgraphs included) whose weight and bias are initializers that Conv alone reads
    (not overridable); return the names of the BN nodes folded (in graph order).  The
    weight and bias keep their names.

    Left alone: the last conv of a rewritten layer (its output is one of the layer keys
    ``rewritten``, which the layer checks look for; its family decided about the BN).

    Who else reads a weight is counted by name over every graph: onnx-graphsurgeon's
    graph copy gives each subgraph its own copy of an outer constant, so a weight read
    in two branches has one reader per copy (the graph fuzzer found a fold that changed
    the weight of convs in other branches)."""
    readers = _readers_by_name(emitter.graph)
    folded = []
    for owner, node in list(walk(emitter.graph)):
        if (node.op != "Conv" or not default_domain(node) or len(node.inputs) < 2
                or node.outputs[0].name in rewritten):
            continue
        tensors = [tensor for tensor in node.inputs[1:3] if tensor is not None and tensor.name]
        if not all(isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1
                   and readers[tensor.name] == 1 for tensor in tensors):
            continue
        values = [constant_value(tensor) for tensor in tensors]
        if any(value is None for value in values) or values[0].dtype.kind != "f":
            continue  # overridable
        fold = find_fold(owner, node, values[0], values[1] if len(values) > 1 else None)
        if fold is None:
            continue
        tensors[0].values = fold.weight
        if len(tensors) > 1:
            tensors[1].values = fold.bias
            bias = tensors[1]
        else:
            at = NodeEmitter(owner, node, node.name or node.outputs[0].name, emitter.taken)
            bias = at.constant("bias", fold.bias)
        apply_fold(owner, node, fold.node, bias)
        folded.append(fold.node.name or "BatchNormalization")
    return folded


def _readers_by_name(graph: gs.Graph) -> Counter:
    """How many nodes read each tensor name, and graphs output it, over ``graph`` and every
    graph nested in it (sibling subgraphs may reuse a name: counted together, which only
    leaves a fold out)."""
    readers = Counter(tensor.name for _, node in walk(graph) for tensor in node.inputs
                      if tensor is not None and tensor.name)
    scopes = {id(owner): owner for owner, _ in walk(graph)} | {id(graph): graph}
    for scope in scopes.values():
        readers.update(tensor.name for tensor in scope.outputs)
    return readers
