"""ResNet-18 structured over space and half the input channels.

Every 3x3 conv at sizes ``(C/2, 2, 2)``, every 1x1 downsample conv at
``(C/2, 1, 1)`` (``C`` = the conv's input channels); the 7x7 stem and the fc
are plain.  Layout and names: :mod:`.resnet`.

    python -m sconv_onnx.models.build struct_resnet18_b out.onnx
"""

from __future__ import annotations

import onnx

from . import resnet
from .common import Claims
from .resnet import CLASSES, INPUT_NAME, input_shape

NAME = "struct_resnet18_b"
__all__ = ["CLASSES", "INPUT_NAME", "NAME", "build", "build_with_claims",
           "claimed_structures", "input_shape"]


def rule_3x3(channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    return (channels // 2, 2, 2)


def rule_1x1(channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    return (channels // 2, 1, 1)


def build_with_claims(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
                      size: str = "full") -> tuple[onnx.ModelProto, Claims]:
    """The model and ``{node name: claimed sizes or None}`` for every Conv and Gemm."""
    return resnet.build(NAME, (2, 2, 2, 2), False, rule_3x3, rule_1x1, seed=seed, noise=noise,
                        batchnorm=batchnorm, size=size)


def build(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
          size: str = "full") -> onnx.ModelProto:
    """Input ``image`` (:func:`input_shape`), output ``logits`` 1x1000."""
    return build_with_claims(seed, noise, batchnorm, size)[0]


def claimed_structures(size: str = "full") -> Claims:
    """``{node name: sizes or None}``: the structure each Conv/Gemm was built with."""
    return build_with_claims(size=size)[1]
