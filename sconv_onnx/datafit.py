"""Data-aware alphas: least squares on a layer's real inputs instead of in weight space.

A conv's output at one position is ``y_o = w_o . p`` where ``p`` is the
input patch (``C x K_1 x .. x K_r`` values of one group, flattened) and
``w_o`` filter ``o`` flattened the same way.  The structured layer computes
``(A alpha_o) . p`` with ``A = A(C,c) (x) A(K_1,n_1) (x) ..`` (Kronecker
product of the box bases of :mod:`sconv_onnx.structure`).  Over
calibration patches ``P`` (positions x D) the output error of filter ``o``
is ``||P (w_o - A alpha_o)||^2 = d^T S d`` with ``S = P^T P`` the patch
second-moment matrix and ``d = w_o - A alpha_o``.  So

    weight-space alpha:  alpha_o = A^+ w_o                 (S = I)
    data-aware alpha:    alpha_o = (A^T S A)^-1 A^T S w_o   (minimises the output error)

The relative output error of a layer is ``||P W^T - P A alpha^T||_F /
||P W^T||_F``: the error of the layer's output (bias excluded) over its size,
on the calibration data.  A fully connected layer is the case with no
kernel: its "patch" is the input feature vector.

Shrinkage.  A few calibration images give few patches for a deep layer (a
7x7 map: 49 per image) against ``d = c prod(n)`` unknowns per filter (1024
for ``c=256, n=2x2``), and an unregularized fit would match those patches
and nothing else.  The fit therefore minimises

    ||P (w_o - A alpha_o)||^2 / m + lambda mu ||A (alpha_o - alpha_w)||^2

(``m`` patches, ``mu`` the mean squared patch entry, ``alpha_w`` the
weight-space alpha): the data-aware fit shrunk toward the weight-space
one, with ``lambda = D / m`` (:data:`SHRINK`), so that it trusts the data as
far as there is data.  The normal equations are

    (B^T B / m + lambda mu A^T A) alpha_o = B^T y_o / m + lambda mu A^T A alpha_w

with ``B = P A`` the patches' window sums and ``y_o = P w_o`` the original
outputs.  ``A^T A`` is the Kronecker product of the small per-axis ``A_i^T A_i``.

Everything runs in float64 on at most :data:`MAX_POSITIONS` patches.
"""

from __future__ import annotations

import math

import numpy as np

from .structure import box_basis, fit_alpha, window

#: Patches sampled per layer (:func:`sample_conv_patches`, :func:`sample_rows`).
MAX_POSITIONS = 4096
#: Shrinkage toward the weight-space alpha, times ``D / m`` (see above).
SHRINK = 1.0
#: Ridge relative to the mean diagonal, so that inputs that never vary (dead
#: channels, zero padding) cannot make the normal equations singular.
RIDGE = 1e-9


def pull(positions: int, features: int, mean_square: float, shrink: float = SHRINK) -> float:
    """``lambda mu`` of the module doc: the weight of the shrinkage toward weight space for
    ``positions`` patches of ``features`` entries whose mean square is ``mean_square``."""
    return shrink * features / positions * max(mean_square, 1e-300)


def conv_patches(
    x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...],
    pads: tuple[int, ...], group: int,
) -> np.ndarray:
    """Input patches of a Conv: ``(group, positions, C/g * prod(kernel))`` float64.

    ``x`` is ``(N, C, *spatial)``; ``pads`` are ``(begin.., end..)`` zeros; the
    patch layout (channel, then kernel axes) matches a weight's flattening.
    """
    rank = len(kernel)
    x = np.asarray(x, dtype=np.float64)
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[rank + i]) for i in range(rank)]
    padded = np.pad(x, widths)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    axes = tuple(range(2, 2 + rank))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
    # stride the positions, dilate the taps: (N, C, *out, *kernel)
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations)
    windows = windows[index]
    n, channels = x.shape[:2]
    out = windows.shape[2:2 + rank]
    per_group = channels // group
    # -> (group, N, *out, C/g, *kernel) -> (group, positions, D)
    grouped = windows.reshape((n, group, per_group) + out + tuple(kernel))
    order = (1, 0) + tuple(range(3, 3 + rank)) + (2,) + tuple(range(3 + rank, 3 + 2 * rank))
    grouped = grouped.transpose(order)
    return grouped.reshape(group, -1, per_group * int(np.prod(kernel, dtype=np.int64)))


def sample_conv_patches(
    x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...],
    pads: tuple[int, ...], group: int, max_positions: int = MAX_POSITIONS, seed: int = 0,
) -> np.ndarray:
    """:func:`conv_patches` of the batch ``x``, image by image, at most
    ``max_positions`` in all (drawn at random, seeded, evenly over the images)."""
    rng = np.random.default_rng(seed)
    per_image = max(1, max_positions // max(1, len(x)))
    sampled = []
    for image in x:
        patches = conv_patches(image[None], kernel, strides, dilations, pads, group)
        if patches.shape[1] > per_image:
            patches = patches[:, np.sort(rng.choice(patches.shape[1], per_image, replace=False))]
        sampled.append(patches)
    return np.concatenate(sampled, axis=1)


def sample_rows(x: np.ndarray, axis: int = -1, max_positions: int = MAX_POSITIONS, seed: int = 0):
    """A fully connected layer's input feature vectors (along ``axis``) as patches
    ``(1, m, IN)``, at most ``max_positions`` (drawn at random, seeded)."""
    features = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    rows = features.reshape(-1, features.shape[-1])
    if len(rows) > max_positions:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), max_positions, replace=False))]
    return rows[None]


