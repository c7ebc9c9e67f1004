"""Build a benchmark model and save it.

    python -m sconv_onnx.models.build NAME OUT.onnx [--noise X] [--batchnorm]
                                      [--size {full,small}] [--seed N]

``NAME`` is a key of :data:`MODELS` or ``demo_cnn`` (which takes only
``--seed`` and ``--noise``).
"""

from __future__ import annotations

import argparse
import sys

import onnx

from . import demo_cnn, struct_audio1d, struct_mobilenetv2
from .common import SIZES
from .resnet import (
    IGC_RESNET18,
    IGC_RESNET18_STRIDED,
    IGCV2_RESNET18,
    STRUCT_RESNET18_A,
    STRUCT_RESNET18_B,
    STRUCT_RESNET50_A,
)

#: The benchmark builders by name.  Each module has ``build(seed, noise,
#: batchnorm, size)``, ``build_with_claims(...)`` (the model and its claims),
#: ``claimed_structures(size)``, ``input_shape(size)``, ``INPUT_NAME``, ``CLASSES``.
MODELS = {
    module.NAME: module
    for module in (STRUCT_RESNET18_A, STRUCT_RESNET18_B, STRUCT_RESNET50_A,
                   struct_mobilenetv2, struct_audio1d, IGC_RESNET18, IGC_RESNET18_STRIDED,
                   IGCV2_RESNET18)
}


def build(name: str, seed: int = 0, noise: float = 0.0, batchnorm: bool = False,
          size: str = "full") -> onnx.ModelProto:
    """Build model ``name`` (a key of :data:`MODELS`, or ``demo_cnn``)."""
    if name == "demo_cnn":
        if batchnorm or size != "full":
            raise ValueError("demo_cnn has no --batchnorm or --size variants")
        return demo_cnn.build(seed=seed, noise=noise)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}, demo_cnn")
    return MODELS[name].build(seed=seed, noise=noise, batchnorm=batchnorm, size=size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sconv_onnx.models.build",
                                     description="Build a benchmark model and save it.")
    parser.add_argument("name", choices=[*MODELS, "demo_cnn"])
    parser.add_argument("out", help="output .onnx path")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="relative Gaussian noise on the structured weights (default 0)")
    parser.add_argument("--batchnorm", action="store_true",
                        help="keep BatchNormalization nodes after the convs (default: folded bias)")
    parser.add_argument("--size", choices=SIZES, default="full",
                        help="small: widths / 8 and a tiny input (default full)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model = build(args.name, args.seed, args.noise, args.batchnorm, args.size)
    except ValueError as exc:
        parser.error(str(exc))
    onnx.save(model, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
