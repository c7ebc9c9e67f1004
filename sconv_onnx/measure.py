"""``--select measured``: time each layer's candidate rewrites on its real shapes.

For one Conv site, a model holding just that layer (with the layer's own
weight, attributes and concrete input shape, batch 1) is built once as is
and once per candidate ``(structure, lowering)``, rewritten by the pass's
own :func:`rewrite`.  All are timed side by side (:mod:`sconv_onnx.bench`
rules) and each candidate gets the median of its per-round time ratios
against the original.  Results are cached per layer signature (geometry,
dtype, opset, candidate, threads), so the repeated blocks of a network are
measured once.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from .bench import default_threads, time_sessions, timing_session
from .plan import REWRITE, LayerPlan


class Measurer:
    """Times candidate rewrites of single layers; caches by signature."""

    def __init__(self, threads: int | None = None, runs: int = 30, warmup: int = 5):
        self.threads = threads or default_threads()
        self.runs = runs
        self.warmup = warmup
        self.cache: dict[tuple, float] = {}

    def _signature(self, site, structure, lowering) -> tuple:
        return (site.geometry, str(site.weight.dtype), site.opset, structure.sizes, lowering,
                self.threads)

    def ratios(self, site, candidates: list) -> list[float]:
        """Measured time of each ``(structure, lowering)`` over the original layer's."""
        missing = [c for c in candidates if self._signature(site, *c) not in self.cache]
        if missing:
            original = single_layer_model(site)
            models = [original] + [rewritten_layer_model(site, original, s, lo) for s, lo in missing]
            feeds = {"x": _random_input(site)}
            sessions = [timing_session(model, self.threads) for model in models]
            seconds = time_sessions(sessions, feeds, self.runs, self.warmup)
            for (structure, lowering), row in zip(missing, seconds[1:]):
                ratio = float(np.median(row / seconds[0]))
                self.cache[self._signature(site, structure, lowering)] = ratio
        return [self.cache[self._signature(site, *c)] for c in candidates]


def _random_input(site) -> np.ndarray:
    geom = site.geometry
    shape = (1, geom.in_channels) + tuple(geom.in_spatial)
    return np.random.default_rng(0).uniform(-1, 1, shape).astype(site.weight.dtype)


def single_layer_model(site) -> onnx.ModelProto:
    """``y = Conv(x, W[, b])`` with the site's weight and explicit attributes."""
    geom = site.geometry
    elem = helper.np_dtype_to_tensor_dtype(site.weight.dtype)
    inputs, inits = ["x", "W"], [numpy_helper.from_array(site.weight, "W")]
    if site.bias_size:
        inits.append(numpy_helper.from_array(np.zeros(site.bias_size, site.weight.dtype), "B"))
        inputs.append("B")
    node = helper.make_node(
        "Conv", inputs, ["y"], name="layer", kernel_shape=list(geom.kernel),
        strides=list(geom.strides), dilations=list(geom.dilations), pads=list(geom.pads),
        group=geom.group,
    )
    x_shape = [1, geom.in_channels] + list(geom.in_spatial)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, None)], inits,
    )
    opsets = [helper.make_opsetid("", site.opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def rewritten_layer_model(site, original: onnx.ModelProto, structure, lowering) -> onnx.ModelProto:
    """The single-layer model rewritten with ``structure`` and ``lowering``."""
    from .modelio import restore_model_fields
    from .passes import structured_conv

    graph = gs.import_onnx(original)
    (node,) = graph.nodes
    layer_site = structured_conv.ConvSite(
        graph, node, "layer", site.weight, site.bias_size, site.geometry, site.opset
    )
    layer = LayerPlan(node="layer", op="Conv", weight_shape=tuple(site.weight.shape),
                      chosen=structure, lowering=lowering, decision=REWRITE)
    structured_conv.rewrite(layer_site, layer, {"x", "W", "B", "y", "layer"}, {})
    model = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(original, model)
    return model
