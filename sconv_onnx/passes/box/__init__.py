"""The box family: Structured Convolutions (Bhalgat et al., NeurIPS 2020).

A weight is structured when it is a sum of boxes of ones; the layer then
becomes a sum-pool and a much smaller layer (docs/DESIGN.md section 1).
Sites: every ``Conv`` (:mod:`.conv`), ``ConvTranspose``
(:mod:`.conv_transpose`), ``Gemm`` and ``MatMul`` (:mod:`.linear`) with a
constant weight; the pools are in :mod:`.pools`.  Conv layers can be timed
alone (:mod:`.timing`); Conv and fully connected layers take calibration
data and a MAC budget (:mod:`.calibrate`).
"""

from __future__ import annotations

import numpy as np

from ...plan import Candidate
from ..base import CalibrationRequest, Emitter, Family, Site
from . import calibrate, conv, conv_transpose, linear, timing

#: The module that handles each kind of site.
_HANDLERS = {conv.ConvSite: conv, conv_transpose.TransposeSite: conv_transpose,
             linear.LinearSite: linear}


class BoxFamily(Family):
    """Sum-pool plus a smaller Conv, ConvTranspose, Gemm or MatMul."""

    name = "box"
    description = ("Structured Convolutions: weights that are sums of boxes of ones become a "
                   "sum-pool and a smaller layer")

    def find(self, view) -> list[Site]:
        return (conv.find(view, self.name) + conv_transpose.find(view, self.name)
                + linear.find(view, self.name))

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        if site.skip_reason:
            return []
        return _HANDLERS[type(site)].candidates(site, tol, self.name)

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        _HANDLERS[type(site)].emit(site, candidate.payload, emitter)

    def measure(self, site: Site, trials, timer) -> list[float] | None:
        """Conv layers with known shapes, timed alone (:mod:`.timing`)."""
        if not isinstance(site, conv.ConvSite):
            return None
        return timing.measure_alone(
            site, trials, timer, timing.rewritten_layer_model,
            key=lambda candidate: (candidate.payload.structure.sizes, candidate.payload.lowering))

    def calibration(self, site: Site, seed: int) -> CalibrationRequest | None:
        return calibrate.request(site, seed)

    def calibrate(self, site: Site, candidates: list[Candidate], sample: np.ndarray,
                  budget: bool, alpha_fit: str) -> list[Candidate]:
        return calibrate.calibrate(site, candidates, sample, budget, alpha_fit, self.name)

    def refit(self, site: Site, candidate: Candidate, inputs: np.ndarray,
              originals: np.ndarray) -> Candidate:
        return calibrate.refit(site, candidate, inputs, originals)


__all__ = ["BoxFamily"]
