"""Structure families: one package or module per family, each a plug-in (:mod:`.base`).

Registered here, in this order: ``box`` (:mod:`.box`, Structured Convolutions),
``igc`` (:mod:`.igc`, interleaved group convolutions), ``csg`` (:mod:`.csg`,
shared slice generators, for size) and ``lowrank`` (:mod:`.lowrank`, two thin
layers, for a MAC budget).
"""

from .base import Emitter, Family, LayerInfo, Site, register, registered, resolve, unregister
from .box import BoxFamily
from .csg import SharedGeneratorFamily
from .igc import InterleavedFamily
from .lowrank import LowRankFamily

BOX = register(BoxFamily())
IGC = register(InterleavedFamily())
CSG = register(SharedGeneratorFamily())
LOWRANK = register(LowRankFamily())

__all__ = ["BOX", "CSG", "IGC", "LOWRANK", "Emitter", "Family", "LayerInfo", "Site", "register", "registered", "resolve",
           "unregister"]
