"""Shared slice generators across layers (CSG; Omidvar et al., AISTATS 2021): numpy only.

A network trained with a *Convolutional Slice Generator* builds the kernels of
many conv layers from one linear generator ``G`` (``L x d``) and per-layer
codes ``Z_l`` (``n_l x d``):

    W_l = (Z_l G^T).reshape(O_l, C_l, K..)

Each row of ``Z_l G^T`` is a *slice*: a flat chunk of ``L = s^2 prod(K)``
consecutive entries of the flattened weight (``s`` the slice size; not an
``s x s`` tile of channels), so ``n_l = O_l C_l / s^2`` when ``s`` divides both
widths.  An exported model holds every ``W_l`` in full; the generator and the
codes hold ``d (L + sum n_l)`` numbers against ``L sum n_l``.

Detection, per kernel shape and slice size (:func:`find`):

* each layer's chunk matrix ``X_l = W_l.reshape(n_l, L)`` has rank at most ``d``
  when generated: where ``n_l`` is well above its rank (within the tolerance:
  the tail of its singular values), the layer shows a generator of its own;
* the layers that show one are joined: their row spaces (each truncated to
  its rank, weighted by the singular values) are stacked and decomposed
  again, and the rank within the tolerance is the shared ``d``
  (an affine generator, ``Z G^T + 1 b^T``, is one dimension more);
* every other layer of that kernel is a member when its chunks lie in that
  span within the tolerance (layers with fewer chunks than ``d`` cannot show
  a generator alone, but are tested this way); when no layer has chunks
  enough alone, all the layers of the kernel are tried together;
* ``G`` is the span's orthonormal basis and ``Z_l = X_l G``: the least-squares
  codes, and each member's relative residual ``||X_l - Z_l G^T|| / ||X_l||``.

Only slice sizes that divide the layers' widths are tried (complete slices);
widths that are not multiples of ``s`` need a masked fit and are left out.
Also left out: layers too small to show a generator alone mixed with other
layers of their kernel (all are tried together only), and kernels scaled per
output channel after generation (a BatchNormalization folded at export:
where a slice spans several output channels, it leaves the span).

The family that rewrites the layers is :mod:`sconv_onnx.passes.csg`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Slice sizes tried (the paper's ImageNet models use 16, its CIFAR ones 12).
SLICE_SIZES = (8, 12, 16, 32)
#: A layer shows a generator alone when its chunks' rank is at most this share of the
#: chunk matrix's shorter side.
ALONE_SHARE = 0.5
#: Elements of the layers of one kernel shape tried together when none shows a generator
#: alone (small layers: CIFAR widths); above, they are not.
MAX_TOGETHER = 4_000_000


@dataclass(frozen=True)
class Sharing:
    """Layers whose kernels one generator makes: ``keys`` (in the order given to
    :func:`find`), the slice size, the generator ``basis`` (``L x d``, orthonormal
    columns), each member's ``codes`` (``n_l x d``) and relative ``residuals``."""

    keys: tuple[str, ...]
    slice_size: int
    basis: np.ndarray
    codes: tuple[np.ndarray, ...]
    residuals: tuple[float, ...]

    @property
    def code_size(self) -> int:
        return self.basis.shape[1]

    @property
    def params(self) -> int:
        """The generator's and the codes' numbers: ``d (L + sum n_l)``."""
        return self.basis.size + sum(codes.size for codes in self.codes)


def slice_length(shape: tuple[int, ...], size: int) -> int | None:
    """``L = s^2 prod(K)`` for a conv weight ``O x C x K..`` of one group, or None when
    ``s`` does not divide both widths (no complete slices)."""
    out_ch, in_ch = shape[:2]
    if out_ch % size or in_ch % size:
        return None
    return size * size * math.prod(shape[2:])


def chunks(weight: np.ndarray, size: int) -> np.ndarray:
    """The weight's slices as rows (``n x L``, a view in the weight's dtype where it can
    be): consecutive flat chunks."""
    length = slice_length(weight.shape, size)
    if length is None:
        raise ValueError(f"slice size {size} does not divide the widths of {weight.shape}")
    return np.reshape(weight, (-1, length))


#: Elements converted to float64 at a time: the copies of a large weight stay this small.
BLOCK_ELEMENTS = 1 << 20


