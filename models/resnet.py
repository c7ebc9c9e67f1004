"""ResNet-18 and ResNet-50 (torchvision layout) with structured conv weights.

Shared by the ``struct_resnet*`` builders, which differ only in the structure
rule of their convs.  Layout as torchvision's ``resnet18`` / ``resnet50``
(v1.5: the bottleneck's stride sits on its 3x3 conv):

    conv1 7x7/2 (64) -> relu -> maxpool 3x3/2 pad 1
    -> layer1..layer4 (64/128/256/512; stride 2 at the first block of layer2..4,
       1x1 downsample conv on the shortcut where the shape changes)
    -> GlobalAveragePool -> Flatten -> fc (Gemm -> 1000)

Node names follow the PyTorch modules: ``conv1``, ``layer2.0.conv1``,
``layer2.0.downsample``, ``fc`` (BatchNorm nodes: ``<conv>.bn``).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from .common import Claims, NetBuilder, check_size, float_input, width

CLASSES = 1000
INPUT_NAME = "image"
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
#: Weight scale of the last conv of each residual branch: keeps activations O(1)
#: over the depth, in place of the trained BN statistics a real net would have.
RESIDUAL_GAIN = 0.5

#: A structure rule: input channels per group and kernel -> sizes, or None (plain).
Rule = Callable[[int, tuple[int, ...]], tuple[int, ...] | None]


def input_shape(size: str = "full") -> tuple[int, int, int, int]:
    """``image`` shape: 1x3x224x224 (full) or 1x3x32x32 (small)."""
    return (1, 3, 224, 224) if check_size(size) == "full" else (1, 3, 32, 32)


def plain(channels: int, kernel: tuple[int, ...]) -> tuple[int, ...] | None:
    """The rule that leaves every conv plain."""
    return None


def build(name: str, blocks: tuple[int, ...], bottleneck: bool, rule_3x3: Rule,
          rule_1x1: Rule = plain, *, seed: int = 0, noise: float = 0.0,
          batchnorm: bool = False, size: str = "full") -> tuple[onnx.ModelProto, Claims]:
    """A ResNet with ``blocks`` blocks per stage; returns the model and its claims.

    ``rule_3x3`` gives the structure of every 3x3 conv, ``rule_1x1`` that of
    every 1x1 conv (bottleneck convs and shortcuts); the stem and fc are plain.
    """
    g = NetBuilder(name, seed, noise, batchnorm)
    stem = width(64, size)
    x = g.conv_bn("conv1", INPUT_NAME, 3, stem, (7, 7), None, stride=2, pad=3)
    x = g.relu("relu", x)
    x = g.node("MaxPool", "maxpool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = stem
    for stage, (full_width, count) in enumerate(zip(STAGE_WIDTHS, blocks), start=1):
        planes = width(full_width, size)
        for index in range(count):
            stride = 2 if stage > 1 and index == 0 else 1
            prefix = f"layer{stage}.{index}"
            block = _bottleneck if bottleneck else _basic
            x, channels = block(g, prefix, x, channels, planes, stride, rule_3x3, rule_1x1)
    g.classifier(x, channels, CLASSES)
    model = g.model([float_input(INPUT_NAME, input_shape(size))],
                    [float_input("logits", (1, CLASSES))])
    return model, g.claims


def _shortcut(g: NetBuilder, prefix: str, x: str, channels: int, out: int, stride: int,
              rule_1x1: Rule) -> str:
    if stride == 1 and channels == out:
        return x
    return g.conv_bn(f"{prefix}.downsample", x, channels, out, (1, 1),
                     rule_1x1(channels, (1, 1)), stride=stride)


def _basic(g: NetBuilder, prefix: str, x: str, channels: int, planes: int, stride: int,
           rule_3x3: Rule, rule_1x1: Rule) -> tuple[str, int]:
    k = (3, 3)
    y = g.conv_bn(f"{prefix}.conv1", x, channels, planes, k, rule_3x3(channels, k),
                  stride=stride, pad=1)
    y = g.relu(f"{prefix}.relu1", y)
    y = g.conv_bn(f"{prefix}.conv2", y, planes, planes, k, rule_3x3(planes, k), pad=1,
                  gain=RESIDUAL_GAIN)
    short = _shortcut(g, prefix, x, channels, planes, stride, rule_1x1)
    return g.relu(f"{prefix}.relu", g.add(f"{prefix}.add", y, short)), planes


def _bottleneck(g: NetBuilder, prefix: str, x: str, channels: int, planes: int, stride: int,
                rule_3x3: Rule, rule_1x1: Rule) -> tuple[str, int]:
    out = planes * BOTTLENECK_EXPANSION
    one, three = (1, 1), (3, 3)
    y = g.conv_bn(f"{prefix}.conv1", x, channels, planes, one, rule_1x1(channels, one))
    y = g.relu(f"{prefix}.relu1", y)
    y = g.conv_bn(f"{prefix}.conv2", y, planes, planes, three, rule_3x3(planes, three),
                  stride=stride, pad=1)
    y = g.relu(f"{prefix}.relu2", y)
    y = g.conv_bn(f"{prefix}.conv3", y, planes, out, one, rule_1x1(planes, one),
                  gain=RESIDUAL_GAIN)
    short = _shortcut(g, prefix, x, channels, out, stride, rule_1x1)
    return g.relu(f"{prefix}.relu", g.add(f"{prefix}.add", y, short)), out
