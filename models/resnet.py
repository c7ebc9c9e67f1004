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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from sconv_onnx import interleave

from .common import Claims, NetBuilder, Structure, check_size, float_input, width

CLASSES = 1000
INPUT_NAME = "image"
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
#: Weight scale of the last conv of each residual branch: keeps activations O(1)
#: over the depth, in place of the trained BN statistics a real net would have.
RESIDUAL_GAIN = 0.5

#: A structure rule: input channels per group, output channels and kernel -> a structure
#: (box sizes or an interleaved product), or None (plain).
Rule = Callable[[int, int, tuple[int, ...]], Structure]


def input_shape(size: str = "full") -> tuple[int, int, int, int]:
    """``image`` shape: 1x3x224x224 (full) or 1x3x32x32 (small)."""
    return (1, 3, 224, 224) if check_size(size) == "full" else (1, 3, 32, 32)


def plain(channels: int, out_channels: int, kernel: tuple[int, ...]) -> Structure:
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


#: Stage widths of the CIFAR ResNets (He et al. 2016, section 4.2: ResNet-20/32/44/56).
CIFAR_WIDTHS = (16, 32, 64)
CIFAR_CLASSES = 10
CIFAR_INPUT = (1, 3, 32, 32)


def cifar(name: str, blocks: int, rule_3x3: Rule = plain, *, seed: int = 0
          ) -> tuple[onnx.ModelProto, Claims]:
    """A CIFAR ResNet (``6 blocks + 2`` layers; ResNet-20 at ``blocks=3``) on 1x3x32x32:
    a 3x3 stem to 16 channels, three stages of ``blocks`` basic blocks at widths 16, 32
    and 64 (1x1 convs on the shortcuts that change shape), and a 10-class fc."""
    g = NetBuilder(name, seed, 0.0, False)
    x = g.relu("relu", g.conv_bn("conv1", INPUT_NAME, 3, CIFAR_WIDTHS[0], (3, 3), None, pad=1))
    channels = CIFAR_WIDTHS[0]
    for stage, planes in enumerate(CIFAR_WIDTHS, start=1):
        for index in range(blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            x, channels = _basic(g, f"layer{stage}.{index}", x, channels, planes, stride,
                                 rule_3x3, plain)
    g.classifier(x, channels, CIFAR_CLASSES)
    model = g.model([float_input(INPUT_NAME, CIFAR_INPUT)],
                    [float_input("logits", (1, CIFAR_CLASSES))])
    return model, g.claims


def _shortcut(g: NetBuilder, prefix: str, x: str, channels: int, out: int, stride: int,
              rule_1x1: Rule) -> str:
    if stride == 1 and channels == out:
        return x
    return g.conv_bn(f"{prefix}.downsample", x, channels, out, (1, 1),
                     rule_1x1(channels, out, (1, 1)), stride=stride)


def _basic(g: NetBuilder, prefix: str, x: str, channels: int, planes: int, stride: int,
           rule_3x3: Rule, rule_1x1: Rule) -> tuple[str, int]:
    k = (3, 3)
    y = g.conv_bn(f"{prefix}.conv1", x, channels, planes, k, rule_3x3(channels, planes, k),
                  stride=stride, pad=1)
    y = g.relu(f"{prefix}.relu1", y)
    y = g.conv_bn(f"{prefix}.conv2", y, planes, planes, k, rule_3x3(planes, planes, k), pad=1,
                  gain=RESIDUAL_GAIN)
    short = _shortcut(g, prefix, x, channels, planes, stride, rule_1x1)
    return g.relu(f"{prefix}.relu", g.add(f"{prefix}.add", y, short)), planes


def _bottleneck(g: NetBuilder, prefix: str, x: str, channels: int, planes: int, stride: int,
                rule_3x3: Rule, rule_1x1: Rule) -> tuple[str, int]:
    out = planes * BOTTLENECK_EXPANSION
    one, three = (1, 1), (3, 3)
    y = g.conv_bn(f"{prefix}.conv1", x, channels, planes, one, rule_1x1(channels, planes, one))
    y = g.relu(f"{prefix}.relu1", y)
    y = g.conv_bn(f"{prefix}.conv2", y, planes, planes, three, rule_3x3(planes, planes, three),
                  stride=stride, pad=1)
    y = g.relu(f"{prefix}.relu2", y)
    y = g.conv_bn(f"{prefix}.conv3", y, planes, out, one, rule_1x1(planes, out, one),
                  gain=RESIDUAL_GAIN)
    short = _shortcut(g, prefix, x, channels, out, stride, rule_1x1)
    return g.relu(f"{prefix}.relu", g.add(f"{prefix}.add", y, short)), out


def all_channels_n2(channels: int, out_channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """``(C, 2, 2)``: the 3x3 kernel is a sum of four 2x2 boxes, no channel structure."""
    return (channels, 2, 2)


def half_channels_n2(channels: int, out_channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """``(C/2, 2, 2)``: boxes over half the input channels and 2x2 of the 3x3 window."""
    return (channels // 2, 2, 2)


def half_channels(channels: int, out_channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """``(C/2, 1, 1)`` for a 1x1 conv: boxes over half the input channels."""
    return (channels // 2, 1, 1)


#: Groups of the interleaved 3x3 convs: G1 = 4 (first, 3x3), G2 = 2 (second, 1x1).
IGC_GROUPS = (4, 2)


def interleaved(channels: int, out_channels: int, kernel: tuple[int, ...]) -> interleave.Hypothesis:
    """IGC-V1 with as many channels between as out: G1 = 4, G2 = 2, R = O/8, the outputs
    in contiguous groups; the 3x3 then costs ``(2 C 9 + 4 O) / (8 C 9)`` of its MACs
    (0.31 at C = O), and at full width every grouped conv has 16 or more channels per
    group (whole NCHWc blocks)."""
    g1, g2 = IGC_GROUPS
    return interleave.Hypothesis(g1, g2, max(1, out_channels // (g1 * g2)))


def interleaved_strided(channels: int, out_channels: int, kernel: tuple[int, ...]
                        ) -> interleave.Hypothesis:
    """:func:`interleaved` with output groups strided (IGC-V1's reorder after its second conv)."""
    hyp = interleaved(channels, out_channels, kernel)
    return dataclasses.replace(hyp, out_order=interleave.strided_order(out_channels, hyp.out_groups),
                               strided=True)


def chained(channels: int, out_channels: int, kernel: tuple[int, ...]) -> interleave.Hypothesis:
    """IGC-V2's shape: a depthwise 3x3, then a 1x1 pair of G1 = 2 and G2 = 2 groups with
    R = O/8 (``M = O/2`` channels between); it costs ``(9 C + O/4 (C + O)) / (9 C O)`` of the
    3x3's MACs (0.07 at C = O = 64, 0.06 at 512), and at full width the 1x1 convs
    have 16 or more channels per group."""
    return interleave.Hypothesis(2, 2, max(1, out_channels // 8), depthwise=True)


@dataclass(frozen=True)
class Variant:
    """One benchmark ResNet: depth and structure rules.

    It has the interface of the other builder modules (``NAME``,
    ``INPUT_NAME``, ``CLASSES``, ``input_shape``, ``build``,
    ``build_with_claims``, ``claimed_structures``), so the registry treats
    them alike.
    """

    NAME: str
    blocks: tuple[int, ...]
    bottleneck: bool
    rule_3x3: Rule
    rule_1x1: Rule = plain
    INPUT_NAME: str = INPUT_NAME
    CLASSES: int = CLASSES

    @staticmethod
    def input_shape(size: str = "full") -> tuple[int, int, int, int]:
        return input_shape(size)

    def build_with_claims(self, seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
                          size: str = "full") -> tuple[onnx.ModelProto, Claims]:
        """The model and ``{node name: claimed sizes or None}`` for every Conv and Gemm."""
        return build(self.NAME, self.blocks, self.bottleneck, self.rule_3x3, self.rule_1x1,
                     seed=seed, noise=noise, batchnorm=batchnorm, size=size)

    def build(self, seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
              size: str = "full") -> onnx.ModelProto:
        """Input ``image`` (:func:`input_shape`), output ``logits`` 1x1000."""
        return self.build_with_claims(seed, noise, batchnorm, size)[0]

    def claimed_structures(self, size: str = "full") -> Claims:
        """``{node name: sizes or None}``: the structure each Conv/Gemm was built with."""
        return self.build_with_claims(size=size)[1]


#: ResNet-18, every 3x3 conv at ``(C, 2, 2)``; stem, 1x1 downsamples and fc plain.
STRUCT_RESNET18_A = Variant("struct_resnet18_a", (2, 2, 2, 2), False, all_channels_n2)
#: ResNet-18, 3x3 convs at ``(C/2, 2, 2)``, 1x1 downsamples at ``(C/2, 1, 1)``; stem and fc plain.
STRUCT_RESNET18_B = Variant("struct_resnet18_b", (2, 2, 2, 2), False, half_channels_n2,
                            half_channels)
#: ResNet-50 (v1.5), the 3x3 conv of each bottleneck at ``(C, 2, 2)``; 1x1 convs, stem, fc plain.
STRUCT_RESNET50_A = Variant("struct_resnet50_a", (3, 4, 6, 3), True, all_channels_n2)
#: ResNet-18, every 3x3 conv an interleaved product (G1 = 4, G2 = 2, R = O/8, contiguous
#: output groups); stem, 1x1 downsamples and fc plain.
IGC_RESNET18 = Variant("igc_resnet18", (2, 2, 2, 2), False, interleaved)
#: :data:`IGC_RESNET18` with strided output groups (the rewrite ends in a permutation).
IGC_RESNET18_STRIDED = Variant("igc_resnet18_strided", (2, 2, 2, 2), False, interleaved_strided)
#: ResNet-18, every 3x3 conv a chain of three factors (:func:`chained`: depthwise 3x3, then
#: 1x1 convs of 2 groups with an interleave); stem, 1x1 downsamples and fc plain.
IGCV2_RESNET18 = Variant("igcv2_resnet18", (2, 2, 2, 2), False, chained)
