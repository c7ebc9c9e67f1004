"""``--select measured``: time each layer's candidate rewrites on its real shapes.

For one Conv site, a small model holding that layer (its own weight,
attributes and concrete input shape, batch 1) is built once as is and once
per candidate ``(structure, lowering, shared pools)``, rewritten by the
pass's own :func:`~sconv_onnx.passes.structured_conv.rewrite`.  All are timed
side by side (:mod:`sconv_onnx.bench` rules) and each candidate gets the
median of its per-round time ratios against the original.

Two details keep a layer's measurement close to its cost inside the network:

* the layer sits between two depthwise 1x1 convs, so that, as in a CNN,
  its input and output live in onnxruntime's blocked NCHWc layout and an op
  that does not (CumSum, Slice) pays its layout conversions;
* a pool that an earlier layer already computes (``shared``) is a model
  input, not a node: the candidate pays only for what it adds.

Results are cached per layer signature (geometry, dtype, opset, candidate,
threads), so the repeated blocks of a network are measured once.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from .bench import default_threads, time_sessions, timing_session
from .plan import REWRITE, LayerPlan

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64}


class Measurer:
    """Times candidate rewrites of single layers; caches by signature."""

    def __init__(self, threads: int | None = None, runs: int = 30, warmup: int = 5):
        self.threads = threads or default_threads()
        self.runs = runs
        self.warmup = warmup
        self.cache: dict[tuple, float] = {}

    def _signature(self, site, structure, lowering, shared) -> tuple:
        return (site.geometry, str(site.weight.dtype), site.opset, structure.sizes, lowering,
                shared, self.threads)

    def ratios(self, site, candidates: list) -> list[float]:
        """Measured time of each ``(structure, lowering, shared)`` over the original layer's."""
        missing = [c for c in candidates if self._signature(site, *c) not in self.cache]
        if missing:
            original = single_layer_model(site)
            variants = [rewritten_layer_model(site, original, *c) for c in missing]
            sessions = [timing_session(model, self.threads) for model in [original, *variants]]
            feeds = _random_feeds(sessions)
            seconds = time_sessions(sessions, feeds, self.runs, self.warmup)
            for candidate, row in zip(missing, seconds[1:]):
                self.cache[self._signature(site, *candidate)] = float(np.median(row / seconds[0]))
        return [self.cache[self._signature(site, *c)] for c in candidates]


def _random_feeds(sessions) -> list[dict]:
    """Per session, a seeded random array for each of its inputs."""
    rng = np.random.default_rng(0)
    return [
        {inp.name: rng.uniform(-1, 1, inp.shape).astype(_ORT_FLOATS[inp.type])
         for inp in sess.get_inputs()}
        for sess in sessions
    ]


def _depthwise_identity(name: str, x: str, y: str, channels: int, rank: int, dtype):
    """A depthwise 1x1 conv with unit weights: ``y = x``, in onnxruntime's conv layout."""
    weight = numpy_helper.from_array(np.ones((channels, 1) + (1,) * rank, dtype=dtype), f"{name}.w")
    node = helper.make_node("Conv", [x, weight.name], [y], name=name, group=channels,
                            kernel_shape=[1] * rank)
    return node, weight


def single_layer_model(site) -> onnx.ModelProto:
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


def _pooled_shape(site, structure, lowering, kind: str) -> list[int]:
    """Shape of the channel or spatial pool's output for ``site`` (batch 1)."""
    geom = site.geometry
    channels = geom.group * structure.channels if lowering.channel else geom.in_channels
    spatial = list(geom.in_spatial)
    if kind == "spatial":
        rank = len(spatial)
        window = [k - n + 1 for k, n in zip(geom.kernel, structure.kernel)]
        spatial = [spatial[i] + geom.pads[i] + geom.pads[rank + i] - geom.dilations[i] * (window[i] - 1)
                   for i in range(rank)]
    return [1, channels] + spatial


def rewritten_layer_model(site, original, structure, lowering, shared=frozenset()) -> onnx.ModelProto:
    """The single-layer model rewritten with ``structure`` and ``lowering``.

    Pools named in ``shared`` become graph inputs ``shared_<kind>``.
    """
    from .modelio import restore_model_fields
    from .passes import structured_conv

    graph = gs.import_onnx(original)
    node = next(n for n in graph.nodes if n.name == "layer")
    layer_site = structured_conv.ConvSite(
        graph, node, "layer", site.weight, site.bias_size, site.geometry, site.opset
    )
    pools = {}
    keys = structured_conv.pool_keys(layer_site, structure, lowering)
    for kind in sorted(shared):
        dtype = site.weight.dtype
        tensor = gs.Variable(f"shared_{kind}", dtype, _pooled_shape(site, structure, lowering, kind))
        graph.inputs.append(tensor)
        pools[keys[kind]] = tensor
    if "spatial" in shared and "channel" in shared:  # the spatial pool alone feeds the conv
        graph.inputs.remove(pools.pop(keys["channel"]))
    layer = LayerPlan(node="layer", op="Conv", weight_shape=tuple(site.weight.shape),
                      chosen=structure, lowering=lowering, decision=REWRITE)
    names = {t for t in graph.tensors()} | {n.name for n in graph.nodes}
    structured_conv.rewrite(layer_site, layer, names, pools)
    model = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(original, model)
    return model


__all__ = ["Measurer", "rewritten_layer_model", "single_layer_model"]
