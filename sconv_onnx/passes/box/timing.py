"""Single-layer models for ``select="measured"``: a Conv site as is and rewritten.

For one Conv site, a small model holding that layer (its own weight,
attributes and concrete input shape, batch 1) is built as is and once per
candidate, rewritten by the family's own emit (:func:`.conv.emit` for the box
family, any family's through :func:`emitted_layer_model`), so that what is
timed is what would be written.  Two details keep a layer's measurement
close to its cost inside the network:

* the layer sits between two depthwise 1x1 convs, so that, as in a CNN,
  its input and output live in onnxruntime's blocked NCHWc layout and an op
  that does not (CumSum, Slice) pays its layout conversions;
* a pool that an earlier layer already computes (shared) is a model input,
  not a node: the candidate pays only for what it adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from ...modelio import restore_model_fields
from ...plan import Candidate
from ..base import Emitter
from .conv import ConvLowered, ConvSite, emit


def _depthwise_identity(name: str, x: str, y: str, channels: int, rank: int, dtype):
    """A depthwise 1x1 conv with unit weights: ``y = x``, in onnxruntime's conv layout."""
    weight = numpy_helper.from_array(np.ones((channels, 1) + (1,) * rank, dtype=dtype), f"{name}.w")
    node = helper.make_node("Conv", [x, weight.name], [y], name=name, group=channels,
                            kernel_shape=[1] * rank)
    return node, weight


def single_layer_model(site: ConvSite) -> onnx.ModelProto:
    """``y = post(Conv(pre(x), W[, b]))`` with the site's weight and explicit attributes."""
    geom = site.geometry
    rank = len(geom.kernel)
    dtype = site.weight.dtype
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    pre, pre_w = _depthwise_identity("pre", "x", "layer_in", geom.in_channels, rank, dtype)
    post, post_w = _depthwise_identity("post", "layer_out", "y", geom.out_channels, rank, dtype)
    inputs, inits = ["layer_in", "W"], [numpy_helper.from_array(site.weight, "W"), pre_w, post_w]
    if site.bias_size:
        inits.append(numpy_helper.from_array(np.zeros(site.bias_size, dtype), "B"))
        inputs.append("B")
    layer = helper.make_node(
        "Conv", inputs, ["layer_out"], name="layer", kernel_shape=list(geom.kernel),
        strides=list(geom.strides), dilations=list(geom.dilations), pads=list(geom.pads),
        group=geom.group,
    )
    x_shape = [1, geom.in_channels] + list(geom.in_spatial)
    graph = helper.make_graph(
        [pre, layer, post], "layer", [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, None)], inits,
    )
    opsets = [helper.make_opsetid("", site.opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def _pooled_shape(site: ConvSite, lowered: ConvLowered, kind: str) -> list[int]:
    """Shape of the channel or spatial pool's output for ``site`` (batch 1)."""
    geom = site.geometry
    spatial = geom.in_spatial if kind == "channel pool" else geom.pooled_spatial(lowered.spatial.window)
    return [1, lowered.small_channels, *spatial]


def emitted_layer_model(site: ConvSite, original: onnx.ModelProto,
                        write: Callable[[ConvSite, Emitter, gs.Graph], None]) -> onnx.ModelProto:
    """The single-layer model ``original`` (:func:`single_layer_model`) with its layer
    rewritten by ``write(layer_site, emitter, graph)``: any family's emit, on a site of
    that model (no BatchNormalization: its weight is the site's, folded)."""
    graph = gs.import_onnx(original)
    node = next(n for n in graph.nodes if n.name == "layer")
    layer_site = dataclasses.replace(site, graph=graph, node=node, batchnorm=None)
    write(layer_site, Emitter(graph, copy=False), graph)
    model = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(original, model)
    return model


def rewritten_layer_model(site: ConvSite, original: onnx.ModelProto, candidate: Candidate,
                          shared: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The single-layer model rewritten with ``candidate``; the pools whose kinds are in
    ``shared`` become graph inputs ``shared_<n>``."""

    def write(layer_site: ConvSite, emitter: Emitter, graph: gs.Graph) -> None:
        lowered = ConvLowered.of(layer_site, candidate.payload.structure,
                                 candidate.payload.lowering)
        inputs = {}
        for index, kind in enumerate(sorted(shared)):
            tensor = gs.Variable(f"shared_{index}", site.weight.dtype,
                                 _pooled_shape(site, lowered, kind))
            emitter.provide(lowered.keys[kind], tensor)
            inputs[kind] = tensor
        # the spatial pool alone feeds the conv when both are shared
        graph.inputs.extend(tensor for kind, tensor in inputs.items()
                            if not (kind == "channel pool" and "spatial pool" in inputs))
        emit(layer_site, candidate.payload, emitter)

    return emitted_layer_model(site, original, write)


def measure_alone(site: ConvSite, trials: list[tuple[Candidate, tuple[str, ...]]], timer,
                  variant: Callable[[ConvSite, onnx.ModelProto, Candidate, tuple[str, ...]],
                                    onnx.ModelProto],
                  key: Callable[[Candidate], Hashable]) -> list[float] | None:
    """Each trial's time over the original layer's, the layer timed alone (module doc):
    ``variant(site, original, candidate, shared)`` builds a candidate's model, ``key``
    says what its timing depends on besides the layer; None without known shapes."""
    if not site.geometry.in_spatial:
        return None
    holder: dict = {}

    def original():
        holder["model"] = single_layer_model(site)
        return holder["model"]

    def build(candidate, shared):
        return lambda: variant(site, holder["model"], candidate, shared)

    return timer.ratios(
        (signature(site), original),
        [(signature(site) + (key(candidate), tuple(sorted(shared))), build(candidate, shared))
         for candidate, shared in trials])


def signature(site: ConvSite) -> tuple:
    """What the original layer's timing depends on (a candidate's adds what it writes)."""
    return (site.geometry, str(site.weight.dtype), site.opset, site.bias_size > 0)
