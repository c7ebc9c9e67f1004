"""Structural Regularization training for PyTorch (Bhalgat et al., NeurIPS 2020, section 4).

Needs the ``train`` extra (``torch``); the core package never imports this module.

Train a model so that its weights come close to the Structured-Convolution
structure, snap them onto it, then let :func:`sconv_onnx.optimize` rewrite
the exported ONNX model exactly (its default ``tol``)::

    spec = StructureSpec.paper()        # 3x3 convs: n=2; 1x1 convs, C >= 32: c=C/2; Linear: c=IN/2
    regularizer = StructuralRegularizer(model, spec)   # strength 1.0 (see the class)
    for x, y in batches:
        loss = criterion(model(x), y) + regularizer()
        ...
    regularizer.project()               # W <- A A^+ W, in place

Conventions are those of :mod:`sconv_onnx.structure`: a weight
``(O, C, K_1, .., K_r)`` with ``C`` the input channels *per group*, and
underlying sizes ``(c, n_1, .., n_r)``.  ``nn.Linear``'s weight
``(out, in)`` is the case ``r = 0``: structure along ``in_features``.
Supported layers: ``nn.Conv1d``/``Conv2d``/``Conv3d`` (grouped and
depthwise included) and ``nn.Linear``.  ``ConvTranspose`` modules are left
out: their structure lies along the *output* channels (weight axis 1 is
``out_channels / groups`` there), which these rules do not describe.

The math.  With ``A_m = A(K_m, k_m)`` the box basis of axis ``m`` and
``P_m = A_m A_m^+`` the orthogonal projector onto its range, the
least-squares structured weight is the separable projection

    P W = W x_1 P_C x_2 P_1 .. x_{r+1} P_r      (= expand(fit_alpha(W, sizes), W.shape))

and the Structural Regularization term is

    L_SR = lambda * sum_layers ||(I - P) W||_F / ||W||_F

(dimensionless: each layer's relative distance from its structure, in
``[0, 1]``).  Only the small ``K_m x K_m`` projectors are built, never the
dense ``prod(K) x prod(K)`` one.

Interleaved group convolutions (:mod:`sconv_onnx.interleave`) are a second
structure: an :class:`InterleavedRule` (or an override with an
:class:`~sconv_onnx.interleave.Hypothesis`) gives a conv a two-factor layout
(G1, G2, R).  Its distance is the blocks' tail energy beyond rank ``R``,

    ||W - nearest product||_F / ||W||_F = sqrt(sum_blocks sum_{i > R} s_i^2) / ||W||_F

(``s_i`` the singular values of the block from input group ``g`` to output
group ``j``; ``torch.linalg.svdvals``, whose gradients are stable), and the
projection is the blocks' truncated SVD, the same fit the rewrite makes::

    spec = StructureSpec([InterleavedRule(kernel=3, in_groups=4, out_groups=2)])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import chains, interleave
from .interleave import Hypothesis
from .structure import box_basis, box_pinv

#: Layer kinds a :class:`Rule` can name.
KINDS = ("conv", "linear")


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` for ``nn.Conv1d/2d/3d``, ``"linear"`` for ``nn.Linear``, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def check_sizes(sizes: Sequence[int], weight_shape: Sequence[int], where: str = "") -> tuple:
    """``sizes`` as a tuple after checking ``len == weight rank - 1`` and ``1 <= k <= K``."""
    sizes, full = tuple(int(k) for k in sizes), tuple(weight_shape[1:])
    if len(sizes) != len(full) or not all(1 <= k <= size for k, size in zip(sizes, full)):
        raise ValueError(f"{where}sizes {sizes} do not fit a weight {tuple(weight_shape)}: "
                         f"need one size in 1..K per axis of {full}")
    return sizes


@dataclass(frozen=True)
class Rule:
    """Which layers a rule covers, and the structure ``(c, n_1, .., n_r)`` it gives them.

    Attributes:
        kind: ``"conv"`` (``nn.Conv1d/2d/3d``, any ``groups``) or ``"linear"``.
        kernel: convs only; an int matches layers whose every kernel size
            equals it (``3`` matches 3x3 and 3x3x3), a tuple matches that
            kernel exactly, None matches any kernel.
        min_in: matches layers with at least this many input channels per
            group ``C`` (``in_features`` for ``nn.Linear``).
        n: spatial underlying size: one int for every spatial axis or a
            tuple, one per axis; None keeps the full kernel.
        c_ratio: channel underlying size as a fraction of ``C``:
            ``c = max(1, round(C * c_ratio))``; None keeps ``c = C``.
    """

    kind: str
    kernel: int | tuple[int, ...] | None = None
    min_in: int = 1
    n: int | tuple[int, ...] | None = None
    c_ratio: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "linear" and (self.kernel is not None or self.n is not None):
            raise ValueError("a linear rule has no kernel or n (its weight has no spatial axes)")
        if self.c_ratio is not None and not 0.0 < self.c_ratio <= 1.0:
            raise ValueError(f"c_ratio must be in (0, 1], not {self.c_ratio}")

    def matches(self, kind: str, weight_shape: Sequence[int]) -> bool:
        """Whether a layer of ``kind`` with a weight of ``weight_shape`` is covered."""
        if kind != self.kind or weight_shape[1] < self.min_in:
            return False
        kernel = tuple(weight_shape[2:])
        if isinstance(self.kernel, int):
            return all(size == self.kernel for size in kernel)
        return self.kernel is None or tuple(self.kernel) == kernel

    def sizes(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        """The underlying sizes this rule gives a weight of ``weight_shape``."""
        channels, kernel = weight_shape[1], tuple(weight_shape[2:])
        c = channels if self.c_ratio is None else max(1, round(channels * self.c_ratio))
        if self.n is None:
            spatial = kernel
        elif isinstance(self.n, int):
            spatial = (self.n,) * len(kernel)
        else:
            spatial = tuple(self.n)
        return check_sizes((c, *spatial), weight_shape, f"rule {self}: ")


@dataclass(frozen=True)
class InterleavedRule:
    """Convs given a two-factor interleaved layout (IGC-V1; :mod:`sconv_onnx.interleave`).

    Attributes:
        kernel, min_in: which convs, as for :class:`Rule` (a conv matches only
            when ``in_groups`` divides its input channels per group and
            ``out_groups`` its output channels per group).
        in_groups: G1, the first (KxK) group conv's groups.
        out_groups: G2, the second (1x1) group conv's groups.
        rank_ratio: R as a fraction of ``O / (G G1 G2)`` (``G`` the conv's groups),
            rounded, at least 1: at
            1 the channels between are as many as the outputs (``M = O``); the
            weights are ``R (G2 C t + G1 O)`` against ``O C t``.
        strided: output groups strided (channels ``j, j + G2, ..``) instead of
            contiguous.
    """

    kernel: int | tuple[int, ...] | None = None
    min_in: int = 1
    in_groups: int = 4
    out_groups: int = 2
    rank_ratio: float = 0.5
    strided: bool = False

    def __post_init__(self):
        if self.in_groups < 1 or self.out_groups < 1 or self.in_groups * self.out_groups == 1:
            raise ValueError("in_groups and out_groups must be at least 1 and not both 1, not "
                             f"{self.in_groups} and {self.out_groups}")
        if not 0.0 < self.rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1], not {self.rank_ratio}")

    def matches(self, kind: str, weight_shape: Sequence[int], groups: int = 1) -> bool:
        out_per_group = weight_shape[0] // groups
        return (Rule("conv", self.kernel, self.min_in).matches(kind, weight_shape)
                and weight_shape[1] % self.in_groups == 0 and out_per_group % self.out_groups == 0)

    def structure(self, weight_shape: Sequence[int], groups: int = 1) -> Hypothesis:
        """The layout this rule gives a conv weight of ``weight_shape`` and ``groups``."""
        out_ch = weight_shape[0]
        per_path = out_ch // (groups * self.in_groups * self.out_groups)
        rank = max(1, round(self.rank_ratio * per_path))
        strided = self.strided and 1 < self.out_groups < out_ch // groups  # else: in order
        order = interleave.strided_order(out_ch, self.out_groups, groups) if strided else None
        return Hypothesis(self.in_groups, self.out_groups, rank, order, strided=strided,
                          groups=groups)


#: A layer's structure: box sizes ``(c, n_1, .., n_r)`` or an interleaved layout.
Structure = tuple[int, ...] | Hypothesis


def _check_layout(hyp: Hypothesis, weight_shape: Sequence[int], groups: int, where: str
                  ) -> Hypothesis:
    """``hyp`` after checking it is a two-factor layout that divides a conv's channels."""
    out_ch, in_ch = weight_shape[:2]
    if (hyp.depthwise or hyp.inner is not None or hyp.groups != groups
            or in_ch % hyp.in_groups or out_ch % (groups * hyp.out_groups) or hyp.rank < 1):
        raise ValueError(f"{where}layout {hyp.label()} does not fit a conv weight "
                         f"{tuple(weight_shape)} of {groups} group(s): need a two-factor layout "
                         "whose groups divide its channels")
    return hyp


@dataclass(frozen=True)
class StructureSpec:
    """The structure of each layer of a model: rules, then per-layer overrides.

    A layer's sizes come from its entry in ``overrides`` (keyed by the
    module's name in ``model.named_modules()``; None leaves the layer
    unstructured), else from the first rule that matches it.  Layers whose
    sizes are the full weight shape carry no structure and are dropped.

    Example: ``StructureSpec([Rule("conv", kernel=3, n=2)], {"head": (32,)})``.
    """

    rules: Sequence[Rule | InterleavedRule] = ()
    overrides: Mapping[str, Sequence[int] | Hypothesis | None] = field(default_factory=dict)

    @classmethod
    def paper(cls, overrides: Mapping[str, Sequence[int] | Hypothesis | None] | None = None
              ) -> StructureSpec:
        """3x3 convs: ``n = 2``; 1x1 convs with ``C >= 32``: ``c = C/2``; Linear: ``c = IN/2``."""
        rules = [
            Rule("conv", kernel=3, n=2),
            Rule("conv", kernel=1, min_in=32, c_ratio=0.5),
            Rule("linear", c_ratio=0.5),
        ]
        return cls(rules, dict(overrides or {}))

    def sizes_for(self, name: str, module: nn.Module) -> Structure | None:
        """The structure of one layer (underlying sizes, or an interleaved layout), or None
        when it is unsupported or unstructured."""
        kind = layer_kind(module)
        if kind is None:
            return None
        shape = tuple(module.weight.shape)
        groups = getattr(module, "groups", 1)
        if name in self.overrides:
            wanted = self.overrides[name]
            if isinstance(wanted, Hypothesis):
                return _check_layout(wanted, shape, groups, f"override {name}: ")
            sizes = None if wanted is None else check_sizes(wanted, shape, f"override {name}: ")
        else:
            rule = next((rule for rule in self.rules if (
                rule.matches(kind, shape, groups) if isinstance(rule, InterleavedRule)
                else rule.matches(kind, shape))), None)
            if isinstance(rule, InterleavedRule):
                return rule.structure(shape, groups)
            sizes = None if rule is None else rule.sizes(shape)
        return None if sizes == shape[1:] else sizes

    def assign(self, model: nn.Module) -> dict[str, Structure]:
        """``{module name: structure}`` for every structured layer of ``model``.

        Raises ValueError when an override names no supported layer (a typo).
        """
        assigned, supported = {}, set()
        for name, module in model.named_modules():
            if layer_kind(module) is not None:
                supported.add(name)
            sizes = self.sizes_for(name, module)
            if sizes is not None:
                assigned[name] = sizes
        unknown = sorted(set(self.overrides) - supported)
        if unknown:
            raise ValueError(f"overrides name no Conv1d/2d/3d or Linear layer: {unknown}")
        return assigned


@functools.lru_cache(maxsize=256)
def _projector(size: int, under: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``A A^+`` (``size x size``) for ``A = A(size, under)``: built in float64, then cast."""
    return torch.as_tensor(box_basis(size, under) @ box_pinv(size, under), dtype=dtype,
                           device=device)


def _along(matrix: torch.Tensor, tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor x_axis matrix``: multiply ``tensor`` by ``matrix`` along ``axis``."""
    return torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [axis])), 0, axis)


