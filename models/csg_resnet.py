"""ResNet-18s whose 3x3 convs a shared slice generator makes (CSG; Omidvar et al. 2021).

A plain ResNet-18 (:mod:`.resnet`) with the kernels of some 3x3 convs replaced
by ``(Z_l G^T).reshape(O, C, 3, 3)`` from one random generator ``G`` and
random codes ``Z_l`` (:func:`sconv_onnx.csg.generated`), scaled to a plain
weight's mean square; the other layers keep their random weights.  Layouts:

* ``"firsts"``: the first 3x3 conv of each block, as the official ImageNet
  code generates them (slice 16, code 128);
* ``"blocks"``: both 3x3 convs of every block.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from sconv_onnx import csg

from . import resnet

LAYOUTS = ("firsts", "blocks")


def generated_convs(model: onnx.ModelProto, layout: str) -> list[onnx.NodeProto]:
    """The 3x3 convs of the blocks that ``layout`` generates, in graph order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    wanted = ("conv1",) if layout == "firsts" else ("conv1", "conv2")
    return [node for node in model.graph.node if node.op_type == "Conv"
            and node.name.startswith("layer") and node.name.rsplit(".", 1)[-1] in wanted]


def build(layout: str = "firsts", slice_size: int = 16, code_size: int = 128, seed: int = 0,
          size: str = "full") -> onnx.ModelProto:
    """The model (input ``image``, output ``logits``)."""
    model, _ = resnet.build(f"csg_resnet18_{layout}", (2, 2, 2, 2), False, resnet.plain,
                            seed=seed, size=size)
    initializers = {init.name: init for init in model.graph.initializer}
    convs = generated_convs(model, layout)
    shapes = [tuple(initializers[node.input[1]].dims) for node in convs]
    rng = np.random.default_rng(seed + 1)
    for node, weight in zip(convs, csg.generated(rng, shapes, slice_size, code_size)):
        gain = math.sqrt(2.0 / math.prod(weight.shape[1:]) / np.mean(weight**2))
        initializers[node.input[1]].CopyFrom(
            numpy_helper.from_array((weight * gain).astype(np.float32), node.input[1]))
    return model


__all__ = ["LAYOUTS", "build", "generated_convs"]
