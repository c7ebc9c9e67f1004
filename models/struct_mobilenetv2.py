"""MobileNetV2 (width 1.0) with structured depthwise and pointwise convs.

Layout as torchvision's ``mobilenet_v2``: stem 3x3/2 conv (32), the
inverted-residual table below, a last 1x1 conv (1280), GlobalAveragePool,
Flatten and the classifier Gemm (-> 1000).  ReLU6 is ``Clip(x, 0, 6)`` with
constant bounds; a block adds its input when its stride is 1 and its input
and output widths agree (decided on the full widths, so ``size="small"`` has
the same topology).

Structure: every depthwise 3x3 conv at sizes ``(1, 2, 2)``, every pointwise
(1x1) conv at ``(C/2, 1, 1)`` with ``C`` its input channels (plain if ``C`` is
odd or below 2).  The stem and the classifier are plain.

Names: ``features.0`` (stem), ``features.<i>.expand`` / ``.depthwise`` /
``.project`` / ``.add`` for block ``i`` = 1..17, ``features.18`` (last 1x1),
``classifier``; BatchNorm nodes ``<conv>.bn``.

    python -m sconv_onnx.models.build struct_mobilenetv2 out.onnx
"""

from __future__ import annotations

import onnx

from .common import Claims, NetBuilder, check_size, float_input, width

NAME = "struct_mobilenetv2"
CLASSES = 1000
INPUT_NAME = "image"
STEM = 32
LAST = 1280
#: Inverted-residual settings: expansion t, output channels c, repeats n, first stride s.
SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
#: Weight scale of the projection conv of a block with a residual Add (keeps
#: activations O(1) over the depth, as trained BN statistics would).
RESIDUAL_GAIN = 1.0


def input_shape(size: str = "full") -> tuple[int, int, int, int]:
    """``image`` shape: 1x3x224x224 (full) or 1x3x32x32 (small)."""
    return (1, 3, 224, 224) if check_size(size) == "full" else (1, 3, 32, 32)


def pointwise_sizes(channels: int) -> tuple[int, int, int] | None:
    """``(C/2, 1, 1)``, or ``None`` (plain) when ``C`` is odd or below 2."""
    return (channels // 2, 1, 1) if channels >= 2 and channels % 2 == 0 else None


def build_with_claims(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
                      size: str = "full") -> tuple[onnx.ModelProto, Claims]:
    """The model and ``{node name: claimed sizes or None}`` for every Conv and Gemm."""
    g = NetBuilder(NAME, seed, noise, batchnorm)
    channels = width(STEM, size)
    x = g.conv_bn("features.0", INPUT_NAME, 3, channels, (3, 3), None, stride=2, pad=1)
    x = g.relu6("features.0.relu6", x)
    full_in, index = STEM, 1
    for t, full_out, repeats, first_stride in SETTINGS:
        out = width(full_out, size)
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            residual = stride == 1 and full_in == full_out
            x = _inverted_residual(g, f"features.{index}", x, channels, out, t, stride, residual)
            channels, full_in, index = out, full_out, index + 1
    last = width(LAST, size)
    x = g.conv_bn(f"features.{index}", x, channels, last, (1, 1), pointwise_sizes(channels))
    x = g.relu6(f"features.{index}.relu6", x)
    g.classifier(x, last, CLASSES, name="classifier")
    model = g.model([float_input(INPUT_NAME, input_shape(size))],
                    [float_input("logits", (1, CLASSES))])
    return model, g.claims


def _inverted_residual(g: NetBuilder, prefix: str, x: str, channels: int, out: int,
                       t: int, stride: int, residual: bool) -> str:
    hidden = channels * t
    y = x
    if t != 1:
        y = g.conv_bn(f"{prefix}.expand", y, channels, hidden, (1, 1), pointwise_sizes(channels))
        y = g.relu6(f"{prefix}.expand.relu6", y)
    y = g.conv_bn(f"{prefix}.depthwise", y, hidden, hidden, (3, 3), (1, 2, 2),
                  stride=stride, pad=1, group=hidden)
    y = g.relu6(f"{prefix}.depthwise.relu6", y)
    y = g.conv_bn(f"{prefix}.project", y, hidden, out, (1, 1), pointwise_sizes(hidden),
                  gain=RESIDUAL_GAIN if residual else 1.0)
    return g.add(f"{prefix}.add", y, x) if residual else y


def build(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
          size: str = "full") -> onnx.ModelProto:
    """Input ``image`` (:func:`input_shape`), output ``logits`` 1x1000."""
    return build_with_claims(seed, noise, batchnorm, size)[0]


def claimed_structures(size: str = "full") -> Claims:
    """``{node name: sizes or None}``: the structure each Conv/Gemm was built with."""
    return build_with_claims(size=size)[1]
