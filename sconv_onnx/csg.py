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

State (issue 14): the detection is here and tested; the family that rewrites
the layers (a size-only group candidate: the generator stored once, each
kernel rebuilt by ``MatMul -> Reshape``, folded by onnxruntime at load) is
not built yet.  docs/DESIGN.md section 1.5 says what it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Slice sizes tried (the paper's ImageNet models use 16, its CIFAR ones 12).
SLICE_SIZES = (8, 12, 16, 32)
#: A layer shows a generator alone when its chunks' rank is at most this share of their count.
ALONE_SHARE = 0.5


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
    """The weight's slices as rows (``n x L``, float64): consecutive flat chunks."""
    length = slice_length(weight.shape, size)
    if length is None:
        raise ValueError(f"slice size {size} does not divide the widths of {weight.shape}")
    return np.asarray(weight, np.float64).reshape(-1, length)


def _spectrum(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (largest first) and right singular vectors (as rows) of
    ``rows``, from the Gram matrix of its shorter side."""
    if rows.shape[0] < rows.shape[1]:
        energy, left = np.linalg.eigh(rows @ rows.T)
        energy, left = np.clip(energy[::-1], 0.0, None), left[:, ::-1]
        keep = energy > energy[0] * 1e-24 if energy.size and energy[0] > 0 else energy > 0
        right = (left[:, keep] / np.sqrt(energy[keep])).T @ rows
        return energy[keep], right
    energy, vectors = np.linalg.eigh(rows.T @ rows)
    return np.clip(energy[::-1], 0.0, None), vectors[:, ::-1].T


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
        energy, right = _spectrum(rows)
        rank = max(1, _rank(energy, float(energy.sum()), tol))
        stacked.append(right[:rank] * np.sqrt(energy[:rank])[:, None])
        total += float(energy.sum())
    energy, right = _spectrum(np.concatenate(stacked))
    rank = _rank(energy, total, tol)
    return right[:rank].T if 0 < rank < length else None


#: Rows and columns of the sub-block :func:`_screen` decomposes.
SCREEN_SIZE = 256
#: The screen's tolerance, as a multiple of the search's: a sub-block's tail can be a larger
#: share of its own energy than the whole matrix's is of its.
SCREEN_SLACK = 10.0


def _screen(rows: np.ndarray, tol: float) -> bool:
    """Whether a sub-block of ``rows`` (:data:`SCREEN_SIZE` rows and columns spread evenly)
    is within a looser tolerance of rank :data:`ALONE_SHARE` of its size: sub-blocks of
    a low-rank matrix are low rank, and a random one's is full (one small decomposition
    instead of the whole matrix's)."""
    count, length = rows.shape
    size = min(count, length, SCREEN_SIZE)
    picked = rows[np.linspace(0, count - 1, size).round().astype(int)]
    block = picked[:, np.linspace(0, length - 1, size).round().astype(int)]
    energy = np.clip(np.linalg.eigvalsh(block @ block.T)[::-1], 0.0, None)
    return _rank(energy, float(energy.sum()), SCREEN_SLACK * tol) <= ALONE_SHARE * size


def _shows_generator(rows: np.ndarray, tol: float) -> bool:
    """Whether the chunks ``rows`` have rank within ``tol`` at most :data:`ALONE_SHARE` of
    their count (screened first, :func:`_screen`)."""
    if not _screen(rows, tol):
        return False
    energy, _ = _spectrum(rows)
    return _rank(energy, float(energy.sum()), tol) <= ALONE_SHARE * min(rows.shape)


def _residual(rows: np.ndarray, basis: np.ndarray) -> float:
    norm = float(np.linalg.norm(rows))
    return float(np.linalg.norm(rows - (rows @ basis) @ basis.T)) / norm if norm > 0 else 0.0


def find(weights: dict[str, np.ndarray], tol: float) -> list[Sharing]:
    """The generators shared by the conv weights of ``weights`` (one group each), at most
    one per kernel shape: at the slice size whose generator and codes take the fewest
    numbers, when two or more layers share it and it takes fewer than the kernels."""
    by_kernel: dict[tuple[int, ...], list[str]] = {}
    for key, weight in weights.items():
        by_kernel.setdefault(tuple(weight.shape[2:]), []).append(key)
    found = []
    for keys in by_kernel.values():
        options = [sharing for size in SLICE_SIZES
                   if (sharing := _share(weights, keys, size, tol)) is not None]
        if options:
            found.append(min(options, key=lambda sharing: sharing.params))
    return found


def _share(weights: dict[str, np.ndarray], keys: list[str], size: int, tol: float
           ) -> Sharing | None:
    eligible = [key for key in keys if slice_length(weights[key].shape, size) is not None]
    rows = {key: chunks(weights[key], size) for key in eligible}
    showing = [key for key in eligible if _shows_generator(rows[key], tol)]
    if not showing and len(eligible) > 1 and _shows_generator(
            np.concatenate([rows[key] for key in eligible]), tol):
        showing = eligible  # no layer has chunks enough alone; all of them together do
    if not showing:
        return None
    basis = _joint_basis([rows[key] for key in showing], tol)
    if basis is None:
        return None
    members = [key for key in eligible if _residual(rows[key], basis) <= tol]
    if len(members) < 2:
        return None
    codes = tuple(rows[key] @ basis for key in members)
    sharing = Sharing(tuple(members), size, basis, codes,
                      tuple(_residual(rows[key], basis) for key in members))
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
