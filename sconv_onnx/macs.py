"""Multiply-adds: the one definition behind the report's MAC counts and the cost model's.

What counts (at batch 1): the multiply-adds of ``Conv``, ``ConvTranspose``,
``Gemm`` and ``MatMul``, and the additions of the sum-pools (``AveragePool``;
a sum-pool emitted as an all-ones depthwise ``Conv`` counts as that conv,
which is the same number) and of ``CumSum``.  Every other op counts 0: the
element-wise ``Sub``/``Add`` of a sliding-window difference as much as a
ResNet's residual ``Add``.

:mod:`sconv_onnx.stats` applies these to the nodes of a model and their
inferred shapes; :mod:`sconv_onnx.cost` to a layer's geometry, per output
position.  The arguments are element counts, so both callers agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def conv(outputs: float, in_per_group: int, kernel: Sequence[int]) -> float:
    """A ``Conv`` writing ``outputs`` elements: each reads ``in_per_group * prod(kernel)``
    inputs, one multiply-add each."""
    return outputs * in_per_group * math.prod(kernel)


def conv_transpose(inputs: float, out_per_group: int, kernel: Sequence[int]) -> float:
    """A ``ConvTranspose`` reading ``inputs`` elements: each is spread over
    ``out_per_group * prod(kernel)`` outputs, one multiply-add each."""
    return inputs * out_per_group * math.prod(kernel)


def matmul(outputs: float, inner: int) -> float:
    """A ``Gemm``/``MatMul`` writing ``outputs`` elements, each a dot product of ``inner``."""
    return outputs * inner


def pool(outputs: float, window: Sequence[int]) -> float:
    """A sum- or average-pool writing ``outputs`` elements over ``window``: its additions."""
    return outputs * math.prod(window)


def cumsum(elements: float) -> float:
    """A ``CumSum`` over ``elements`` elements: one addition each."""
    return elements
