"""Shared slice generators across layers (CSG; Omidvar et al., AISTATS 2021): numpy only.

A network trained with a *Convolutional Slice Generator* builds the kernels of
many conv layers from one linear generator ``G`` (``L x d``) and per-layer
codes ``Z_l`` (``n_l x d``):

    W_l = (Z_l G^T).reshape(O_pad, C_pad, K..)[:O, :C]

``O_pad`` and ``C_pad`` are the widths rounded up to multiples of the slice
size ``s``.  Each row of ``Z_l G^T`` is a *slice*: a flat chunk of
``L = s^2 prod(K)`` consecutive entries of the flattened, padded weight (not
an ``s x s`` tile of channels).  When ``s`` divides both widths the slices are
*complete* (``n_l = O C / s^2`` rows, every entry a weight's); otherwise
some entries of the slices are padding that the crop drops, and the slices
past the last output channel hold none at all.  An exported model holds
every ``W_l`` in full; the generator and the codes hold ``d (L + sum n_l)``
numbers against ``sum O_l C_l prod(K)``.

Detection, per kernel shape and slice size (:func:`find`):

* each layer's slice matrix ``X_l`` (``n_l x L``) has rank at most ``d`` when
  generated: where ``n_l`` is well above its rank (within the tolerance: the
  tail of its singular values), the layer shows a generator of its own;
* when no layer shows one alone, the layers are tried together (all their
  slices stacked), and a layer stays among them only when its slices lie in
  the span the *other* layers show (leave one out: a layer the generator did
  not make, stacked with generated ones, raises the rank but lies outside
  the others' span);
* the layers that show it are joined: their row spaces (each truncated to
  its rank, weighted by the singular values) are stacked and decomposed
  again, and the rank within half the tolerance (:data:`RANK_SHARE`) is the
  shared ``d`` (an affine generator, ``Z G^T + 1 b^T``, is one dimension
  more);
* every layer of that kernel is a member when its slices lie in that span
  within the tolerance: its relative residual ``||X_l - Z_l G^T|| / ||X_l||``
  with the least-squares codes ``Z_l``.

Complete slices: ``G`` is the span's orthonormal basis and ``Z_l = X_l G``.
Padded slices need a *masked fit* (:func:`_share_masked`): only the weight's
entries of a slice are known, so each row is compared on its own entries.
The span is found on the entries every full slice of the showing layers
holds (their *common* columns, e.g. 864 of 1296 when a 16-wide layer is
padded to 24 with ``s = 12``), which gives those rows' codes; then ``G`` and
the codes are solved in turn by least squares over the known entries alone
(each column of ``G`` from the rows that hold it, each row's codes from its
own entries; rows and columns with the same known entries are solved
together).  Residuals count known entries only.

Left out: ``s x s`` tiles as the slice layout; a generator over the alphas of
box-structured layers; kernels scaled per output channel after generation
(a BatchNormalization folded at export: where a slice spans several output
channels, it leaves the span).

The family that rewrites the layers is :mod:`sconv_onnx.passes.csg`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Slice sizes tried (the paper's ImageNet models use 16, its CIFAR ones 12).
SLICE_SIZES = (8, 12, 16, 32)
#: A layer shows a generator alone when its slices' rank is at most this share of the
#: slice matrix's shorter side.
ALONE_SHARE = 0.5
#: A layer tried together with others stays when its slices lie within this multiple of
#: the tolerance of the others' top directions (a layer the generator did not make lies far
#: outside them: a residual near 1).
LEAVE_OUT_SLACK = 10.0
#: Elements of the layers of one kernel shape tried together when none shows a generator
#: alone (small layers: CIFAR widths); above, they are not.
MAX_TOGETHER = 4_000_000
#: When the layers are tried together, a padded layer helps find the span (rather than only
#: being tested against it) when at least this share of its slices' entries are its
#: weight's: a thin layer (a 3-channel stem padded to 12) would leave few columns common to
#: every slice.  (A layer that shows a generator alone always helps.)
MIN_OBSERVED = 0.5
#: Weights of the layers of one kernel shape above which the masked fit is not tried (its
#: least squares touch every slice entry several times; CIFAR ResNet-20's 3x3 convs hold
#: 0.27M, and large layers have complete slices at one of :data:`SLICE_SIZES` anyway).
MAX_MASKED = 4_000_000
#: Rounds of the masked fit (generator, then codes) after its first generator.
FIT_ROUNDS = 3


@dataclass(frozen=True)
class Sharing:
    """Layers whose kernels one generator makes: ``keys`` (in the order given to
    :func:`find`), the slice size, the ``generator`` (``L x d``; orthonormal columns when
    found from complete slices, the masked fit's least squares otherwise), each member's
    ``codes`` (``n_l x d``, one row per slice that holds weight entries) and relative
    ``residuals``; generator and codes in the members' dtype."""

    keys: tuple[str, ...]
    slice_size: int
    generator: np.ndarray
    codes: tuple[np.ndarray, ...]
    residuals: tuple[float, ...]

    @property
    def code_size(self) -> int:
        return self.generator.shape[1]

    @property
    def params(self) -> int:
        """The generator's and the codes' numbers: ``d (L + sum n_l)``."""
        return self.generator.size + sum(codes.size for codes in self.codes)


def slice_length(shape: tuple[int, ...], size: int) -> int:
    """``L = s^2 prod(K)`` for a conv weight ``O x C x K..`` of one group."""
    return size * size * math.prod(shape[2:])


def complete(shape: tuple[int, ...], size: int) -> bool:
    """Whether ``s`` divides both widths (every slice entry is a weight's)."""
    return shape[0] % size == 0 and shape[1] % size == 0


def padded_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """``O_pad x C_pad x K..``: the widths rounded up to multiples of ``s``."""
    return (-(-shape[0] // size) * size, -(-shape[1] // size) * size, *shape[2:])


def slice_count(shape: tuple[int, ...], size: int) -> int:
    """``n``: the slices that hold weight entries (those up to the last output channel)."""
    padded = padded_shape(shape, size)
    return -(-shape[0] * math.prod(padded[1:]) // slice_length(shape, size))


def chunks(weight: np.ndarray, size: int) -> np.ndarray:
    """The complete slices of the weight as rows (``n x L``, a view in the weight's dtype
    where it can be): consecutive flat chunks."""
    if not complete(weight.shape, size):
        raise ValueError(f"slice size {size} does not divide the widths of {weight.shape}")
    return np.reshape(weight, (-1, slice_length(weight.shape, size)))


def padded_slices(weight: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The slices of the padded weight that hold entries (``n x L``, zeros for padding) and
    which entries are the weight's (``n x L``, bool)."""
    padded = padded_shape(weight.shape, size)
    out_ch, in_ch = weight.shape[:2]
    length = slice_length(weight.shape, size)
    count = slice_count(weight.shape, size)
    values = np.zeros(padded, weight.dtype)
    values[:out_ch, :in_ch] = weight
    known = np.zeros(padded, bool)
    known[:out_ch, :in_ch] = True
    used = count * length
    return (values.reshape(-1)[:used].reshape(count, length),
            known.reshape(-1)[:used].reshape(count, length))


def from_slices(rows: np.ndarray, shape: tuple[int, ...], size: int) -> np.ndarray:
    """The weight of ``shape`` whose padded, flattened form starts with ``rows`` (the
    crop ``[:O, :C]``; the inverse of :func:`padded_slices`)."""
    padded = padded_shape(shape, size)
    flat = np.reshape(rows, -1)[:shape[0] * math.prod(padded[1:])]
    return flat.reshape(shape[0], *padded[1:])[:, :shape[1]]


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


def _spectrum(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values of ``rows``, largest first, and the eigenvectors of the Gram
    matrix of its shorter side (columns, in the same order)."""
    energy, vectors = np.linalg.eigh(_gram(rows))
    return np.clip(energy[::-1], 0.0, None), vectors[:, ::-1]


def _right(rows: np.ndarray, energy: np.ndarray, vectors: np.ndarray, rank: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """From :func:`_spectrum`, the ``rank`` largest nonzero squared singular values of
    ``rows`` and their right singular vectors (as rows, ``rank x L``)."""
    count, length = rows.shape
    energy, vectors = energy[:rank], vectors[:, :rank]
    keep = energy > 0
    energy, vectors = energy[keep], vectors[:, keep]
    if count >= length:
        return energy, vectors.T
    left = vectors / np.sqrt(energy)
    right = np.empty((len(energy), length))
    for span in _spans(length, count):
        right[:, span] = left.T @ np.asarray(rows[:, span], np.float64)
    return energy, right


def _top(rows: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` largest squared singular values of ``rows`` and their right singular
    vectors (as rows, ``rank x L``), from the Gram matrix of the shorter side."""
    return _right(rows, *_spectrum(rows), rank)


def _rank(energy: np.ndarray, total: float, tol: float) -> int:
    """The least rank whose tail energy is within ``tol^2 total``."""
    tails = np.append(np.cumsum(energy[::-1])[::-1], 0.0)
    return int(np.argmax(tails <= tol * tol * total))


#: The joint span keeps directions until its tail is within this share of the tolerance;
#: the rest is each member's own misfit (noise): truncating at the whole tolerance left the
#: members of a noisy generator just outside it.  (Each layer's own row space is truncated
#: at the whole tolerance before stacking: the stack stays small.)
RANK_SHARE = 0.5


#: Slice lengths up to which :func:`_joint_basis` sums the ``L x L`` Gram matrix of the
#: stacked row spaces layer by layer (at most 134 MB) once they have ``L`` rows, instead of
#: holding the whole stack.
GRAM_LENGTH = 4096


def _joint_basis(layers: list[np.ndarray], tol: float) -> np.ndarray | None:
    """An orthonormal basis (``L x d``) of the span shared by ``layers`` (slice matrices),
    or None when it is no smaller than ``L``: the layers' row spaces, each truncated to its
    rank within ``tol`` and weighted by its singular values, stacked and decomposed again,
    keeping directions until the tail is within :data:`RANK_SHARE` ``tol`` of the layers'
    total energy (from the Gram matrix of the shorter side; past ``L`` rows, up to
    :data:`GRAM_LENGTH`, the ``L x L`` one is summed layer by layer instead of stacking)."""
    length = layers[0].shape[1]
    stacked, summed, total = [], None, 0.0
    for rows in layers:
        energy, vectors = _spectrum(rows)
        own = float(energy.sum())
        top, right = _right(rows, energy, vectors, max(1, _rank(energy, own, tol)))
        stacked.append(right * np.sqrt(top)[:, None])
        total += own
        if summed is None and length <= GRAM_LENGTH and sum(map(len, stacked)) >= length:
            summed = np.zeros((length, length))
        if summed is not None:
            for weighted in stacked:
                summed += weighted.T @ weighted
            stacked = []
    tol = RANK_SHARE * tol
    if summed is not None:
        energy, vectors = np.linalg.eigh(summed)
        rank = _rank(np.clip(energy[::-1], 0.0, None), total, tol)
        return vectors[:, ::-1][:, :rank] if 0 < rank < length else None
    stacked = np.concatenate(stacked)
    energy, vectors = _spectrum(stacked)
    rank = _rank(energy, total, tol)
    return _right(stacked, energy, vectors, rank)[1].T if 0 < rank < length else None


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
    """Whether the slices ``rows`` have rank within ``tol`` at most :data:`ALONE_SHARE` of
    their count (screened first, :func:`_screen`)."""
    if min(rows.shape) == 0 or not _screen(rows, tol):
        return False
    energy = _energies(rows)
    return _rank(energy, float(energy.sum()), tol) <= ALONE_SHARE * min(rows.shape)


def _together(rows: dict[str, np.ndarray], tol: float) -> list[str]:
    """The layers of ``rows`` (slice matrices on common columns) that show a generator
    together when none shows one alone: all of them stacked must (rank ``r`` within
    ``tol``), and each stays only when its slices lie within :data:`LEAVE_OUT_SLACK` ``tol``
    of the others' top ``r`` directions (leave one out; a layer the generator did not
    make is far outside them)."""
    keys = list(rows)
    if len(keys) < 2 or sum(matrix.size for matrix in rows.values()) > MAX_TOGETHER:
        return []
    stacked = np.concatenate([rows[key] for key in keys])
    if not _shows_generator(stacked, tol):
        return []
    energy = _energies(stacked)
    rank = _rank(energy, float(energy.sum()), tol)
    kept = [key for key in keys if _residual(rows[key], _top(
        np.concatenate([rows[other] for other in keys if other != key]), rank)[1].T)
        <= LEAVE_OUT_SLACK * tol]
    return kept if len(kept) > 1 else []


def _residual(rows: np.ndarray, basis: np.ndarray) -> float:
    """``||X - X B B^T|| / ||X||`` (by blocks of rows)."""
    total = left = 0.0
    for span in _spans(rows.shape[0], rows.shape[1]):
        block = np.asarray(rows[span], np.float64)
        total += float(np.sum(block**2))
        left += float(np.sum((block - (block @ basis) @ basis.T) ** 2))
    return float(np.sqrt(left / total)) if total > 0 else 0.0


def _codes(rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``X B``: the least-squares codes of the slices ``X`` (by blocks of rows)."""
    return np.concatenate([np.asarray(rows[span], np.float64) @ basis
                           for span in _spans(rows.shape[0], rows.shape[1])])


def find(weights: dict[str, np.ndarray], tol: float) -> list[Sharing]:
    """The generators shared by the conv weights of ``weights`` (one group each), per
    kernel shape: the sharing (over the slice sizes, complete or padded) that saves the
    most numbers, then again among the layers it left, while one saves any and covers
    two layers or more."""
    by_kernel: dict[tuple[int, ...], list[str]] = {}
    for key, weight in weights.items():
        by_kernel.setdefault(tuple(weight.shape[2:]), []).append(key)
    found = []
    for keys in by_kernel.values():
        while len(keys) > 1:
            options = [sharing for size in SLICE_SIZES for share in (_share_complete, _share_masked)
                       if (sharing := share(weights, keys, size, tol)) is not None]
            if not options:
                break
            best = max(options, key=lambda sharing: _saved(sharing, weights))
            found.append(best)
            keys = [key for key in keys if key not in best.keys]
    return found


def _saved(sharing: Sharing, weights: dict[str, np.ndarray]) -> int:
    """The numbers ``sharing`` saves against its members' kernels."""
    return sum(weights[key].size for key in sharing.keys) - sharing.params


def _sharing(weights: dict[str, np.ndarray], size: int, generator: np.ndarray,
             fits: dict[str, tuple[np.ndarray, float]], tol: float) -> Sharing | None:
    """The sharing of the layers whose fit (codes, residual) is within ``tol``, when there
    are two or more and it stores fewer numbers than their kernels; the generator and codes
    in the members' dtype (the rewrite stores them so; float64 only doubles what a run
    holds)."""
    members = [key for key, (_, residual) in fits.items() if residual <= tol]
    if len(members) < 2:
        return None
    dtype = np.result_type(*(weights[key].dtype for key in members))
    sharing = Sharing(tuple(members), size, generator.astype(dtype),
                      tuple(fits[key][0].astype(dtype) for key in members),
                      tuple(fits[key][1] for key in members))
    return sharing if sharing.params < sum(weights[key].size for key in members) else None


def _share_complete(weights: dict[str, np.ndarray], keys: list[str], size: int, tol: float
                    ) -> Sharing | None:
    """The sharing among the layers of ``keys`` whose widths ``size`` divides."""
    eligible = [key for key in keys if complete(weights[key].shape, size)]
    if len(eligible) < 2:
        return None
    rows = {key: chunks(weights[key], size) for key in eligible}
    showing = ([key for key in eligible if _shows_generator(rows[key], tol)]
               or _together(rows, tol))
    if not showing:
        return None
    basis = _joint_basis([rows[key] for key in showing], tol)
    if basis is None:
        return None
    fits = {key: (_codes(rows[key], basis), _residual(rows[key], basis)) for key in eligible}
    return _sharing(weights, size, basis, fits, tol)


@dataclass(frozen=True)
class _Padded:
    """A layer's padded slices (:func:`padded_slices`), its full rows (those with the most
    weight entries) and the columns every full row holds."""

    rows: np.ndarray
    known: np.ndarray
    full: np.ndarray
    common: np.ndarray

    @classmethod
    def of(cls, weight: np.ndarray, size: int) -> _Padded:
        rows, known = padded_slices(weight, size)
        counts = known.sum(axis=1)
        full = np.flatnonzero(counts == counts.max())
        return cls(rows, known, full, known[full].all(axis=0))

    @property
    def known_share(self) -> float:
        return float(self.known.mean())

    def on(self, columns: np.ndarray) -> np.ndarray:
        """The full rows on ``columns`` (float64)."""
        return np.asarray(self.rows[self.full][:, columns], np.float64)


def _share_masked(weights: dict[str, np.ndarray], keys: list[str], size: int, tol: float
                  ) -> Sharing | None:
    """The sharing among the layers of ``keys``, with padded slices, when ``size`` does not
    divide the widths of some and they hold at most :data:`MAX_MASKED` weights (a masked
    fit; see the module doc)."""
    if (all(complete(weights[key].shape, size) for key in keys)
            or sum(weights[key].size for key in keys) > MAX_MASKED):
        return None
    layers = {key: _Padded.of(weights[key], size) for key in keys}
    showing = [key for key, layer in layers.items()
               if _shows_generator(layer.on(layer.common), tol)]
    if not showing:
        defining = [key for key, layer in layers.items() if layer.known_share >= MIN_OBSERVED]
        common = np.logical_and.reduce([layers[key].common for key in defining] or [[False]])
        showing = _together({key: layers[key].on(common) for key in defining}, tol)
    if not showing:
        return None
    common = np.logical_and.reduce([layers[key].common for key in showing])
    basis = _joint_basis([layers[key].on(common) for key in showing], tol)
    if basis is None:
        return None
    generator = _masked_generator([layers[key] for key in showing], common, basis)
    fits = {}
    for key, layer in layers.items():
        codes = _least_squares(generator, layer.rows.T, layer.known.T)
        fits[key] = (codes, _masked_residual(layer, codes, generator))
    return _sharing(weights, size, generator, fits, tol)


def _masked_generator(layers: list[_Padded], common: np.ndarray, basis: np.ndarray
                      ) -> np.ndarray:
    """The generator (``L x d``) of ``layers``: the codes of their full rows from the span
    ``basis`` found on the ``common`` columns, then :data:`FIT_ROUNDS` rounds of least
    squares for the generator and for every row's codes, on known entries only."""
    full = np.concatenate([layer.rows[layer.full] for layer in layers])
    known = np.concatenate([layer.known[layer.full] for layer in layers])
    codes = np.asarray(full[:, common], np.float64) @ basis
    generator = _least_squares(codes, full, known)
    rows = np.concatenate([layer.rows for layer in layers])
    known = np.concatenate([layer.known for layer in layers])
    for _ in range(FIT_ROUNDS):
        codes = _least_squares(generator, rows.T, known.T)
        generator = _least_squares(codes, rows, known)
    return generator


def _least_squares(known_factor: np.ndarray, values: np.ndarray, known: np.ndarray
                   ) -> np.ndarray:
    """For every column ``j`` of ``values`` (``m x n``), the ``x_j`` (``d``) that minimizes
    ``||A[k_j] x_j - values[k_j, j]||`` where ``A`` is ``known_factor`` (``m x d``) and
    ``k_j`` the rows ``known`` marks in column ``j`` (the minimum-norm solution where
    they are too few; zero where there are none); returned as rows (``n x d``).  Columns
    with the same known rows are solved together."""
    out = np.zeros((values.shape[1], known_factor.shape[1]))
    patterns, which = np.unique(np.packbits(known, axis=0).T, axis=0, return_inverse=True)
    for pattern in range(len(patterns)):
        columns = np.flatnonzero(which.ravel() == pattern)
        rows = np.flatnonzero(known[:, columns[0]])
        if rows.size:
            target = np.asarray(values[np.ix_(rows, columns)], np.float64)
            out[columns] = np.linalg.lstsq(known_factor[rows], target, rcond=None)[0].T
    return out


def _masked_residual(layer: _Padded, codes: np.ndarray, generator: np.ndarray) -> float:
    """``||K o (X - Z G^T)|| / ||X||`` over the layer's known entries ``K``."""
    values = np.asarray(layer.rows, np.float64)
    total = float(np.sum(values**2))
    left = float(np.sum((np.where(layer.known, values - codes @ generator.T, 0.0)) ** 2))
    return float(np.sqrt(left / total)) if total > 0 else 0.0


def paper_params(shapes: list[tuple[int, ...]], size: int, code_size: int) -> int:
    """The generator and codes as the paper stores them for weights of ``shapes``:
    ``d (L + sum n_pad)``, a code for every slice of each padded weight (:attr:`Sharing.params`
    counts only the slices that hold entries)."""
    length = slice_length(shapes[0], size)
    return code_size * (length + sum(math.prod(padded_shape(shape, size)) // length
                                     for shape in shapes))


def generated(rng: np.random.Generator, shapes: list[tuple[int, ...]], size: int, code_size: int,
              affine: bool = False) -> list[np.ndarray]:
    """Weights of ``shapes`` made by one random generator (``L x d``) and random codes
    (float64; entries of order ``1/sqrt(d)`` times the generator's), plus one shared
    random slice offset ``b`` when ``affine``; padded and cropped where ``s`` does not
    divide a width."""
    length = slice_length(shapes[0], size)
    generator = rng.standard_normal((length, code_size))
    offset = rng.standard_normal(length) if affine else np.zeros(length)
    made = []
    for shape in shapes:
        codes = rng.standard_normal((slice_count(shape, size), code_size)) / math.sqrt(code_size)
        made.append(from_slices(codes @ generator.T + offset, shape, size))
    return made


__all__ = ["SLICE_SIZES", "Sharing", "chunks", "complete", "find", "from_slices", "generated",
           "padded_shape", "padded_slices", "paper_params", "slice_count", "slice_length"]