def window_sums(tensor: np.ndarray, axis: int, under: int) -> np.ndarray:
    """``A(K, under)^T`` applied along ``axis`` (length ``K``): the ``under`` sums of
    ``K - under + 1`` consecutive entries, by a cumulative sum (``O(size)``, no matrix)."""
    full = tensor.shape[axis]
    if under == full:
        return tensor
    span = window(full, under)
    sums = np.cumsum(tensor, axis=axis)
    zero = np.zeros_like(np.take(sums, [0], axis=axis))
    sums = np.concatenate([zero, sums], axis=axis)
    return np.take(sums, np.arange(span, span + under), axis=axis) - np.take(
        sums, np.arange(under), axis=axis)


def basis_gram(shape: tuple[int, ...], sizes: tuple[int, ...]) -> np.ndarray:
    """``A^T A`` for ``A = A(C, c) (x) A(K_1, n_1) (x) ..``: the Kronecker product
    of the per-axis ``A_i^T A_i`` (``d x d``, ``d = prod(sizes)``)."""
    gram = np.ones((1, 1))
    for full, under in zip(shape, sizes):
        basis = box_basis(full, under)
        gram = np.kron(gram, basis.T @ basis)
    return gram


def original_outputs(weight: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """``P W^T`` per group: ``(g, m, O/g)`` for ``weight`` ``(O, ..)`` and ``patches``
    ``(g, m, D)`` (float64; bias excluded)."""
    patches = np.asarray(patches, dtype=np.float64)
    flat = np.asarray(weight, np.float64).reshape(patches.shape[0], -1, patches.shape[2])
    return patches @ flat.transpose(0, 2, 1)  # matmul: BLAS


class LayerSample:
    """A layer's weight and sampled input patches: fits and scores alphas on them.

    ``weight``: ``(O, C, *K)`` (``(O, IN)`` for a fully connected layer),
    ``O`` split evenly over the groups of ``patches`` (``(group, m, D)``).
    Holds the outputs to match, ``Y`` per group ``(g, m, O/g)``: the original
    layer's on these patches, ``P W^T`` (bias excluded), unless ``targets``
    are given.  A *sequential* fit gives the patches the layer receives in a
    partly compressed model and, as ``targets``, what the original layer
    computed at the same positions in the original model
    (:func:`original_outputs`), so that the fit also undoes the error of the
    layers before it.
    """

    def __init__(self, weight: np.ndarray, patches: np.ndarray, targets: np.ndarray | None = None):
        self.weight = np.asarray(weight, dtype=np.float64)
        self.patches = np.asarray(patches, dtype=np.float64)
        self.group, self.positions = self.patches.shape[:2]
        self.shape = tuple(self.weight.shape[1:])
        self.outputs = (original_outputs(self.weight, self.patches) if targets is None
                        else np.asarray(targets, dtype=np.float64))
        self.output_norm = float(np.linalg.norm(self.outputs))
        self._last_pooled: tuple = (None, None)
        self.mean_square = float(np.mean(self.patches**2))  # mu: the shrinkage's scale

    def _pooled(self, sizes: tuple[int, ...]) -> np.ndarray:
        """``B = P A`` per group: the patches' window sums, ``(g, m, d)``; the last
        one is kept, since a candidate is fitted and then scored both ways."""
        if self._last_pooled[0] != sizes:
            pooled = self.patches.reshape((self.group, self.positions) + self.shape)
            for axis, under in enumerate(sizes):
                pooled = window_sums(pooled, 2 + axis, under)
            self._last_pooled = (sizes, pooled.reshape(self.group, self.positions, -1))
        return self._last_pooled[1]

    def error(self, sizes: tuple[int, ...], alpha: np.ndarray) -> float:
        """Relative output error ``||Y - B alpha^T||_F / ||Y||_F`` of ``alpha`` ``(O, *sizes)``."""
        if self.output_norm == 0:
            return 0.0
        sizes = tuple(sizes)
        pooled = self._pooled(sizes)
        flat = np.asarray(alpha, dtype=np.float64).reshape(self.group, -1, math.prod(sizes))
        approx = pooled @ flat.transpose(0, 2, 1)
        return float(np.linalg.norm(self.outputs - approx) / self.output_norm)

    def fit(self, sizes: tuple[int, ...], shrink: float = SHRINK) -> tuple[np.ndarray, float]:
        """The data-aware alpha ``(O, *sizes)`` (shrunk toward the weight-space
        one, see the module docstring) and its relative output error."""
        sizes = tuple(sizes)
        pooled = self._pooled(sizes)
        weight_alpha = fit_alpha(self.weight, sizes).reshape(self.group, -1, math.prod(sizes))
        weight_pull = pull(self.positions, math.prod(self.shape), self.mean_square, shrink)
        basis = basis_gram(self.shape, sizes)
        transposed = pooled.transpose(0, 2, 1)
        gram = transposed @ pooled / self.positions + weight_pull * basis
        rhs = transposed @ self.outputs / self.positions + weight_pull * (
            basis @ weight_alpha.transpose(0, 2, 1))
        scale = np.trace(gram, axis1=1, axis2=2) / gram.shape[1]
        gram[:, np.arange(gram.shape[1]), np.arange(gram.shape[1])] += RIDGE * np.maximum(scale, 1e-300)[:, None]
        alpha = np.linalg.solve(gram, rhs).transpose(0, 2, 1)  # (g, O/g, d)
        alpha = alpha.reshape((-1,) + sizes)
        return alpha, self.error(sizes, alpha)

    def weight_space_error(self, sizes: tuple[int, ...]) -> float:
        """Relative output error of the weight-space alpha :func:`~sconv_onnx.structure.fit_alpha`."""
        return self.error(tuple(sizes), fit_alpha(self.weight, tuple(sizes)))

