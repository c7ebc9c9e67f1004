"""ResNet-18 whose every 3x3 conv is structured at n=2 over all its input channels.

Sizes ``(C, 2, 2)``: the 3x3 kernels are sums of four 2x2 boxes, no channel
structure.  The 7x7 stem, the 1x1 downsample convs and the fc are plain.
Layout and names: :mod:`.resnet`.

    python -m sconv_onnx.models.build struct_resnet18_a out.onnx
"""

from __future__ import annotations

import onnx

from . import resnet
from .common import Claims
from .resnet import CLASSES, INPUT_NAME, input_shape

NAME = "struct_resnet18_a"
__all__ = ["CLASSES", "INPUT_NAME", "NAME", "build", "build_with_claims",
           "claimed_structures", "input_shape"]


def rule_3x3(channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    return (channels, 2, 2)


def build_with_claims(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
                      size: str = "full") -> tuple[onnx.ModelProto, Claims]:
    """The model and ``{node name: claimed sizes or None}`` for every Conv and Gemm."""
    return resnet.build(NAME, (2, 2, 2, 2), False, rule_3x3, seed=seed, noise=noise,
                        batchnorm=batchnorm, size=size)


def build(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
          size: str = "full") -> onnx.ModelProto:
    """Input ``image`` (:func:`input_shape`), output ``logits`` 1x1000."""
    return build_with_claims(seed, noise, batchnorm, size)[0]


def claimed_structures(size: str = "full") -> Claims:
    """``{node name: sizes or None}``: the structure each Conv/Gemm was built with."""
    return build_with_claims(size=size)[1]
