"""The shared-generator family (CSG): convs whose kernels one linear generator makes.

:mod:`sconv_onnx.csg` has the math.  For the layers of a :class:`~sconv_onnx.csg.Sharing`
the rewrite stores the generator once and each layer's codes, and rebuilds
each kernel in the graph:

    MatMul(codes_l, generator^T) -> Reshape(O, C, K..) -> the Conv's weight

(where the slices are padded: MatMul -> Reshape(-1) -> Slice(first O C_pad
prod(K) entries) -> Reshape(O, C_pad, K..) -> Slice(C channels), each step
only where it drops something; opset 10 or later for the Slice inputs, its
attributes before).

Every input of the rebuild is a constant, so onnxruntime folds it when the
session is created (at any graph optimization level but ``ORT_DISABLE_ALL``,
where it runs on every inference): the model is smaller on disk and runs as
fast.  The candidate's cost is therefore the convs' own, and it is a
*size-only* group candidate: the selector decides it after the single
layers, for those of its layers that no candidate rewrote (another family
may make some faster: a generated conv with ``C = s^2`` is low rank), when
it stores fewer params for them (:mod:`sconv_onnx.select`).

*Basis form* (a runtime candidate, per layer): where every slice of a layer
is ``s^2`` whole input channels of one output channel (complete slices and
``C = m s^2``), the conv is

    Conv(x, Tile(Reshape(generator^T, (d, s^2, K..)), m); group m) -> Conv 1x1(codes)

the generator's ``d`` filters applied to each of the ``m`` channel groups,
then the codes (``O x m d``) combining them: ``d C prod(K) + m d O`` MACs per
output position against ``O C prod(K)`` (``d/O + m d/(C prod(K))`` of them;
ResNet-18's 256- and 512-wide generated convs at ``d = 128``: 0.55 and 0.31).
The selector weighs it like any single-layer candidate.  Its generator part
is keyed, so the layers of one sharing store one generator between them,
whichever form each takes; the size-only candidate then counts it once.

Neither form suits int8 quantization (``optimize(int8=True)`` leaves them
out): onnxruntime's quantizers want a conv's weight as an initializer, and
both forms compute it (measured: ``quantize_dynamic`` raises "Expected ...
to be an initializer").

Sites: Conv layers of one group in the main graph with a constant float32
weight, grouped per :func:`sconv_onnx.csg.find` at :data:`SCREEN_TOL` (sites
are made before the tolerance is known); a candidate holds at ``tol`` only
when every member's residual does.  A BatchNormalization after a conv stays:
the generator makes the conv's own kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from .. import cost, csg, structure
from ..cost import original_ops
from ..plan import REBUILT_WEIGHT, Candidate, Part
from .base import Emitter, Family, Site
from .box import conv, timing
from .graphs import constant_value, drop_if_unused

#: The tolerance sites are grouped at: above any ``--tol`` worth using.
SCREEN_TOL = 1e-3


@dataclass(kw_only=True)
class GeneratorSite(Site):
    """The convs one generator makes (a group site): their sites and the sharing found."""

    members: tuple[conv.ConvSite, ...]
    sharing: csg.Sharing


@dataclass(kw_only=True)
class BasisSite(conv.ConvSite):
    """A member conv of a sharing whose slices are whole input channel groups (the basis
    form applies): its codes at ``index`` in the sharing."""

    sharing: csg.Sharing
    index: int

    @property
    def groups(self) -> int:
        """``m``: the input channel groups, one slice each per output channel."""
        return self.weight.shape[1] // self.sharing.slice_size ** 2


@dataclass(frozen=True)
class BasisForm:
    """A basis-form candidate's payload: the sharing and the member's index in it (its own
    object: the rewrite tells the candidates of a sharing's sites apart by payload)."""

    sharing: csg.Sharing
    index: int


def _basis_applies(shape: tuple[int, ...], size: int) -> bool:
    return csg.complete(shape, size) and shape[1] % (size * size) == 0


def _generator_key(sharing: csg.Sharing) -> tuple:
    """The key of a sharing's generator part in the plan (charged once,
    :mod:`sconv_onnx.plan`): data, so that it can be compared and reported.  The emitter
    shares the initializer by the sharing object itself (:func:`_generator`)."""
    return ("csg generator", sharing.keys[0], sharing.slice_size)


def _raw_weight(site: conv.ConvSite) -> np.ndarray | None:
    """The conv's own weight (not a BatchNormalization folded into it)."""
    weight = constant_value(site.node.inputs[1])
    return weight if weight is not None and weight.dtype == np.float32 else None


class SharedGeneratorFamily(Family):
    """One generator for many convs' kernels, for file size and, in the basis form, speed
    (see the module doc)."""

    name = "csg"
    description = ("shared slice generators (CSG): convs whose kernels one linear generator "
                   "makes, stored as the generator and per-layer codes (a smaller file; where a slice "
                   "is whole input channels, also fewer MACs: the basis form)")

    def find(self, view) -> list[Site]:
        sites = {site.layer.key: site for site in conv.find(view, self.name)
                 if not site.skip_reason and site.graph is view.graph
                 and site.geometry.group == 1 and _raw_weight(site) is not None}
        weights = {key: _raw_weight(site) for key, site in sites.items()}
        found: list[Site] = []
        for sharing in csg.find(weights, SCREEN_TOL):
            members = tuple(sites[key] for key in sharing.keys)
            found.append(GeneratorSite(family=self.name,
                                       layers=tuple(site.layer for site in members),
                                       members=members, sharing=sharing))
            found += [BasisSite(**{f.name: getattr(member, f.name) for f in fields(member)},
                                sharing=sharing, index=index)
                      for index, member in enumerate(members)
                      if _basis_applies(member.weight.shape, sharing.slice_size)
                      and (member.opset >= TILE_OPSET
                           or member.weight.shape[1] == sharing.slice_size ** 2)]
        return found

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        sharing: csg.Sharing = site.sharing
        tol = structure.effective_tol(tol, site.layers[0].weight_dtype)
        if isinstance(site, BasisSite):  # one layer: its own residual
            return [_basis_candidate(site)] if sharing.residuals[site.index] <= tol else []
        if max(sharing.residuals) > tol:
            return []
        generator_part = Part("generator", sharing.generator.size, (),
                              site.members[0].geometry.positions, key=_generator_key(sharing))
        parts = [generator_part]
        for member, codes in zip(site.members, sharing.codes):
            constants = _rebuild_constants(member.weight.shape, sharing.slice_size)
            parts.append(Part("codes", codes.size + constants + member.bias_size,
                              tuple(original_ops(member.geometry)), member.geometry.positions,
                              member=member.layer.key))
        depth = max(math.prod(member.weight.shape[1:]) for member in site.members)
        label = (f"generator s={sharing.slice_size} d={sharing.code_size} "
                 f"shared by {len(site.members)} layers")
        return [Candidate(self.name, label, max(sharing.residuals), tuple(parts), payload=sharing,
                          rounding_depth=depth + sharing.code_size + 2, size_only=True,
                          int8_risk=REBUILT_WEIGHT)]

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        if isinstance(candidate.payload, BasisForm):
            _emit_basis(site, emitter)
            return
        sharing: csg.Sharing = candidate.payload
        covered = set(candidate.members or sharing.keys)  # the layers the selector gave it
        taken = [(member, codes) for member, codes in zip(site.members, sharing.codes)
                 if member.layer.key in covered]
        first = taken[0][0]
        dtype = _raw_weight(first).dtype
        generator = _generator(sharing, first, dtype, emitter)
        for member, codes in taken:
            node, at = emitter.node(member.node), emitter.at(member.node, member.name)
            old_weight = node.inputs[1]
            flat = at.node("MatMul", "csg_rebuild", [at.constant("csg_codes", codes.astype(dtype)),
                                                    generator])
            node.inputs[1] = _crop(at, flat, member.weight.shape, sharing.slice_size, member.opset)
            drop_if_unused(emitter.graph_of(member.node), old_weight)


    def measure(self, site: Site, trials, timer) -> list[float] | None:
        """A basis form timed alone, as the box family's (:mod:`.box.timing`); the size
        rewrite is not timed (it runs the layers' own convs)."""
        if not isinstance(site, BasisSite):
            return None

        def variant(basis_site, original, candidate, shared):
            return timing.emitted_layer_model(
                basis_site, original,
                lambda layer_site, emitter, graph: _emit_basis(layer_site, emitter))

        # a shared generator changes nothing at run time (it is folded): one timing per layout
        return timing.measure_alone(site, [(candidate, ()) for candidate, _ in trials], timer,
                                    variant, key=lambda candidate: (
                                        "csg basis", site.sharing.slice_size,
                                        site.sharing.code_size))


#: First opset whose Tile takes its repeats as an input (a basis form of one group, ``C = s^2``,
#: has no Tile).
TILE_OPSET = 6


def _generator(sharing: csg.Sharing, first: conv.ConvSite, dtype, emitter: Emitter):
    """The sharing's generator (``d x L``), one initializer for every form."""
    return emitter.shared(("csg generator", id(sharing)), lambda: emitter.at(
        first.node, first.name).constant("csg_generator", sharing.generator.T.astype(dtype)))


def _basis_candidate(site: BasisSite) -> Candidate:
    """The basis form of ``site`` (module doc): the keyed generator, the grouped conv of
    its filters (no weights of its own but the shape constants) and the codes' 1x1 conv."""
    sharing, geom = site.sharing, site.geometry
    out_ch, in_ch = site.weight.shape[:2]
    size, code_size, groups = sharing.slice_size, sharing.code_size, site.groups
    ones = (1,) * len(geom.kernel)
    filters = cost.conv_op(groups * code_size, size * size, in_ch, geom.kernel,
                           geom.input_positions)
    combine = cost.conv_op(out_ch, groups * code_size, groups * code_size, ones, 1.0)
    codes = sharing.codes[site.index]
    parts = (Part("generator", sharing.generator.size, (), geom.positions,
                  key=_generator_key(sharing)),
             Part("basis conv", len(site.weight.shape) * (1 + (groups > 1)),  # shape, repeats
                  (filters,), geom.positions),
             Part("codes conv", codes.size + site.bias_size, (combine,), geom.positions))
    return Candidate("csg", f"basis s={size} d={code_size} x{groups}",
                     sharing.residuals[site.index], parts, payload=BasisForm(sharing, site.index),
                     rounding_depth=size * size * math.prod(geom.kernel) + groups * code_size,
                     int8_risk=REBUILT_WEIGHT)


def _emit_basis(site: BasisSite, emitter: Emitter) -> None:
    """The basis form (module doc): the original node becomes the codes' 1x1 conv."""
    sharing, geom = site.sharing, site.geometry
    node, at = emitter.node(site.node), emitter.at(site.node, site.name)
    dtype = site.weight.dtype
    old_weight = node.inputs[1]
    size, code_size, groups = sharing.slice_size, sharing.code_size, site.groups
    ones = (1,) * len(geom.kernel)
    filters = at.node("Reshape", "csg_filters", [
        _generator(sharing, site, dtype, emitter),
        at.constant("csg_filters_shape", np.array((code_size, size * size, *geom.kernel),
                                                  np.int64))])
    if groups > 1:
        filters = at.node("Tile", "csg_filters_tiled", [filters, at.constant(
            "csg_filters_repeats", np.array((groups, 1, *ones), np.int64))])
    basis = at.node("Conv", "csg_basis", [node.inputs[0], filters], {
        "group": groups, "strides": list(geom.strides), "dilations": list(geom.dilations),
        "pads": list(geom.pads)})
    codes = sharing.codes[site.index].reshape(site.weight.shape[0], groups * code_size, *ones)
    node.inputs[0], node.inputs[1] = basis, at.constant("csg_codes", codes.astype(dtype))
    node.attrs = {}
    drop_if_unused(emitter.graph_of(site.node), old_weight)


def _rebuild_steps(shape: tuple[int, ...], size: int) -> tuple[int | None, bool]:
    """How a rebuild of ``shape`` from its slices crops: the flat entries kept when the
    slices hold more (else None), and whether input channels are cut."""
    padded = csg.padded_shape(shape, size)
    used = shape[0] * math.prod(padded[1:])
    held = csg.slice_count(shape, size) * csg.slice_length(shape, size)
    return (used if held > used else None), padded[1] > shape[1]


def _rebuild_constants(shape: tuple[int, ...], size: int) -> int:
    """The constant elements of a rebuild's Reshape and Slice nodes (:func:`_crop`)."""
    if csg.complete(shape, size):
        return len(shape)
    flat_cut, channel_cut = _rebuild_steps(shape, size)
    return 1 + len(shape) + 3 * (flat_cut is not None) + 3 * channel_cut


def _crop(at, slices, shape: tuple[int, ...], size: int, opset: int):
    """The weight of ``shape`` from its slices' tensor (``n x L``): a Reshape, or for padded
    slices the crop :func:`sconv_onnx.csg.from_slices` makes (see the module doc)."""
    if csg.complete(shape, size):
        return at.node("Reshape", "csg_weight",
                       [slices, at.constant("csg_shape", np.array(shape, np.int64))])
    flat_cut, channel_cut = _rebuild_steps(shape, size)
    padded = csg.padded_shape(shape, size)
    flat = at.node("Reshape", "csg_flat", [slices, at.constant("csg_flat_shape",
                                                               np.array([-1], np.int64))])
    if flat_cut is not None:
        flat = _slice(at, flat, 0, flat_cut, opset)
    rows = at.node("Reshape", "csg_padded", [flat, at.constant(
        "csg_padded_shape", np.array((shape[0], *padded[1:]), np.int64))])
    return _slice(at, rows, 1, shape[1], opset) if channel_cut else rows


def _slice(at, tensor, axis: int, end: int, opset: int):
    """``tensor[..., :end, ...]`` along ``axis`` (Slice inputs from opset 10, attributes
    before)."""
    if opset < 10:
        return at.node("Slice", "csg_crop", [tensor], {"starts": [0], "ends": [end], "axes": [axis]})
    constants = [at.constant(f"csg_crop_{what}", np.array([value], np.int64))
                 for what, value in (("starts", 0), ("ends", end), ("axes", axis))]
    return at.node("Slice", "csg_crop", [tensor, *constants])


__all__ = ["BasisForm", "BasisSite", "GeneratorSite", "SharedGeneratorFamily"]
