"""The bundled example: a small image classifier whose conv weights are structured.

As after Structural Regularization training (Bhalgat et al. 2020): the
3x3 convs are structured at n=2 over space and half their input channels,
the 1x1 expansion at c = C/2, one conv is left plain (so the report shows a
layer that is not structured) and the classifier is a Gemm.

    python -m sconv_onnx.models.demo_cnn out.onnx
"""

from __future__ import annotations

import sys

import numpy as np
import onnx

from .common import GraphBuilder, float_input, structured_weight

INPUT_SHAPE = (1, 3, 128, 128)
CLASSES = 10


def build(seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    """The demo CNN (input ``image`` 1x3x128x128, output ``logits`` 1x10)."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("sconv_demo_cnn")

    def bias(channels):
        return (0.01 * rng.standard_normal(channels)).astype(np.float32)

    def block(x, out_c, in_c, sizes, **attrs):
        weight = structured_weight(rng, (out_c, in_c, 3, 3), sizes, noise)
        return g.op("Relu", [g.conv(x, weight, bias(out_c), pads=[1, 1, 1, 1], **attrs)])

    x = g.op("Relu", [g.conv("image", structured_weight(rng, (32, 3, 3, 3), (3, 2, 2), noise),
                             bias(32), pads=[1, 1, 1, 1])])
    x = block(x, 64, 32, (16, 2, 2), strides=[2, 2])
    x = block(x, 128, 64, (32, 2, 2))
    x = block(x, 128, 128, (64, 2, 2), strides=[2, 2])
    plain = (rng.standard_normal((128, 128, 3, 3)) * np.sqrt(2 / 1152)).astype(np.float32)
    x = g.op("Relu", [g.conv(x, plain, bias(128), pads=[1, 1, 1, 1])])
    x = g.op("Relu", [g.conv(x, structured_weight(rng, (256, 128, 1, 1), (64, 1, 1), noise), bias(256))])
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    head = (rng.standard_normal((CLASSES, 256)) * 0.05).astype(np.float32)
    g.op("Gemm", [x, g.constant("fc_w", head), g.constant("fc_b", bias(CLASSES))],
         output="logits", transB=1)
    return g.model([float_input("image", INPUT_SHAPE)], [float_input("logits", (1, CLASSES))])


if __name__ == "__main__":
    onnx.save(build(), sys.argv[1] if len(sys.argv) > 1 else "demo_cnn.onnx")