def _spans(count: int, width: int):
    """Slices of ``range(count)`` of about :data:`BLOCK_ELEMENTS` / ``width`` each."""
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    return (slice(start, start + step) for start in range(0, count, step))


def _gram(rows: np.ndarray) -> np.ndarray:
    """The Gram matrix of the shorter side of ``rows`` (float64, accumulated by blocks)."""
    count, length = rows.shape
    if count < length:
        gram = np.zeros((count, count))
        for span in _spans(length, count):
            block = np.asarray(rows[:, span], np.float64)
            gram += block @ block.T
        return gram
    gram = np.zeros((length, length))
    for span in _spans(count, length):
        block = np.asarray(rows[span], np.float64)
        gram += block.T @ block
    return gram


def _energies(rows: np.ndarray) -> np.ndarray:
    """Squared singular values of ``rows``, largest first."""
    return np.clip(np.linalg.eigvalsh(_gram(rows))[::-1], 0.0, None)


def _top(rows: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` largest squared singular values of ``rows`` and their right singular
    vectors (as rows, ``rank x L``), from the Gram matrix of the shorter side."""
    count, length = rows.shape
    energy, vectors = np.linalg.eigh(_gram(rows))
    energy, vectors = np.clip(energy[::-1][:rank], 0.0, None), vectors[:, ::-1][:, :rank]
    keep = energy > 0
    energy, vectors = energy[keep], vectors[:, keep]
    if count >= length:
        return energy, vectors.T
    left = vectors / np.sqrt(energy)
    right = np.empty((len(energy), length))
    for span in _spans(length, count):
        right[:, span] = left.T @ np.asarray(rows[:, span], np.float64)
    return energy, right


def _rank(energy: np.ndarray, total: float, tol: float) -> int:
    """The least rank whose tail energy is within ``tol^2 total``."""
    tails = np.append(np.cumsum(energy[::-1])[::-1], 0.0)
    return int(np.argmax(tails <= tol * tol * total))


def _joint_basis(layers: list[np.ndarray], tol: float) -> np.ndarray | None:
    """An orthonormal basis (``L x d``) of the span shared by ``layers`` (chunk matrices)
    within ``tol`` of their total energy, or None when it is no smaller than ``L``: the
    layers' row spaces, each truncated to its rank and weighted by its singular values,
    stacked and decomposed again (from the Gram matrix of the shorter side)."""
    length = layers[0].shape[1]
    stacked, total = [], 0.0
    for rows in layers:
        energy = _energies(rows)
        rank = max(1, _rank(energy, float(energy.sum()), tol))
        top, right = _top(rows, rank)
        stacked.append(right * np.sqrt(top)[:, None])
        total += float(energy.sum())
    stacked = np.concatenate(stacked)
    energy = _energies(stacked)
    rank = _rank(energy, total, tol)
    return _top(stacked, rank)[1].T if 0 < rank < length else None


#: Rows and columns of the sub-block :func:`_screen` decomposes.
SCREEN_SIZE = 256
#: The screen's tolerance, as a multiple of the search's: a sub-block's tail can be a larger
#: share of its own energy than the whole matrix's is of its.
SCREEN_SLACK = 10.0
#: A sub-block passes the screen below this share of full rank (a random one is full; a
#: generator of code size up to 0.9 x :data:`SCREEN_SIZE` still passes).
SCREEN_SHARE = 0.9


def _screen(rows: np.ndarray, tol: float) -> bool:
    """Whether a sub-block of ``rows`` (:data:`SCREEN_SIZE` rows and columns spread evenly)
    is within a looser tolerance of rank below :data:`SCREEN_SHARE` of its size: sub-blocks
    of a low-rank matrix are low rank, and a random one's is full (one small decomposition
    instead of the whole matrix's)."""
    count, length = rows.shape
    size = min(count, length, SCREEN_SIZE)
    picked = rows[np.linspace(0, count - 1, size).round().astype(int)]
    block = np.asarray(picked[:, np.linspace(0, length - 1, size).round().astype(int)],
                       np.float64)
    energy = np.clip(np.linalg.eigvalsh(block @ block.T)[::-1], 0.0, None)
    return _rank(energy, float(energy.sum()), SCREEN_SLACK * tol) <= SCREEN_SHARE * size


def _shows_generator(rows: np.ndarray, tol: float) -> bool:
    """Whether the chunks ``rows`` have rank within ``tol`` at most :data:`ALONE_SHARE` of
    their count (screened first, :func:`_screen`)."""
    if not _screen(rows, tol):
        return False
    energy = _energies(rows)
    return _rank(energy, float(energy.sum()), tol) <= ALONE_SHARE * min(rows.shape)


def _residual(rows: np.ndarray, basis: np.ndarray) -> float:
    """``||X - X B B^T|| / ||X||`` (by blocks of rows)."""
    total = left = 0.0
    for span in _spans(rows.shape[0], rows.shape[1]):
        block = np.asarray(rows[span], np.float64)
        total += float(np.sum(block**2))
        left += float(np.sum((block - (block @ basis) @ basis.T) ** 2))
    return float(np.sqrt(left / total)) if total > 0 else 0.0


def _codes(rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``X B``: the least-squares codes of the chunks ``X`` (by blocks of rows)."""
    return np.concatenate([np.asarray(rows[span], np.float64) @ basis
                           for span in _spans(rows.shape[0], rows.shape[1])])


def find(weights: dict[str, np.ndarray], tol: float) -> list[Sharing]:
    """The generators shared by the conv weights of ``weights`` (one group each), per
    kernel shape: the sharing (over the slice sizes) that saves the most numbers, then
    again among the layers it left, while one saves any and covers two layers or more."""
    by_kernel: dict[tuple[int, ...], list[str]] = {}
    for key, weight in weights.items():
        by_kernel.setdefault(tuple(weight.shape[2:]), []).append(key)
    found = []
    for keys in by_kernel.values():
        while len(keys) > 1:
            options = [sharing for size in SLICE_SIZES
                       if (sharing := _share(weights, keys, size, tol)) is not None]
            if not options:
                break
            best = max(options, key=lambda sharing: _saved(sharing, weights))
            found.append(best)
            keys = [key for key in keys if key not in best.keys]
    return found


def _saved(sharing: Sharing, weights: dict[str, np.ndarray]) -> int:
    """The numbers ``sharing`` saves against its members' kernels."""
    return sum(weights[key].size for key in sharing.keys) - sharing.params


def _share(weights: dict[str, np.ndarray], keys: list[str], size: int, tol: float
           ) -> Sharing | None:
    eligible = [key for key in keys if slice_length(weights[key].shape, size) is not None]
    rows = {key: chunks(weights[key], size) for key in eligible}
    showing = [key for key in eligible if _shows_generator(rows[key], tol)]
    together = sum(rows[key].size for key in eligible)
    if (not showing and len(eligible) > 1 and together <= MAX_TOGETHER
            and _shows_generator(np.concatenate([rows[key] for key in eligible]), tol)):
        showing = eligible  # no layer has chunks enough alone; all of them together do
    if not showing:
        return None
    basis = _joint_basis([rows[key] for key in showing], tol)
    if basis is None:
        return None
    residuals = {key: _residual(rows[key], basis) for key in eligible}
    members = [key for key in eligible if residuals[key] <= tol]
    if len(members) < 2:
        return None
    codes = tuple(_codes(rows[key], basis) for key in members)
    sharing = Sharing(tuple(members), size, basis, codes,
                      tuple(residuals[key] for key in members))
    dense = sum(weights[key].size for key in members)
    return sharing if sharing.params < dense else None


def generated(rng: np.random.Generator, shapes: list[tuple[int, ...]], size: int, code_size: int,
              affine: bool = False) -> list[np.ndarray]:
    """Weights of ``shapes`` made by one random generator (``L x d``) and random codes
    (float64; entries of order ``1/sqrt(d)`` times the generator's), plus one shared
    random chunk offset ``b`` when ``affine``."""
    length = slice_length(shapes[0], size)
    generator = rng.standard_normal((length, code_size))
    offset = rng.standard_normal(length) if affine else np.zeros(length)
    made = []
    for shape in shapes:
        count = math.prod(shape) // length
        codes = rng.standard_normal((count, code_size)) / math.sqrt(code_size)
        made.append((codes @ generator.T + offset).reshape(shape))
    return made


__all__ = ["SLICE_SIZES", "Sharing", "chunks", "find", "generated", "slice_length"]
