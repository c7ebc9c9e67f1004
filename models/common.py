"""Shared pieces of the model builders: structured weights and ONNX node helpers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sconv_onnx import interleave
from sconv_onnx.structure import expand, window, windows

#: IR version written by the builders: onnxruntime 1.31 refuses IR 14, the
#: default of onnx 1.23's make_model (docs/DESIGN.md section 2).
IR_VERSION = 8


def structured_weight(
    rng: np.random.Generator, shape: tuple[int, ...], sizes: tuple[int, ...], noise: float = 0.0,
    balanced: bool = False,
) -> np.ndarray:
    """A float32 weight of ``shape`` that is exactly structured at ``sizes`` (plus relative noise).

    ``alpha`` is drawn with He-like scaling so that activations keep their size.

    With ``balanced``, the mean of ``alpha`` over its channels is shrunk by the
    channel window ``L = C - c + 1``.  Every input channel ``i`` of ``W`` sums
    the ``alpha`` channels of the windows covering it, so ``sum_i W[o, i]``
    is ``L * sum_j alpha[o, j]``: without the shrink a channel-structured
    filter's gain on a signal common to all channels is about ``sqrt(C/2)``
    times a random filter's, and activations grow geometrically with depth.
    The shrink is invertible (for ``L > 1``) and keeps the structure.
    """
    fan_in = int(np.prod(shape[1:]))
    alpha = rng.standard_normal((shape[0],) + tuple(sizes))
    span = window(shape[1], sizes[0])
    if balanced and span > 1:
        alpha -= (1.0 - 1.0 / span) * alpha.mean(axis=1, keepdims=True)
    weight = expand(alpha, shape)
    weight *= np.sqrt(2.0 / fan_in) / (weight.std() + 1e-12)
    if noise:
        weight += noise * np.linalg.norm(weight) / np.sqrt(weight.size) * rng.standard_normal(shape)
    return weight.astype(np.float32)


def spatial_window(shape: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """``prod_i (K_i - n_i + 1)``: the sum-pool's spatial window volume.

    Also the expected ``sum_(o,c) (sum over space of W[o,c])^2 / ||W||^2`` of a
    weight structured at ``sizes`` from i.i.d. ``alpha`` (each box-basis
    column sums to the window ``K - n + 1`` and has that many ones); about 1
    for an i.i.d. random filter.  A structured filter is smooth, so at equal
    Frobenius norm its gain on smooth inputs is ``sqrt`` of this larger.
    """
    return int(np.prod(windows(shape[2:], sizes[1:])))


class GraphBuilder:
    """Accumulates nodes and initializers; names tensors ``<prefix><n>``."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def constant(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None,
           output: str | None = None, **attrs) -> str:
        """Append a node; its output is ``output`` or a fresh name."""
        out = output or self.fresh(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None = None, **attrs) -> str:
        inputs = [x, self.constant("w", weight)]
        if bias is not None:
            inputs.append(self.constant("b", bias))
        return self.op("Conv", inputs, "conv", **attrs)

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
            producer_name="sconv-onnx models",
        )
        onnx.checker.check_model(model)
        return model


def float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# ---------------------------------------------------------------------------
# Benchmark networks: named layers, BatchNorm or folded bias, recorded claims.
# ---------------------------------------------------------------------------

#: Sizes accepted by the benchmark builders.
SIZES = ("full", "small")

#: A weighted layer's structure: box sizes ``(c, n..)``, an interleaved product, or
#: ``None`` for a plain (random) weight.
Structure = tuple[int, ...] | interleave.Hypothesis | None
#: What each benchmark builder returns besides the model: the structure every
#: weighted layer (Conv, Gemm) was built with, keyed by node name.
Claims = dict[str, Structure]


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    return size


