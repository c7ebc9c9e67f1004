"""The model as families see it: the loaded model, its graph view and its shapes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .context import with_observed
from .errors import InputError
from .modelio import mapped_array, release_pages
from .passes.graphs import mark_overridable, walk
from .shapes import infer_tensor_shapes

#: First IR version whose graph inputs may override initializers of the same name; below
#: it every initializer must be listed as an input and onnxruntime treats them as constants.
OVERRIDABLE_IR = 4


@dataclass
class ModelView:
    """A loaded model and what ``find`` reads of it.

    ``graph`` is the onnx-graphsurgeon view, imported once per run and
    never modified (rewrites go to a copy, :class:`~sconv_onnx.passes.base.Emitter`).
    ``static_shapes`` are the shapes onnx infers from the declared inputs,
    ``concrete_shapes`` those at the run's concrete input shapes (main graph
    only: inference does not reach into subgraphs).  Initializers the main
    graph also lists as inputs are marked overridable and stay graph inputs
    (:func:`keep_overridable`).
    """

    model: onnx.ModelProto
    graph: gs.Graph
    opset: int
    static_shapes: dict
    concrete_shapes: dict

    #: tensors of layers whose shapes onnxruntime observed (inference could not tell them)
    observed: int = 0
    #: the input shapes ``concrete_shapes`` are at: the MAC context
    context: dict = field(default_factory=dict)
    #: the mapping of each file whose constants are read in place (:func:`read_in_place`)
    mappings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
           feeds=None) -> ModelView:
        """Import ``model`` and infer its shapes, statically and at ``input_shapes`` (the
        MAC context, :mod:`sconv_onnx.context`); ``feeds()``, when given, makes inputs at
        those shapes for onnxruntime to observe the layers' shapes inference cannot tell."""
        static = infer_tensor_shapes(model)
        concrete = infer_tensor_shapes(model, input_shapes) if input_shapes else static
        observed = 0
        if feeds is not None:
            concrete, observed = with_observed(model, concrete, feeds)
        graph = gs.import_onnx(model)
        mappings: dict = {}
        keep_overridable(model, graph, mappings)
        read_in_place(graph, mappings)
        return cls(model, graph, default_opset(model), static, concrete, observed,
                   dict(input_shapes), mappings)

    def release_pages(self) -> None:
        """Drop the pages of the weights read in place from resident memory (read again
        from the file, or the kernel's cache, when touched): between layers, so that a
        large model's weights are not all resident at once (a model maps them only
        above :data:`~sconv_onnx.modelio.LARGE_MODEL_BYTES`)."""
        for mapping in self.mappings.values():
            release_pages(mapping)

    def nodes(self) -> Iterator[tuple[gs.Graph, gs.Node]]:
        """``(graph, node)`` for every node of the model, subgraphs included; the weights
        read in place are released between nodes (:meth:`release_pages`: a family's
        ``find`` may read every layer's weight before its search starts)."""
        for owner, node in walk(self.graph):
            yield owner, node
            self.release_pages()

    def shapes(self, graph: gs.Graph) -> tuple[dict, dict]:
        """``(static, concrete)`` shapes for the nodes of ``graph``: none in a subgraph."""
        if graph is self.graph:
            return self.static_shapes, self.concrete_shapes
        return {}, {}


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every constant ``graph``'s nodes read (subgraphs included) and its overridable
    inputs, once each."""
    seen = set()
    tensors = [tensor for _, node in walk(graph) for tensor in node.inputs]
    for tensor in tensors + list(graph.inputs):
        if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def read_in_place(graph: gs.Graph, files: dict) -> None:
    """Give each constant of ``graph`` whose tensor is mapped
    (:func:`~sconv_onnx.modelio.mapped_file`) its values in place in the file, read-only
    (:func:`~sconv_onnx.modelio.mapped_array`; ``files``: the mappings), instead of
    onnx-graphsurgeon's copy made when first read.  An exported rewrite copies the
    values of the constants it keeps."""
    for constant in _constants(graph):
        lazy = constant._values  # onnx-graphsurgeon keeps an unread tensor as LazyValues
        if isinstance(lazy, LazyValues) and isinstance(lazy.tensor, onnx.TensorProto):
            values = mapped_array(lazy.tensor, files)
            if values is not None:
                constant.values = values
                constant.data_location = None  # in memory now, as far as an export goes


def overridable_names(model: onnx.ModelProto) -> set[str]:
    """The main-graph initializers a user may feed at run time: those also listed as
    graph inputs, from IR :data:`OVERRIDABLE_IR` (below it, exporters listed every
    initializer as an input, and runtimes treat them as constants)."""
    if model.ir_version < OVERRIDABLE_IR:
        return set()
    stored = {init.name for init in model.graph.initializer}
    return {inp.name for inp in model.graph.input if inp.name in stored}


def keep_overridable(model: onnx.ModelProto, graph: gs.Graph, files: dict) -> None:
    """Mark the initializers that ``model``'s main graph also lists as inputs (from IR
    :data:`OVERRIDABLE_IR`) and put them back among ``graph``'s inputs, in the model's
    order.

    A user may feed such an input at run time: its initializer is a default, not a
    constant (:func:`~sconv_onnx.passes.graphs.constant_value` does not read it).
    onnx-graphsurgeon imports it as a constant and drops it from the inputs; back
    among them, the export writes it as an input with its initializer again (its
    declared shape becomes the initializer's).
    """
    overridable = overridable_names(model)
    if not overridable:
        return
    stored = {init.name: init for init in model.graph.initializer}
    names = [inp.name for inp in model.graph.input if inp.name in overridable]
    tensors = graph.tensors()
    inputs = {tensor.name: tensor for tensor in graph.inputs}
    for name in names:
        if name not in tensors:  # read by no node: imported nowhere
            values = mapped_array(stored[name], files)  # ``files``: the mappings
            tensors[name] = gs.Constant(name, numpy_helper.to_array(stored[name])
                                        if values is None else values)
        mark_overridable(tensors[name])
        inputs[name] = tensors[name]
    graph.inputs = [inputs[inp.name] for inp in model.graph.input if inp.name in inputs]


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InputError("model imports no default-domain opset")
