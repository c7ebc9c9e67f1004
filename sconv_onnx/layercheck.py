"""Each rewritten layer verified on its own, wherever it is in the model.

The end-to-end check (:func:`sconv_onnx.pipeline.verify_outputs`) runs the
model once, so it never sees a rewrite in the branch of an ``If`` that its
inputs do not take, or in a loop body that runs zero times.  Here every
rewritten layer is cut out of both models, the original *region* (the
layer's node, with the nodes it folded) and the rewritten one (the nodes
that now compute the same tensor from the same inputs), and both are run
by onnxruntime on seeded random inputs of the layer's own shapes.

A region is found by walking back from the layer's output tensor to the
layer's non-constant inputs; tensors computed from constants alone
(initializers, ``Constant`` nodes and what is computed from them) come
along.  All layers go into one model per side (tensor names prefixed by the
layer's index), so that the check costs two onnxruntime sessions, not two
per layer; above :data:`CHUNK_BYTES` of constants the layers are split over
several.

The bound per layer (:func:`layer_bound`) is the run's output bound plus
:data:`RESIDUAL_FACTOR` times the chosen candidate's weight residual: a
rewrite computes its structure up to rounding, and an approximate
structure's output error on random inputs is of the order of its weight
residual (for inputs with independent entries, ``E||dW x||^2 / E||W x||^2
= ||dW||_F^2 / ||W||_F^2``; the factor covers max against root mean square).
A wrong rewrite misses it by orders of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .errors import first_line
from .modelio import graphs, subgraphs, tensor_nbytes
from .plan import LayerPlan
from .runtime import observe, run
from .shapes import inferred_skeleton, known_dims, typed_values
from .verify import OutputError, compare_outputs, random_feeds
from .view import overridable_names

#: Verification outcomes: of a run (:attr:`sconv_onnx.report.Report.status`) and of a layer.
PASS, FAIL, UNBOUNDED, SKIPPED, UNCHECKED = "PASS", "FAIL", "UNBOUNDED", "SKIPPED", "UNCHECKED"
#: A layer's bound: the run's output bound plus this many times its weight residual.
RESIDUAL_FACTOR = 4.0
#: Nodes a rewritten region may have; more means the walk left the layer (a bug).
MAX_REGION_NODES = 64
#: Constant bytes per check model (both sides): more layers are checked in several models,
#: so that the check adds little to the peak memory of a large model.
CHUNK_BYTES = 32 * 2**20
#: A dim the shapes do not tell: the batch dim is 1, a spatial dim this or twice
#: the kernel's extent, whichever is larger.
FALLBACK_DIM = 16


@dataclass
class Region:
    """A layer's nodes cut out of a model: ``nodes`` (in model order), the ``constants``
    (initializers) they read, the ``leaves`` (tensors fed from outside) and ``output``."""

    output: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: list[TensorProto] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)
    #: why the region cannot be checked alone (None: it can)
    problem: str | None = None

    def release(self) -> None:
        """Drop the nodes and constants: they belong to the model they were cut from, and
        would keep all of it in memory."""
        self.nodes, self.constants = [], []

    @property
    def constant_bytes(self) -> int:
        return sum(tensor_nbytes(tensor) for tensor in self.constants)


class ModelIndex:
    """Where every tensor of a model (subgraphs included) comes from.

    One map serves every scope: names are unique along each chain of nested
    graphs (SSA with lexical scoping); sibling subgraphs may reuse one, which
    :attr:`repeated` records.  An initializer a user may override
    (:func:`~sconv_onnx.view.overridable_names`) is not a constant.
    """

    def __init__(self, model: onnx.ModelProto):
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.initializers: dict[str, TensorProto] = {}
        self.order: dict[int, int] = {}
        #: tensors made in more than one graph (sibling subgraphs may reuse a name)
        self.repeated: set[str] = set()
        overridable = overridable_names(model)
        for graph in graphs(model.graph):
            for init in graph.initializer:
                if init.name not in overridable:
                    self.initializers[init.name] = init
            for node in graph.node:
                self.order[id(node)] = len(self.order)
                for name in node.output:
                    if name in self.producers:
                        self.repeated.add(name)
                    if name:
                        self.producers[name] = node
                for name in node.input:
                    self.consumers.setdefault(name, []).append(node)
        self._constant: dict[str, bool] = {}

    def is_constant(self, name: str) -> bool:
        """Whether ``name`` is computed from constants alone (no control flow on the way)."""
        if name not in self._constant:
            self._constant[name] = False  # a cycle (impossible in a valid graph) stays non-constant
            node = self.producers.get(name)
            self._constant[name] = name in self.initializers or (
                node is not None and not any(True for _ in subgraphs(node))
                and all(self.is_constant(inp) for inp in node.input if inp))
        return self._constant[name]

    def region(self, output: str, stop: set[str], limit: int | None = None) -> Region:
        """The nodes computing ``output`` back to the tensors in ``stop``.

        A tensor that is neither in ``stop``, nor an initializer, nor made by a
        node becomes a leaf too (a graph input, a loop body's input).
        """
        region = Region(output)
        seen: set[str] = set()
        nodes: dict[int, onnx.NodeProto] = {}
        pending = [output]
        while pending:
            name = pending.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            node = self.producers.get(name)
            if name in stop or (node is None and name not in self.initializers):
                region.leaves.append(name)
            elif name in self.initializers:
                region.constants.append(self.initializers[name])
            elif id(node) not in nodes:
                nodes[id(node)] = node
                if limit is not None and len(nodes) > limit:
                    region.problem = f"its rewrite spans more than {limit} nodes"
                    return region
                pending.extend(node.input)
        region.nodes = sorted(nodes.values(), key=lambda node: self.order[id(node)])
        if any(any(True for _ in subgraphs(node)) for node in region.nodes):
            region.problem = "its nodes hold subgraphs"
        return region

    def layer_output(self, layer: LayerPlan, rewritten: ModelIndex) -> str:
        """The tensor both models compute for ``layer``: its output, or the output of the
        last node it folded (a BatchNormalization the rewrite absorbed)."""
        name = layer.key
        for _ in layer.folded:  # each folded node is the single consumer of the one before
            after = self.consumers.get(name, [])
            if name in rewritten.producers or len(after) != 1 or not after[0].output:
                break
            name = after[0].output[0]
        return name


def original_inputs(index: ModelIndex, layer: LayerPlan) -> set[str]:
    """The original layer node's inputs that are not constants: where regions stop."""
    node = index.producers.get(layer.key)
    return set() if node is None else {name for name in node.input
                                       if name and not index.is_constant(name)}


def layer_bound(max_error: float, layer: LayerPlan) -> float:
    """The bound of ``layer``'s own relative output error (see the module doc)."""
    residual = layer.chosen.residual if layer.chosen is not None else 0.0
    return max_error + RESIDUAL_FACTOR * residual


@dataclass
class LayerCheck:
    """One layer's regions in both models, and the check's result."""

    layer: LayerPlan
    original: Region
    rewritten: Region
    bound: float
    #: whether the layer sits in a subgraph (an ``If`` branch, a loop body), where the
    #: end-to-end check may never run it
    in_subgraph: bool = False
    #: shapes for the layer's inputs where the shapes inference tells are unknown
    #: (:func:`fallback_shape`)
    fallbacks: dict[str, list[int]] = field(default_factory=dict)
    error: OutputError | None = None

    @property
    def status(self) -> str:
        """``PASS``; ``FAIL`` (over its bound, or the rewritten region is broken: it does
        not compute the layer's tensor, spans too many nodes or does not run); or
        ``UNCHECKED``: the original region cannot run alone.  An unchecked layer of the
        main graph is covered by the end-to-end check (every input reaches it); one in
        a subgraph fails the run (:attr:`unverified`)."""
        if self.rewritten.problem is not None:
            return FAIL
        if self.error is None:
            return UNCHECKED
        return PASS if self.error.problem is None and self.error.max_rel <= self.bound else FAIL

    @property
    def unverified(self) -> bool:
        """Whether nothing checked this layer: not alone, and maybe not end to end."""
        return self.status == UNCHECKED and self.in_subgraph

    def summary(self) -> str:
        """The check's result in words."""
        problem = self.rewritten.problem or self.original.problem
        if problem is None and self.error is not None:
            problem = self.error.problem
        if problem is not None:
            return problem
        return f"max rel error {self.error.max_rel:.3g}, bound {self.bound:.3g}"

    def to_dict(self) -> dict:
        error = self.error
        return {"layer": self.layer.node, "key": self.layer.key, "status": self.status,
                "bound": self.bound, "max_abs": None if error is None else error.max_abs,
                "max_rel": None if error is None else error.max_rel, "summary": self.summary()}


def value_types(model: onnx.ModelProto) -> dict[str, tuple[int, list | None]]:
    """``{tensor: (elem_type, dims)}`` of every typed tensor of ``model``'s graphs,
    subgraphs included (pass a model with shapes inferred)."""
    return {name: typed for graph in graphs(model.graph)
            for name, typed in typed_values(graph).items() if typed[0]}


def _attr(node: onnx.NodeProto, name: str, default):
    found = next((attr for attr in node.attribute if attr.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def fallback_shape(node: onnx.NodeProto, layer: LayerPlan, name: str) -> list[int]:
    """A shape for the layer node's input ``name`` where inference tells none: what the
    layer's weight and attributes require (a conv's rank and input channels, a fully
    connected layer's input features), batch 1, and spatial sizes of
    :data:`FALLBACK_DIM` or twice the dilated kernel, whichever is larger."""
    weight = layer.weight_shape
    if node.op_type in ("Conv", "ConvTranspose") and len(weight) > 2 and name == node.input[0]:
        kernel = weight[2:]
        dilations = _attr(node, "dilations", [1] * len(kernel))
        channels = weight[0] if node.op_type == "ConvTranspose" else weight[1] * layer.group
        return [1, channels] + [max(FALLBACK_DIM, 2 * ((k - 1) * d + 1))
                                for k, d in zip(kernel, dilations)]
    if node.op_type == "Gemm" and len(weight) == 2 and name == node.input[0]:
        return [weight[1], 1] if _attr(node, "transA", 0) else [1, weight[1]]
    if node.op_type == "MatMul" and len(weight) == 2 and name == node.input[0]:
        return [1, weight[1]]
    return []


def _leaf_shape(dims: list, fallback: list[int]) -> tuple[int, ...]:
    """``dims`` where known; else ``fallback``, else the batch 1 and :data:`FALLBACK_DIM`."""
    if known_dims(dims):
        return tuple(dims)
    if fallback and (not dims or len(dims) == len(fallback)):
        return tuple(d if isinstance(d, int) and d > 0 else f for d, f in
                     zip(dims or fallback, fallback))
    return tuple(d if isinstance(d, int) and d > 0 else (1 if axis == 0 else FALLBACK_DIM)
                 for axis, d in enumerate(dims or ()))


def plan_checks(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                layers: Iterable[LayerPlan], max_error: float) -> list[LayerCheck]:
    """Cut every rewritten layer's regions out of both models."""
    before, after = ModelIndex(original), ModelIndex(rewritten)
    main = {name for node in original.graph.node for name in node.output}
    checks = []
    for layer in layers:
        stop = original_inputs(before, layer)
        output = before.layer_output(layer, after)
        old = before.region(output, stop)
        new = after.region(output, stop, MAX_REGION_NODES)
        if output not in after.producers:
            new.problem = f"the rewritten model does not compute {output!r}"
        if output in before.repeated or output in after.repeated:
            new.problem = (f"tensor {output!r} is made in more than one subgraph: the layer "
                           f"cannot be told apart from its namesake")
        node = before.producers.get(layer.key)
        fallbacks = {name: fallback_shape(node, layer, name) for name in stop} if node else {}
        checks.append(LayerCheck(layer, old, new, layer_bound(max_error, layer),
                                 layer.key not in main, fallbacks))
    return checks


def _leaves(check: LayerCheck) -> list[str]:
    """The tensors either region reads from outside (both get the same values)."""
    return sorted(set(check.original.leaves) | set(check.rewritten.leaves))


def _check_feeds(checks: list[LayerCheck], types: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded random values for every leaf of ``checks``, named ``layer<i>/<leaf>``."""
    inputs, shapes = [], {}
    for i, check in enumerate(checks):
        for name in _leaves(check):
            elem, dims = types.get(name, (TensorProto.FLOAT, None))
            inputs.append(onnx.helper.make_tensor_value_info(f"layer{i}/{name}", elem, None))
            shapes[f"layer{i}/{name}"] = _leaf_shape(dims, check.fallbacks.get(name, []))
    leaves = onnx.helper.make_model(onnx.helper.make_graph([], "leaves", inputs, []))
    return random_feeds(leaves, shapes, seed)


def _check_model(checks: list[LayerCheck], side: str, model: onnx.ModelProto,
                 types: dict) -> onnx.ModelProto:
    """One model holding every check's ``side`` region (``"original"`` or
    ``"rewritten"``), names prefixed ``layer<i>/``; ``model`` gives the opsets."""
    nodes, inits, inputs, outputs = [], [], [], []
    for i, check in enumerate(checks):
        region: Region = getattr(check, side)
        prefix = f"layer{i}/"

        def renamed(name: str, prefix=prefix) -> str:
            return prefix + name if name else name

        for node in region.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = renamed(node.name)  # unnamed nodes stay unnamed (names may repeat)
            copy.input[:] = [renamed(name) for name in node.input]
            copy.output[:] = [renamed(name) for name in node.output]
            nodes.append(copy)
        for tensor in region.constants:
            copy = TensorProto()
            copy.CopyFrom(tensor)
            copy.name = renamed(tensor.name)
            inits.append(copy)
        for name in region.leaves:
            elem = types.get(name, (TensorProto.FLOAT, []))[0]
            inputs.append(onnx.helper.make_tensor_value_info(renamed(name), elem, None))
        elem = types.get(region.output, (0, []))[0]
        outputs.append(onnx.helper.make_tensor_value_info(renamed(region.output), elem, None))
    graph = onnx.helper.make_graph(nodes, f"sconv_layer_check_{side}", inputs, outputs, inits)
    checked = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    checked.ir_version = max(model.ir_version, 4)  # IR 3 wanted initializers listed as inputs
    checked.functions.extend(model.functions)
    return checked


def _run_side(checks: list[LayerCheck], side: str, model: onnx.ModelProto, types: dict,
              feeds: dict) -> dict[str, np.ndarray]:
    """Every check's ``side`` region run on ``feeds`` (those it reads)."""
    checked = _check_model(checks, side, model, types)
    wanted = {inp.name for inp in checked.graph.input}
    return run(checked, {name: value for name, value in feeds.items() if name in wanted})


def check_layers(original: onnx.ModelProto, rewritten: onnx.ModelProto, layers: list[LayerPlan],
                 input_shapes: dict[str, tuple[int, ...]], max_error: float,
                 seed: int = 0, feeds: dict | None = None) -> list[LayerCheck]:
    """Every one of ``layers`` (rewritten in ``rewritten``) checked on its own, on seeded
    random inputs; ``max_error``: the run's output bound (see :func:`layer_bound`).

    The inputs' shapes are those onnx infers at ``input_shapes``.  Where it
    cannot tell them in the main graph, onnxruntime computes them for the
    original model on ``feeds``, and inference runs again from there (into the
    subgraphs); what is still unknown, :func:`fallback_shape`.
    """
    if not layers:
        return []
    skeleton = inferred_skeleton(original, input_shapes)
    types = value_types(skeleton)
    checks = plan_checks(original, rewritten, layers, max_error)
    if feeds is not None and any(not known_dims(types.get(name, (0, None))[1])
                                 for check in checks for name in _leaves(check)):
        observed = observe(original, unknown_tensors(skeleton, types), feeds)
        if observed:
            types = value_types(reinferred(skeleton, observed)) | observed
    run_checks(checks, rewritten, types, seed)
    for check in checks:
        check.original.release()
        check.rewritten.release()
    return checks


def unknown_tensors(skeleton: onnx.ModelProto, types: dict) -> list[str]:
    """The tensors the main graph's nodes make whose type or sizes inference could not
    tell (e.g. behind a ``Loop``)."""
    return [name for node in skeleton.graph.node for name in node.output
            if name and not known_dims(types.get(name, (0, None))[1])]


def reinferred(skeleton: onnx.ModelProto, observed: dict) -> onnx.ModelProto:
    """``skeleton`` inferred again with the ``observed`` types declared, so that the
    subgraphs reading those tensors get sizes too; as it was where inference fails."""
    graph = skeleton.graph
    kept = [value for value in graph.value_info if value.name not in observed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    graph.value_info.extend(onnx.helper.make_tensor_value_info(name, elem, dims)
                            for name, (elem, dims) in observed.items())
    try:
        return onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort
        return skeleton


def run_checks(checks: list[LayerCheck], model: onnx.ModelProto, types: dict,
               seed: int = 0) -> None:
    """Run the checks that can run, in chunks of at most :data:`CHUNK_BYTES` of constants;
    fills each check's ``error``.  ``model`` gives the opsets and functions.  A chunk that
    onnxruntime cannot run (either side) is retried layer by layer, so that one odd layer
    does not hide the others."""
    runnable = [check for check in checks
                if check.original.problem is None and check.rewritten.problem is None]
    for chunk in _chunks(runnable):
        feeds = _check_feeds(chunk, types, seed)
        try:
            reference = _run_side(chunk, "original", model, types, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            if len(chunk) > 1:
                for check in chunk:
                    run_checks([check], model, types, seed)
                continue
            chunk[0].original.problem = f"onnxruntime cannot run the layer alone: {first_line(exc)}"
            continue
        try:
            candidate = _run_side(chunk, "rewritten", model, types, feeds)
        except Exception as exc:  # noqa: BLE001 - any onnxruntime failure
            if len(chunk) > 1:
                for check in chunk:
                    run_checks([check], model, types, seed)
                continue
            reason = f"the rewritten layer does not run: {first_line(exc)}"
            chunk[0].error = OutputError(chunk[0].layer.key, math.inf, math.inf, reason)
            continue
        for i, check in enumerate(chunk):
            name = f"layer{i}/{check.original.output}"
            error = compare_outputs({name: reference[name]}, {name: candidate[name]})[0]
            error.name = check.layer.key
            check.error = error


def _chunks(checks: list[LayerCheck]) -> Iterable[list[LayerCheck]]:
    chunk, size = [], 0
    for check in checks:
        weight = check.original.constant_bytes + check.rewritten.constant_bytes
        if chunk and size + weight > CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(check)
        size += weight
    if chunk:
        yield chunk