def width(channels: int, size: str) -> int:
    """Channel width at ``size``: full as given; small: divided by 8, rounded up to even, at least 4."""
    if check_size(size) == "full":
        return channels
    return max(4, -(-channels // 16) * 2)


def plain_weight(rng: np.random.Generator, shape: tuple[int, ...], gain: float = 2.0) -> np.ndarray:
    """A random float32 weight with variance ``gain / fan_in`` (He for ``gain=2``)."""
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)


def interleaved_weight(rng: np.random.Generator, shape: tuple[int, ...],
                       hyp: interleave.Hypothesis, noise: float = 0.0, gain: float = 2.0
                       ) -> np.ndarray:
    """A float32 weight that is exactly the interleaved layout ``hyp``, two factors or a
    chain (random factors; plus relative ``noise`` as :func:`structured_weight` adds it),
    scaled to a plain weight's mean square ``gain / fan_in``."""
    weight = interleave.random_product(rng, shape, hyp)
    if noise:
        weight += noise * np.linalg.norm(weight) / np.sqrt(weight.size) * rng.standard_normal(shape)
    fan_in = int(np.prod(shape[1:]))
    return (weight * np.sqrt(gain / fan_in / np.mean(weight**2))).astype(np.float32)


class NetBuilder(GraphBuilder):
    """A :class:`GraphBuilder` for benchmark networks.

    Nodes are named like PyTorch modules (``layer2.0.conv1``); a node's output
    tensor has the node's name and its initializers are ``<node>.weight`` etc.
    Every weighted layer records its claimed structure in :attr:`claims`.
    With ``batchnorm`` each conv has no bias and is followed by a
    ``BatchNormalization`` node ``<conv>.bn`` (seeded statistics); without it
    the conv carries a small bias, as if BN had been folded in.
    """

    def __init__(self, name: str, seed: int, noise: float = 0.0, batchnorm: bool = False):
        super().__init__(name)
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.batchnorm = batchnorm
        self.claims: Claims = {}

    def named_constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op_type: str, name: str, inputs: list[str], output: str | None = None,
             **attrs) -> str:
        """Append node ``name``; its output tensor is ``output`` or ``name``."""
        out = output or name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def _small(self, channels: int, scale: float) -> np.ndarray:
        return (scale * self.rng.standard_normal(channels)).astype(np.float32)

    def conv_bn(self, name: str, x: str, in_channels: int, out_channels: int,
                kernel: tuple[int, ...], sizes: Structure = None, *,
                stride: int = 1, pad: int = 0, group: int = 1, gain: float = 1.0) -> str:
        """Conv ``name`` (+ ``<name>.bn``); weight structured at ``sizes`` (box sizes, or an
        interleaved product: :func:`interleaved_weight`) or plain if ``None``.

        A structured weight is ``balanced`` (see :func:`structured_weight`) and
        divided by ``sqrt(spatial_window)``, so that its gain on smooth inputs
        matches a He-initialised random filter's; without both, activations
        grow geometrically with depth (ResNet-18 at ``(C/2, 2, 2)``: logits
        around 1e13).  ``gain`` scales the weight further (structure is
        kept), e.g. to damp the last conv of a residual branch.  Stride and
        symmetric padding apply to every spatial axis.
        """
        shape = (out_channels, in_channels // group, *kernel)
        if sizes is None:
            weight = plain_weight(self.rng, shape)
        elif isinstance(sizes, interleave.Hypothesis):
            weight = interleaved_weight(self.rng, shape, sizes, self.noise)
        else:
            if len(sizes) != len(shape) - 1:
                raise ValueError(f"{name}: sizes {sizes} do not fit weight shape {shape}")
            weight = structured_weight(self.rng, shape, sizes, self.noise, balanced=True)
            sizes = tuple(int(s) for s in sizes)
            gain /= np.sqrt(spatial_window(shape, sizes))
        if gain != 1.0:
            weight = (weight * np.float32(gain)).astype(np.float32)
        self.claims[name] = sizes
        inputs = [x, self.named_constant(f"{name}.weight", weight)]
        if not self.batchnorm:
            inputs.append(self.named_constant(f"{name}.bias", self._small(out_channels, 0.01)))
        rank = len(kernel)
        attrs = {"kernel_shape": list(kernel), "strides": [stride] * rank,
                 "pads": [pad] * (2 * rank)}
        if group != 1:
            attrs["group"] = group
        out = self.node("Conv", name, inputs, **attrs)
        if self.batchnorm:
            bn = f"{name}.bn"
            rng = self.rng
            params = [
                ("scale", rng.uniform(0.8, 1.2, out_channels)),
                ("bias", 0.05 * rng.standard_normal(out_channels)),
                ("mean", 0.05 * rng.standard_normal(out_channels)),
                ("var", rng.uniform(0.8, 1.2, out_channels)),
            ]
            names = [self.named_constant(f"{bn}.{key}", value.astype(np.float32))
                     for key, value in params]
            out = self.node("BatchNormalization", bn, [out, *names], epsilon=1e-5)
        return out

    def relu(self, name: str, x: str) -> str:
        return self.node("Relu", name, [x])

    def relu6(self, name: str, x: str) -> str:
        """ReLU6 as ``Clip(x, 0, 6)`` with shared constant bounds."""
        if not any(init.name == "relu6.min" for init in self.initializers):
            self.named_constant("relu6.min", np.array(0.0, dtype=np.float32))
            self.named_constant("relu6.max", np.array(6.0, dtype=np.float32))
        return self.node("Clip", name, [x, "relu6.min", "relu6.max"])

    def add(self, name: str, a: str, b: str) -> str:
        return self.node("Add", name, [a, b])

    def classifier(self, x: str, features: int, classes: int, name: str = "fc") -> str:
        """GlobalAveragePool, Flatten and the plain Gemm ``name`` to output ``logits``."""
        x = self.node("GlobalAveragePool", "avgpool", [x])
        x = self.node("Flatten", "flatten", [x], axis=1)
        weight = plain_weight(self.rng, (classes, features), gain=1.0)
        self.claims[name] = None
        return self.node("Gemm", name, [x, self.named_constant(f"{name}.weight", weight),
                                        self.named_constant(f"{name}.bias",
                                                            self._small(classes, 0.01))],
                         output="logits", transB=1)
