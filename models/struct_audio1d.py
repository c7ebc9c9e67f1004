"""A 1-D ResNet over the raw waveform (keyword spotting: 1 s of 16 kHz audio, 35 classes).

    stem: Conv1d 1->64, k=80, stride 4, pad 38 -> relu -> MaxPool1d(4)
    layer1..layer4: 2 basic blocks each, kernel 3, widths 64/128/256/512,
        stride 2 at the first block of layer2..4 with a 1x1 downsample conv
    GlobalAveragePool -> Flatten -> fc (Gemm -> 35)

Structure: every kernel-3 conv at sizes ``(C/2, 2)`` (half the input
channels, two taps); the stem, the downsample convs and the fc are plain.
Names as :mod:`.resnet` (``conv1``, ``layer2.0.conv1``, ``layer2.0.downsample``,
``fc``).

    python -m sconv_onnx.models.build struct_audio1d out.onnx
"""

from __future__ import annotations

import onnx

from .common import Claims, NetBuilder, check_size, float_input, width

NAME = "struct_audio1d"
CLASSES = 35
INPUT_NAME = "audio"
STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS = 2
#: Weight scale of the second conv of each residual branch (see resnet.RESIDUAL_GAIN).
RESIDUAL_GAIN = 0.5


def input_shape(size: str = "full") -> tuple[int, int, int]:
    """``audio`` shape: 1x1x16000 (full: 1 s at 16 kHz) or 1x1x2000 (small)."""
    return (1, 1, 16000) if check_size(size) == "full" else (1, 1, 2000)


def rule_k3(channels: int) -> tuple[int, int]:
    return (channels // 2, 2)


def build_with_claims(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
                      size: str = "full") -> tuple[onnx.ModelProto, Claims]:
    """The model and ``{node name: claimed sizes or None}`` for every Conv and Gemm."""
    g = NetBuilder(NAME, seed, noise, batchnorm)
    channels = width(STAGE_WIDTHS[0], size)
    x = g.conv_bn("conv1", INPUT_NAME, 1, channels, (80,), None, stride=4, pad=38)
    x = g.relu("relu", x)
    x = g.node("MaxPool", "maxpool", [x], kernel_shape=[4], strides=[4])
    for stage, full_width in enumerate(STAGE_WIDTHS, start=1):
        planes = width(full_width, size)
        for index in range(BLOCKS):
            stride = 2 if stage > 1 and index == 0 else 1
            prefix = f"layer{stage}.{index}"
            y = g.conv_bn(f"{prefix}.conv1", x, channels, planes, (3,), rule_k3(channels),
                          stride=stride, pad=1)
            y = g.relu(f"{prefix}.relu1", y)
            y = g.conv_bn(f"{prefix}.conv2", y, planes, planes, (3,), rule_k3(planes), pad=1,
                          gain=RESIDUAL_GAIN)
            short = x
            if stride != 1 or channels != planes:
                short = g.conv_bn(f"{prefix}.downsample", x, channels, planes, (1,), None,
                                  stride=stride)
            x = g.relu(f"{prefix}.relu", g.add(f"{prefix}.add", y, short))
            channels = planes
    g.classifier(x, channels, CLASSES)
    model = g.model([float_input(INPUT_NAME, input_shape(size))],
                    [float_input("logits", (1, CLASSES))])
    return model, g.claims


def build(seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
          size: str = "full") -> onnx.ModelProto:
    """Input ``audio`` (:func:`input_shape`), output ``logits`` 1x35."""
    return build_with_claims(seed, noise, batchnorm, size)[0]


def claimed_structures(size: str = "full") -> Claims:
    """``{node name: sizes or None}``: the structure each Conv/Gemm was built with."""
    return build_with_claims(size=size)[1]
