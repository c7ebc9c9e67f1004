"""The shared-generator family (CSG): convs whose kernels one linear generator makes.

:mod:`sconv_onnx.csg` has the math.  For the layers of a :class:`~sconv_onnx.csg.Sharing`
the rewrite stores the generator once and each layer's codes, and rebuilds
each kernel in the graph:

    MatMul(codes_l, generator^T) -> Reshape(O, C, K..) -> the Conv's weight

Every input of the rebuild is a constant, so onnxruntime folds it when the
session is created (at any graph optimization level but ``ORT_DISABLE_ALL``,
where it runs on every inference): the model is smaller on disk and runs as
fast.  The candidate's cost is therefore the convs' own, and it is a
*size-only* group candidate: the selector decides it after the single
layers, for those of its layers that no candidate rewrote (another family
may make some faster: a generated conv with ``C = s^2`` is low rank), when
it stores fewer params for them (:mod:`sconv_onnx.select`).

Sites: Conv layers of one group in the main graph with a constant float32
weight, grouped per :func:`sconv_onnx.csg.find` at :data:`SCREEN_TOL` (sites
are made before the tolerance is known); the candidate holds at ``tol`` only
when every member's residual does.  A BatchNormalization after a conv stays:
the generator makes the conv's own kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import csg, structure
from ..cost import original_ops
from ..plan import Candidate, Part
from .base import Emitter, Family, Site
from .box import conv
from .graphs import constant_value, drop_if_unused

#: The tolerance sites are grouped at: above any ``--tol`` worth using.
SCREEN_TOL = 1e-3


@dataclass(kw_only=True)
class GeneratorSite(Site):
    """The convs one generator makes (a group site): their sites and the sharing found."""

    members: tuple[conv.ConvSite, ...]
    sharing: csg.Sharing


def _raw_weight(site: conv.ConvSite) -> np.ndarray | None:
    """The conv's own weight (not a BatchNormalization folded into it)."""
    weight = constant_value(site.node.inputs[1])
    return weight if weight is not None and weight.dtype == np.float32 else None


class SharedGeneratorFamily(Family):
    """One generator for many convs' kernels, for file size (see the module doc)."""

    name = "csg"
    description = ("shared slice generators (CSG): convs whose kernels one linear generator "
                   "makes, stored as the generator and per-layer codes (smaller file, same speed)")

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
        return found

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        sharing: csg.Sharing = site.sharing
        tol = structure.effective_tol(tol, site.layers[0].weight_dtype)
        if max(sharing.residuals) > tol:
            return []
        parts = [Part("generator", sharing.basis.size, (), site.members[0].geometry.positions)]
        for member, codes in zip(site.members, sharing.codes):
            shape_constant = len(member.weight.shape)
            parts.append(Part("codes", codes.size + shape_constant + member.bias_size,
                              tuple(original_ops(member.geometry)), member.geometry.positions,
                              member=member.layer.key))
        depth = max(math.prod(member.weight.shape[1:]) for member in site.members)
        label = (f"generator s={sharing.slice_size} d={sharing.code_size} "
                 f"shared by {len(site.members)} layers")
        return [Candidate(self.name, label, max(sharing.residuals), tuple(parts), payload=sharing,
                          rounding_depth=depth + sharing.code_size + 2, size_only=True)]

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        sharing: csg.Sharing = candidate.payload
        covered = set(candidate.members or sharing.keys)  # the layers the selector gave it
        taken = [(member, codes) for member, codes in zip(site.members, sharing.codes)
                 if member.layer.key in covered]
        first = taken[0][0]
        dtype = _raw_weight(first).dtype
        generator = emitter.shared(("csg generator", id(sharing)), lambda: emitter.at(
            first.node, first.name).constant("csg_generator", sharing.basis.T.astype(dtype)))
        for member, codes in taken:
            node, at = emitter.node(member.node), emitter.at(member.node, member.name)
            old_weight = node.inputs[1]
            flat = at.node("MatMul", "csg_rebuild", [at.constant("csg_codes", codes.astype(dtype)),
                                                    generator])
            shape = at.constant("csg_shape", np.array(member.weight.shape, np.int64))
            node.inputs[1] = at.node("Reshape", "csg_weight", [flat, shape])
            drop_if_unused(emitter.graph_of(member.node), old_weight)


__all__ = ["GeneratorSite", "SharedGeneratorFamily"]
