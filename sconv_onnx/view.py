"""The model as families see it: the loaded model, its graph view and its shapes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from .errors import InputError
from .passes.graphs import walk
from .shapes import infer_tensor_shapes


@dataclass
class ModelView:
    """A loaded model and what ``find`` reads of it.

    ``graph`` is the onnx-graphsurgeon view, imported once per run and
    never modified (rewrites go to a copy, :class:`~sconv_onnx.passes.base.Emitter`).
    ``static_shapes`` are the shapes onnx infers from the declared inputs,
    ``concrete_shapes`` those at the run's concrete input shapes (main graph
    only: inference does not reach into subgraphs).
    """

    model: onnx.ModelProto
    graph: gs.Graph
    opset: int
    static_shapes: dict
    concrete_shapes: dict

    @classmethod
    def of(cls, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> ModelView:
        """Import ``model`` and infer its shapes, statically and at ``input_shapes``."""
        static = infer_tensor_shapes(model)
        concrete = infer_tensor_shapes(model, input_shapes) if input_shapes else static
        return cls(model, gs.import_onnx(model), default_opset(model), static, concrete)

    def nodes(self) -> Iterator[tuple[gs.Graph, gs.Node]]:
        """``(graph, node)`` for every node of the model, subgraphs included."""
        return walk(self.graph)

    def shapes(self, graph: gs.Graph) -> tuple[dict, dict]:
        """``(static, concrete)`` shapes for the nodes of ``graph``: none in a subgraph."""
        if graph is self.graph:
            return self.static_shapes, self.concrete_shapes
        return {}, {}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InputError("model imports no default-domain opset")