def project_weight(weight: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The least-squares structured weight ``P W = W x_1 P_C x_2 P_1 .. x_{r+1} P_r``.

    Equal to ``expand(fit_alpha(W, sizes), W.shape)`` of :mod:`sconv_onnx.structure`,
    computed in ``weight``'s dtype and device; differentiable.
    """
    sizes = check_sizes(sizes, weight.shape)
    projected = weight
    for axis, under in enumerate(sizes, start=1):
        size = weight.shape[axis]
        if under != size:
            projected = _along(_projector(size, under, weight.dtype, weight.device), projected, axis)
    return projected


def structure_residual(weight: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``||(I - P) W||_F / ||W||_F`` (a 0-d tensor in ``[0, 1]``; 0 for an all-zero weight).

    The torch twin of :func:`sconv_onnx.structure.relative_residual`; differentiable.
    """
    distance = torch.linalg.vector_norm(weight - project_weight(weight, sizes))
    norm = torch.linalg.vector_norm(weight)
    return distance / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def interleaved_blocks(weight: torch.Tensor, hyp: Hypothesis) -> torch.Tensor:
    """The torch twin of :func:`sconv_onnx.interleave.blocks`: ``G G2 x G1 x O/(G G2) x
    C t/G1`` (differentiable, in ``weight``'s dtype)."""
    w = weight
    if hyp.out_order is not None:
        w = w[list(hyp.out_order)]
    if hyp.in_order is not None:
        w = w[:, list(hyp.in_order)]
    g1, g2 = hyp.in_groups, hyp.groups * hyp.out_groups
    return w.reshape(g2, w.shape[0] // g2, g1, -1).transpose(1, 2)


def interleaved_residual(weight: torch.Tensor, hyp: Hypothesis) -> torch.Tensor:
    """``||W - nearest product||_F / ||W||_F`` at the two-factor layout ``hyp`` (module doc;
    a 0-d tensor in ``[0, 1]``, 0 for an all-zero weight); differentiable."""
    if hyp.depthwise or hyp.inner is not None:
        raise ValueError(f"{hyp.label()} is a chain: only two-factor layouts are regularized")
    singular = torch.linalg.svdvals(interleaved_blocks(weight, hyp))
    tail = torch.sum(singular[..., hyp.rank:] ** 2)
    tiny = torch.finfo(weight.dtype).tiny
    return torch.sqrt(tail.clamp_min(tiny)) / torch.linalg.vector_norm(weight).clamp_min(tiny)


def project_interleaved(weight: torch.Tensor, hyp: Hypothesis) -> torch.Tensor:
    """The nearest product at ``hyp`` (any layout, chains too): the factors the rewrite
    computes (:func:`sconv_onnx.chains.factor`), multiplied out; float64 inside."""
    w = weight.detach().cpu().double().numpy()
    projected = interleave.expand(chains.factor(w, hyp), w.shape)
    return torch.as_tensor(projected, dtype=weight.dtype, device=weight.device)


def _residual(weight: torch.Tensor, structure: Structure) -> torch.Tensor:
    if isinstance(structure, Hypothesis):
        return interleaved_residual(weight, structure)
    return structure_residual(weight, structure)


def _project(weight: torch.Tensor, structure: Structure) -> torch.Tensor:
    if isinstance(structure, Hypothesis):
        return project_interleaved(weight, structure)
    return project_weight(weight, structure)


#: The regularizer's default strength (guidance: :class:`StructuralRegularizer`).
DEFAULT_STRENGTH = 1.0


class StructuralRegularizer(nn.Module):
    """``strength * sum_layers ||(I - P) W||_F / ||W||_F`` over the layers a spec assigns.

    An ``nn.Module`` whose forward takes no input: ``loss = task_loss +
    regularizer()``.  The layers and their sizes are fixed when it is built
    (:meth:`StructureSpec.assign`); each call reads the current weights.  The
    layers are the model's, held by reference, not registered as submodules
    (the regularizer has no parameters: ``model.parameters()`` are the ones to
    optimize, and ``.to(device)`` of the regularizer moves nothing).

    Choosing ``strength`` (default :data:`DEFAULT_STRENGTH`, 1.0; each
    layer's term is in ``[0, 1]``): watch :meth:`residuals` at the end of
    training.  Layers still above about 1e-3 from their structure are moved
    by :meth:`project`, which costs accuracy: raise the strength.  If the
    task's accuracy suffers during training, lower it.  Measured on the
    digits demo (:mod:`sconv_onnx.models.train_digits`): an interleaved
    layout at 0.5 ended 0.07 away and lost 5 points at projection, at 1.0 it
    ended 2e-5 away and lost nothing; at 2.0-5.0 training accuracy dropped 1-2
    points.
    """

    def __init__(self, model: nn.Module, spec: StructureSpec,
                 strength: float = DEFAULT_STRENGTH):
        super().__init__()
        self.strength = strength
        self.sizes = spec.assign(model)
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in self.sizes}  # a dict: not registered

    def residuals(self) -> dict[str, torch.Tensor]:
        """Each layer's relative residual (differentiable 0-d tensors)."""
        return {name: _residual(module.weight, self.sizes[name])
                for name, module in self.layers.items()}

    def penalty(self) -> torch.Tensor:
        """The unscaled sum of the relative residuals (0 when no layer is structured)."""
        residuals = list(self.residuals().values())
        return torch.stack(residuals).sum() if residuals else torch.zeros(())

    def forward(self) -> torch.Tensor:
        """The regularization term to add to the loss: ``strength * penalty()``."""
        return self.strength * self.penalty()

    @torch.no_grad()
    def project(self) -> dict[str, float]:
        """Snap every layer onto its structure in place (``W <- P W``).

        Returns each layer's relative residual just before the projection:
        the relative weight change it made.
        """
        before = {name: float(value) for name, value in self.residuals().items()}
        for name, module in self.layers.items():
            module.weight.copy_(_project(module.weight, self.sizes[name]))
        return before


def structural_regularization(model: nn.Module, spec: StructureSpec,
                              strength: float = DEFAULT_STRENGTH):
    """One-off ``strength * sum_layers ||(I - P) W||_F / ||W||_F`` (see :class:`StructuralRegularizer`)."""
    return StructuralRegularizer(model, spec, strength)()


def projection(model: nn.Module, spec: StructureSpec) -> dict[str, float]:
    """Snap ``model``'s layers onto the structures of ``spec`` in place; see
    :meth:`StructuralRegularizer.project`."""
    return StructuralRegularizer(model, spec).project()


__all__ = [
    "DEFAULT_STRENGTH",
    "KINDS",
    "InterleavedRule",
    "Rule",
    "StructuralRegularizer",
    "StructureSpec",
    "check_sizes",
    "interleaved_residual",
    "layer_kind",
    "project_interleaved",
    "project_weight",
    "projection",
    "structural_regularization",
    "structure_residual",
]
