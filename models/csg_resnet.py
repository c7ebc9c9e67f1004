"""ResNets whose 3x3 convs a shared slice generator makes (CSG; Omidvar et al. 2021).

A plain ResNet (:mod:`.resnet`) with the kernels of some 3x3 convs replaced
by ``(Z_l G^T).reshape(O_pad, C_pad, 3, 3)[:O, :C]`` from one random generator
``G`` and random codes ``Z_l`` (:func:`sconv_onnx.csg.generated`), each scaled
to a plain weight's mean square; the other layers keep their random weights.
Layouts (:data:`LAYOUTS`, with the slice and code sizes the paper uses):

* ``"firsts"``: ResNet-18, the first 3x3 conv of each block, as the official
  ImageNet code generates them (slice 16, code 128);
* ``"blocks"``: ResNet-18, both 3x3 convs of every block (slice 16, code 128);
* ``"cifar"``: ResNet-20 at CIFAR widths 16/32/64, both 3x3 convs of every
  block (slice 12, code 72: no width is a multiple of 12, so every slice is
  padded).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from sconv_onnx import csg

from . import resnet

#: Layout -> (slice size, code size).
LAYOUTS = {"firsts": (16, 128), "blocks": (16, 128), "cifar": (12, 72)}


def input_shape(layout: str) -> tuple[int, int, int, int]:
    """The ``image`` input's shape for ``layout`` (the full size)."""
    return resnet.CIFAR_INPUT if layout == "cifar" else resnet.input_shape()


def generated_convs(model: onnx.ModelProto, layout: str) -> list[onnx.NodeProto]:
    """The 3x3 convs of the blocks that ``layout`` generates, in graph order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, not {layout!r}")
    wanted = ("conv1",) if layout == "firsts" else ("conv1", "conv2")
    return [node for node in model.graph.node if node.op_type == "Conv"
            and node.name.startswith("layer") and node.name.rsplit(".", 1)[-1] in wanted]


def generated_shapes(model: onnx.ModelProto, layout: str) -> list[tuple[int, ...]]:
    """The weight shapes of the convs ``layout`` generates, in graph order."""
    initializers = {init.name: init for init in model.graph.initializer}
    return [tuple(initializers[node.input[1]].dims) for node in generated_convs(model, layout)]


def build(layout: str = "firsts", seed: int = 0) -> onnx.ModelProto:
    """The model (input ``image``, output ``logits``) at the layout's slice and code sizes."""
    if layout == "cifar":
        model, _ = resnet.cifar("csg_resnet20_cifar", 3, seed=seed)
    else:
        model, _ = resnet.build(f"csg_resnet18_{layout}", (2, 2, 2, 2), False, resnet.plain,
                                seed=seed)
    initializers = {init.name: init for init in model.graph.initializer}
    convs = generated_convs(model, layout)
    shapes = generated_shapes(model, layout)
    rng = np.random.default_rng(seed + 1)
    slice_size, code_size = LAYOUTS[layout]
    for node, weight in zip(convs, csg.generated(rng, shapes, slice_size, code_size)):
        gain = math.sqrt(2.0 / math.prod(weight.shape[1:]) / np.mean(weight**2))
        initializers[node.input[1]].CopyFrom(
            numpy_helper.from_array((weight * gain).astype(np.float32), node.input[1]))
    return model


__all__ = ["LAYOUTS", "build", "generated_convs", "generated_shapes", "input_shape"]
